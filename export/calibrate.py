"""Calibration: per-input-channel L2 norms of every weight-bearing op's input, via ONNX Runtime.

Sessions are built from the graph's structure with the weights fed as inputs (artifacts.structure):
no copy of the model, and no 2 GB protobuf limit."""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping

import numpy as np
import onnx
from taskedge.runtime.ort import onnxruntime as ort

from taskedge.runtime.specs import cast_to_specs, check_arrays, graph_input_specs

from .artifacts import frozen_feeds, structure
from .graph import GraphEdit
from .layers import WeightOp


def activation_norms(model: onnx.ModelProto, ops: List[WeightOp],
                     batches: Iterable[Mapping[str, np.ndarray]], source: str = "calibration data",
                     progress=None) -> Dict[str, np.ndarray]:
    """Return {activation tensor name: ||X[:, j]||_2 over all calibration tokens/pixels}."""
    specs = graph_input_specs(model)
    probe, frozen = structure(model)
    graph_inputs = {s.name for s in specs}
    wanted = list(dict.fromkeys(op.activation for op in ops if op.activation not in graph_inputs))
    if wanted:              # only what the layers read is computed (not e.g. an LM's [B, T, V] logits)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in wanted)
        GraphEdit(probe).commit()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep tensor names intact
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    weights = frozen_feeds(frozen)
    out_names = [o.name for o in sess.get_outputs()]
    axes = {op.activation: op.act_axis for op in ops}
    sumsq: Dict[str, np.ndarray] = {}
    n = 0
    for i, batch in enumerate(batches):
        check_arrays(specs, batch, f"{source} (batch {i})")
        feed = cast_to_specs(specs, batch)
        results = dict(zip(out_names, sess.run(out_names, {**feed, **weights})))
        results.update(feed)
        for name, axis in axes.items():
            x = np.asarray(results[name], dtype=np.float64)
            x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
            sumsq[name] = sumsq.get(name, 0.0) + np.einsum("ij,ij->j", x, x)
        n += 1
        if progress:
            progress(i + 1)
    if n == 0:
        raise ValueError(f"{source}: no calibration batches")
    return {k: np.sqrt(v).astype(np.float32) for k, v in sumsq.items()}


def output_shapes(model: onnx.ModelProto, batch: Mapping[str, np.ndarray]) -> Dict[str, tuple]:
    """The float outputs' shapes on a real batch (symbolic shapes need not resolve)."""
    specs = graph_input_specs(model)
    skeleton, frozen = structure(model)
    sess = ort.InferenceSession(skeleton.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, {**cast_to_specs(specs, {s.name: batch[s.name] for s in specs}), **frozen_feeds(frozen)})
    return {n: tuple(v.shape) for n, v in zip(names, values) if np.asarray(v).dtype.kind == "f"}
