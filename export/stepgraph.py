"""From ORT's training artifacts to the graphs the board runs with plain onnxruntime.

step graph   inputs: model inputs, labels, trainable state      outputs: loss, logits, d(loss)/d(state)
             (+ the live layers' W', export/live.py)
eval graph   the step graph's forward: the same inputs              outputs: loss, logits
base graph   the frozen base inference model (with the new head); `merge` folds the update into it

The frozen weights of all three are stored once, in `weights.bin`, as ONNX external data
(page-aligned, so onnxruntime can map them), the task's own constants in `task_weights.bin`;
each graph file holds only its structure and small constants.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from taskedge.runtime.bundle import TASK_WEIGHTS, WEIGHTS, WeightEntry

from .backward_act import clip_grads_from_output, recompute_in_backward
from .graph import GraphEdit
from .lower import MS, lower, runs_on_plain_ort

ALIGN = 4096
TASK_ALIGN = 64                    # the task's small constants: cache-line aligned, no page padding
INLINE_MAX_BYTES = 1024            # smaller constants stay in the graph file
SAFE_USES = {("MatMul", 1), ("Gemm", 1), ("Gemm", 2), ("Conv", 1), ("Conv", 2), ("Gather", 0), ("Reshape", 0),
             ("GatherElements", 0), ("GatherElements", 1), ("ScatterElements", 0), ("ScatterElements", 1)}
ACCUMULATORS = ("InPlaceAccumulatorV2", "InPlaceAccumulator")
TRAINING_DOMAINS = ("ai.onnx.training", "ai.onnx.preview.training", "com.microsoft.experimental",
                    "com.microsoft.nchwc", "org.pytorch.aten", "ai.onnx.ml")


def _feed_frozen(model: onnx.ModelProto, keep_inputs: Sequence[str], values: Dict[str, onnx.TensorProto]) -> None:
    """Graph inputs that are not data or trainable state become initializers (the frozen weights)."""
    g = model.graph
    have = {t.name for t in g.initializer}
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    kept = []
    for vi in g.input:
        if vi.name in keep_inputs:
            kept.append(vi)
        elif vi.name not in have and vi.name in used:
            if vi.name not in values:
                raise ValueError(f"step graph: no value for frozen input {vi.name!r}")
            g.initializer.append(values[vi.name])
    del g.input[:]
    order = list(keep_inputs)
    g.input.extend(sorted(kept, key=lambda vi: order.index(vi.name)))


def _clean_opsets(model: onnx.ModelProto) -> None:
    used = {n.domain for n in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or (o.domain == MS and MS in used)]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def step_graph(training: onnx.ModelProto, data_inputs: List[str], trainable: List[str], loss: str, logits: str,
               values: Dict[str, onnx.TensorProto]) -> Dict[str, int]:
    """Turn ORT's training graph into the standard-ONNX step graph, in place.
    Returns the lowered training ops and their counts."""
    g = training.graph
    grad_of = {}
    edit = GraphEdit(training)
    for n in g.node:
        if n.op_type in ACCUMULATORS:
            grad_of[n.output[0]] = n.input[1]
            edit.remove(n)
    missing = [p for p in trainable if f"{p}_grad.accumulation.out" not in grad_of]
    if missing:
        raise ValueError(f"step graph: ORT produced no gradient for {missing[:3]}")
    grads = [grad_of[f"{p}_grad.accumulation.out"] for p in trainable]
    outputs = {o.name: o for o in g.output}
    del g.output[:]
    g.output.extend([outputs[loss], outputs[logits]])
    for p, gname in zip(trainable, grads):
        g.output.append(onnx.helper.make_tensor_value_info(gname, onnx.TensorProto.FLOAT, None))
    edit.commit()
    clip_grads_from_output(training)
    _feed_frozen(training, list(data_inputs) + list(trainable), values)
    counts = lower(training)
    recompute_in_backward(training)
    _clean_opsets(training)
    _drop_hints(training)
    leftover = sorted({n.op_type for n in g.node if not runs_on_plain_ort(n)})
    if leftover:
        raise ValueError(f"step graph: non-standard ops left after lowering: {leftover}")
    return counts


def eval_graph(step: onnx.ModelProto) -> onnx.ModelProto:
    """The eval graph: the step graph's own forward pass -- the nodes its loss and logits need, the
    same inputs. Evaluation then runs what training runs (the rewritten update paths: MobileNetV2's
    depthwise convs on their constant weights), not ORT's eval graph, whose convs read a weight
    computed in the graph (onnxruntime's slow generic kernels: 35 vs 14 ms a batch of 16)."""
    model = onnx.ModelProto()
    model.CopyFrom(step)
    model.graph.name += "_eval"
    del model.graph.output[2:]
    GraphEdit(model).commit()                 # drops the backward (dead now) and its initializers
    _clean_opsets(model)
    return model


def _drop_hints(model: onnx.ModelProto) -> None:
    """Shape hints, doc strings and long generated names: onnxruntime infers the shapes itself, and a
    task pack carries every byte of its graphs (MiniLM's step graph: 450 -> ~180 kB). Graph inputs,
    outputs, initializers and TaskEdge's own names (`taskedge` in them) are kept; the names ORT's
    gradient builder and the exporter generated become short ones."""
    g = model.graph
    del g.value_info[:]
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return                                          # subgraphs see outer names: leave names alone
    keep = {i.name for i in g.input} | {o.name for o in g.output} | {t.name for t in g.initializer}
    short: Dict[str, str] = {}
    for j, n in enumerate(g.node):
        n.doc_string = ""
        if "taskedge" not in n.name:         # short but unique: onnxruntime names a fused node after the
            n.name = f"_n{j:x}"              # nodes it fuses, and two fusions of unnamed nodes collide
        for i, name in enumerate(n.output):
            if name and name not in keep and "taskedge" not in name:
                n.output[i] = short.setdefault(name, f"_{len(short):x}")
        for i, name in enumerate(n.input):
            n.input[i] = short.get(name, name)


def _index_only(models: List[onnx.ModelProto]) -> set:
    """Initializers used only as the indices of Gather/GatherElements/ScatterElements, which take int32
    as well as int64: stored as int32 they take half the bytes of a task pack."""
    uses: Dict[str, set] = {}
    for m in models:
        for n in m.graph.node:
            for i, name in enumerate(n.input):
                uses.setdefault(name, set()).add((n.op_type, i))
    ok = {("Gather", 1), ("GatherElements", 1), ("ScatterElements", 1)}
    return {name for name, u in uses.items() if u <= ok}


def grad_names(step: onnx.ModelProto) -> List[str]:
    return [o.name for o in step.graph.output[2:]]


def store_weights(models: List[onnx.ModelProto], folder: Path, everything_of: onnx.ModelProto,
                  task_own: Sequence[str] = ()) -> List[WeightEntry]:
    """Move initializers into two external-data files: `weights.bin` (page-aligned) holds the
    pretrained model's frozen weights -- every initializer of `everything_of` (the base graph: merge
    rebuilds it from these) but those named in `task_own` (the new head) -- in the base graph's
    order, so every task exported from one model writes the same bytes (the base a board stores
    once); `task_weights.bin` holds the task's own constants (the head's initial values and the
    larger constants of the other graphs: indices, sparse-backward positions). A tensor that
    several graphs hold under one name is written once. Returns the index."""
    chosen: Dict[str, onnx.TensorProto] = {}
    base_names = {t.name for t in everything_of.graph.initializer}
    for model in [everything_of] + [m for m in models if m is not everything_of]:
        for t in model.graph.initializer:
            raw = numpy_helper.to_array(t)
            if model is not everything_of and raw.nbytes < INLINE_MAX_BYTES:
                continue
            if t.name in chosen:
                if not np.array_equal(numpy_helper.to_array(chosen[t.name]), raw):
                    raise ValueError(f"two graphs hold different tensors named {t.name!r}")
                continue
            chosen[t.name] = t
    # Sessions share a tensor through add_initializer only where every use is one of SAFE_USES:
    # onnxruntime's transpose optimizer rewrites other initializers (e.g. a LayerNorm scale after a
    # Transpose in ConvNeXt) and ignores that rewrite for user-provided ones, giving wrong results
    # (1.19.2 and 1.23.2). The others stay external data that each session reads itself.
    unsafe = {name for m in models for n in m.graph.node for i, name in enumerate(n.input)
              if (n.op_type, i) not in SAFE_USES}
    own = set(task_own)
    narrow = {n for n in _index_only(models) if n in chosen and n not in base_names
              and chosen[n].data_type == onnx.TensorProto.INT64}
    parts = {WEIGHTS: [n for n in chosen if n in base_names and n not in own]}
    parts[TASK_WEIGHTS] = [n for n in chosen if n not in set(parts[WEIGHTS])]
    offsets: Dict[str, WeightEntry] = {}
    for file, names in parts.items():
        align = ALIGN if file == WEIGHTS else TASK_ALIGN
        with open(folder / file, "wb") as f:
            for name in names:
                a = np.ascontiguousarray(numpy_helper.to_array(chosen[name]))
                if name in narrow and a.size and np.abs(a).max() < 2 ** 31:
                    a = a.astype(np.int32)
                f.write(b"\0" * ((-f.tell()) % align))
                offsets[name] = WeightEntry(name=name, dtype=a.dtype.name, shape=list(a.shape), offset=f.tell(),
                                            nbytes=int(a.nbytes), base=name in base_names,
                                            share=name not in unsafe, file=file)
                f.write(a.tobytes())
    for model in models:
        for t in model.graph.initializer:
            e = offsets.get(t.name)
            if e is None:
                continue
            t.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                t.ClearField(field)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            t.data_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(e.dtype))
            for k, v in (("location", e.file), ("offset", str(e.offset)), ("length", str(e.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
    return list(offsets.values())
