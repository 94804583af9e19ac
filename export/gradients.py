"""Gradient magnitudes of the weights on task data: the score of `--selection gradient` (GPS's
rule: accumulated |dL/dW_ij| over the calibration batches, top-k per output neuron).

How: ORT's gradient builder on the model with the new head and the selected layers' weights
trainable; the training graph is turned into a standard-ONNX step graph (as for a bundle) and
run with plain onnxruntime on each calibration batch (its labels are needed); the gradients'
absolute values are summed per entry."""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping

import numpy as np
import onnx

from taskedge.runtime import bundle as B
from taskedge.runtime.fsutil import UserError
from taskedge.runtime.ort import onnxruntime as ort
from taskedge.runtime.specs import cast_to_specs, graph_input_specs

from .layers import WeightOp


def gradient_magnitudes(model: onnx.ModelProto, ops: List[WeightOp], head_params: List[str],
                        batches: Iterable[Mapping[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """{weight name: sum over batches of |dL/dW|}, each shaped like the weight."""
    from .artifacts import build, frozen_feeds, prepare_for_training, structure
    from .stepgraph import step_graph
    weights = [op.weight for op in ops]
    trainable = weights + list(head_params)
    m, frozen = structure(model, keep=trainable)       # a copy of the graph, not of the weights
    prepare_for_training(m)
    training, _ = build(m, trainable)
    specs = graph_input_specs(model)
    data = [s.name for s in specs] + [B.LABELS_INPUT]
    values = {t.name: t for t in m.graph.initializer}
    step_graph(training, data + list(frozen), trainable, training.graph.output[0].name, m.graph.output[0].name,
               values)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(training.SerializeToString(), so, providers=["CPUExecutionProvider"])
    params = {n: onnx.numpy_helper.to_array(values[n]) for n in trainable}
    wanted = {i.name for i in sess.get_inputs()}
    params.update({n: a for n, a in frozen_feeds(frozen).items() if n in wanted})
    total = {w: np.zeros_like(params[w]) for w in weights}
    for i, batch in enumerate(batches):
        if B.LABELS_INPUT not in batch:
            raise UserError(f"--selection gradient needs labels in the calibration data (an array "
                            f"{B.LABELS_INPUT!r}); or use another --selection")
        feed = cast_to_specs(specs, {s.name: batch[s.name] for s in specs})
        feed[B.LABELS_INPUT] = np.asarray(batch[B.LABELS_INPUT], dtype=np.int64)
        out = sess.run(None, {**feed, **params})
        for w, g in zip(trainable, out[2:]):
            if w in total:
                total[w] += np.abs(g)
    return total
