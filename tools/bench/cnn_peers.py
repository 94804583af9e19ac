"""The CNN bench's peers as step graphs on plain onnxruntime, the runtime TaskEdge's bundles use:
the same base ONNX + head, a rewrite for the method, ORT's gradient builder, then the exporter's
lowering to standard ONNX (export.stepgraph). Each peer folder holds step.onnx (inputs: pixels,
labels, trainable state; outputs: loss, logits, gradients), eval.onnx, init.npz and peer.json.

Methods (every weight op of the body: each Conv, depthwise included, and each Gemm/MatMul; the
head is trained densely in every method):
- full: every float initializer with > 1 element (export.baselines.full_ft_trainable).
- probe: the head only (linear probe).
- lora r: groups-1 convs and dense layers get peft's activation path (export.baselines.add_lora:
  y += B(A(x)) * alpha/r, A a conv with the layer's kernel, B 1x1). A DEPTHWISE kernel W [C, 1, k, k]
  is read as the matrix C x k^2 (one row per channel's k x k filter) and updated in weight space,
  W' = W + (alpha/r) * reshape(B @ A), B [C, r] zeros, A [r, k^2] kaiming-uniform; its rank is at
  most min(r, k^2) (9 for 3x3), so r = 16 is a full-rank depthwise update.
- dora r: W' = m * V / ||V||, V = W + (alpha/r) * reshape(B @ A) (the same matrix view as above,
  for every weight op), m a trainable per-output-channel magnitude initialised to ||W|| (Liu et al.
  2024); the norm is differentiated (no detach).
- galore r: the full-FT step graph (every gradient computed); the optimizer projects each matrix
  gradient to rank r (bench/galore.py) - GaLore changes the optimizer, not the graph.
alpha = 2r everywhere (LoRA scale 2), as the text bench's r=8 / alpha 16.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

FAMILIES = ("full", "probe", "lora", "dora", "galore")
SCALE = 2.0                 # alpha / r with alpha = 2r


def with_head(base: onnx.ModelProto, classes: int, seed: int, head_init: Optional[dict] = None):
    """A copy of `base` with the bench's head (add_head's init, or `head_init` weight/bias)."""
    from taskedge.export.head import HEAD_BIAS, HEAD_WEIGHT, add_head
    m = copy.deepcopy(base)
    head = add_head(m, classes, seed)
    if head_init is not None:
        for t in m.graph.initializer:
            if t.name in (HEAD_WEIGHT, HEAD_BIAS):
                a = head_init["weight"] if t.name == HEAD_WEIGHT else head_init["bias"]
                old = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array(a.reshape(old.shape).astype(np.float32), t.name))
    return m, list(head["params"])


def _to_layout(e, op, mat: str) -> str:
    """A [rows, cols] matrix laid out as op's weight (conv: reshape; MatMul/Gemm(transB=0): transpose)."""
    if op.row_axis == 0:
        return e("Reshape", [mat, e.c(list(op.shape))])
    return e("Transpose", [mat], perm=[1, 0])


def weight_space(model: onnx.ModelProto, rank: int, dora: bool, seed: int, exclude: set,
                 only_depthwise: bool) -> List[dict]:
    """Rewrite the chosen weight ops to take W' (LoRA or DoRA in weight space, module docstring)."""
    from taskedge.export.graph import Emitter, GraphEdit
    from taskedge.export.layers import find_weight_ops
    rng = np.random.default_rng(seed + 1)
    edit = GraphEdit(model)
    inits = {t.name: t for t in model.graph.initializer}
    table = []
    for op in find_weight_ops(model):
        if op.weight in exclude or op.trans_a or (only_depthwise and not (op.op == "Conv" and op.groups > 1)):
            continue
        rows, cols = op.rows, op.cols
        r = min(rank, rows, cols)
        e = Emitter(edit, f"{op.weight}.{'dora' if dora else 'lora'}_")
        a = e.init("A", rng.uniform(-1 / np.sqrt(cols), 1 / np.sqrt(cols), (r, cols)).astype(np.float32))
        b = e.init("B", np.zeros((rows, r), np.float32))
        delta = e("Mul", [e("MatMul", [b, a]), e.c(np.array(SCALE, np.float32), np.float32)])
        v = e("Add", [op.weight, _to_layout(e, op, delta)])
        params, n = [a, b], r * (rows + cols)
        if dora:
            axes = [i for i in range(len(op.shape)) if i != op.row_axis]
            w = numpy_helper.to_array(inits[op.weight])
            mag = np.sqrt((w.astype(np.float64) ** 2).sum(axis=tuple(axes), keepdims=True)).astype(np.float32)
            m = e.init("m", mag)
            norm = e("Sqrt", [e.reduce("ReduceSum", e("Mul", [v, v]), axes, keepdims=1)])
            v = e("Mul", [v, e("Div", [m, norm])])
            params.append(m)
            n += rows
        op.node.input[1] = v
        edit.insert_before(op.node, e.nodes)
        table.append({"layer": op.name, "weight": op.weight, "rows": rows, "cols": cols, "rank": r,
                      "depthwise": op.op == "Conv" and op.groups > 1, "params": params, "trainable": n})
    edit.commit()
    return table


def _kernel_shapes(model: onnx.ModelProto) -> None:
    """Give every Conv with an initializer weight its kernel_shape attribute (add_lora's new convs
    have none; lowering ConvGrad reads it)."""
    from onnx import helper
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[1] in dims and not any(a.name == "kernel_shape" for a in n.attribute):
            n.attribute.append(helper.make_attribute("kernel_shape", dims[n.input[1]][2:]))


def rewrite(model: onnx.ModelProto, family: str, rank: int, seed: int, head: List[str]) -> List[str]:
    """Apply `family`'s rewrite in place; returns the trainable tensors (head last)."""
    from taskedge.export import baselines as BL
    if family in ("full", "galore"):
        return [t for t in BL.full_ft_trainable(model) if t not in head] + head
    if family == "probe":
        return list(head)
    if family == "lora":
        table = BL.add_lora(model, rank, SCALE * rank, seed, exclude=set(head))        # groups-1 convs, dense
        table += weight_space(model, rank, False, seed, set(head), only_depthwise=True)
        _kernel_shapes(model)
    elif family == "dora":
        table = weight_space(model, rank, True, seed, set(head), only_depthwise=False)
    else:
        raise ValueError(f"unknown family {family!r}: use {', '.join(FAMILIES)}")
    return [p for row in table for p in row["params"]] + head


def build_peer(base: onnx.ModelProto, family: str, rank: int, classes: int, seed: int, out: Path,
               head_init: Optional[dict] = None) -> Dict[str, object]:
    """The peer's step and eval graphs + initial state in `out`; returns its description."""
    from taskedge.export.artifacts import build as _artifacts, prepare_for_training
    from taskedge.export.layers import count_weights
    from taskedge.export.stepgraph import eval_graph, step_graph
    from taskedge.runtime import bundle as B

    m, head = with_head(base, classes, seed, head_init)
    num_weights = count_weights(m, exclude=set(head))
    trainable = rewrite(m, family, rank, seed, head)
    prepare_for_training(m)
    training, _ = _artifacts(m, trainable)
    values = {t.name: t for t in m.graph.initializer}
    data = [i.name for i in m.graph.input if i.name not in values] + [B.LABELS_INPUT]
    lowered = step_graph(training, data, trainable, training.graph.output[0].name, m.graph.output[0].name, values)
    evaluation = eval_graph(training)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(training, str(out / "step.onnx"))
    onnx.save(evaluation, str(out / "eval.onnx"))
    init = {n: numpy_helper.to_array(values[n]) for n in trainable}
    np.savez(out / "init.npz", **init)
    info = {"family": family, "rank": rank, "trainable": trainable, "head": head, "data": data[:-1],
            "num_weights": int(num_weights), "trainable_params": int(sum(a.size for a in init.values())),
            "head_params": int(sum(init[h].size for h in head)), "lowered": lowered}
    (out / "peer.json").write_text(json.dumps(info, indent=1))
    return info
