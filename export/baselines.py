"""Baselines for `taskedge bench`: the same base ONNX graph and the same new head as a TaskEdge
bundle, trained through ONNX Runtime's training API in the usual dense ways.

- Full fine-tuning (`build_full_ft`): EVERY float initializer with more than one element is
  trainable: all encoder weights (MatMul weights and biases, LayerNorm scales/shifts), the word /
  position / token-type embeddings, and the new head. Only scalar constants (e.g. the -1e4 mask
  bias, 1/sqrt(d)) stay frozen. That is true full fine-tuning of the model's 22.7 M weights.
- LoRA (`build_lora`): on the same layers TaskEdge adapts (every MatMul/Gemm with a weight
  initializer; for CNNs also every Conv with groups == 1 - depthwise convs get no LoRA), the graph
  rewrite `y += ((x @ A) @ B) * (alpha / r)`, A [in, r] kaiming-uniform (bound 1/sqrt(in), as
  peft), B [r, out] zeros. Only the A/B factors and the head are trainable.
- Floor (`build_floor`): a zero bias added to the input of the first adapted layer, trainable
  with the head. Its gradient needs dx through every layer but no weight gradient anywhere:
  ORT's own cost of forward + backward-to-inputs, the floor any method that adapts the lowest
  layer pays on this runtime.

The artifacts folder has the bundle's file names (training/eval/optimizer model, checkpoint,
base_model.onnx with the head) plus `baseline.json` describing the trainable tensors, so the
runtime's `Trainer` runs it unchanged.

`head_lr_scale = s` reparametrises the head as `W = s * W'` (W' trainable, initialised to W/s):
ORT's generated AdamW has ONE learning rate, and Adam's step on W' is ~lr whatever the gradient
scale, so W moves at ~s * lr. That gives the head its own learning rate (e.g. 1e-2 with a 1e-4
body lr for full FT) exactly like a torch parameter group.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from taskedge.runtime import bundle as B

from .exporter import generate_ort_artifacts, prepare_for_training
from .graph import Emitter, GraphEdit
from .layers import count_weights, find_weight_ops, node_attr
from .head import HEAD_BIAS, HEAD_WEIGHT, add_head

SCALED = ".lr_scaled"


def scale_head(model: onnx.ModelProto, scale: float) -> List[str]:
    """Store the head as W/scale, multiply back in the graph; returns the new trainable names."""
    if scale == 1.0:
        return [HEAD_WEIGHT, HEAD_BIAS]
    g = model.graph
    out, nodes = [], []
    for t in g.initializer:
        if t.name in (HEAD_WEIGHT, HEAD_BIAS):
            arr = numpy_helper.to_array(t) / np.float32(scale)
            new = t.name + SCALED
            t.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), new))
            out.append(new)
            nodes.append(helper.make_node("Mul", [new, t.name.replace(SCALED, "") + ".lr_scale"],
                                          [new[: -len(SCALED)]], name=new + ".mul"))
    for n in (HEAD_WEIGHT, HEAD_BIAS):
        g.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), n + ".lr_scale"))
    for node in reversed(nodes):
        g.node.insert(0, node)
    return sorted(out)


def unscale_update(arrays: Dict[str, np.ndarray], scale: float) -> Dict[str, np.ndarray]:
    """Trained tensors as the model uses them (head multiplied back, names without the suffix)."""
    return {(k[: -len(SCALED)] if k.endswith(SCALED) else k): (v * np.float32(scale) if k.endswith(SCALED) else v)
            for k, v in arrays.items()}


def full_ft_trainable(model: onnx.ModelProto) -> List[str]:
    """All float initializers with more than one element (scalar constants excluded)."""
    return sorted(t.name for t in model.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) > 1
                  and not t.name.endswith(".lr_scale"))


def add_lora(model: onnx.ModelProto, rank: int = 8, alpha: float = 16.0, seed: int = 0,
             exclude: Optional[set] = None, conv: bool = True) -> List[dict]:
    """Insert `y += ((x @ A) @ B) * alpha/r` after every MatMul/Gemm (and groups-1 Conv) weight op."""
    exclude = exclude or set()
    rng = np.random.default_rng(seed)
    edit = GraphEdit(model)
    scale = edit.const("lora.taskedge_scale", np.array(alpha / rank, dtype=np.float32))
    table = []
    for op in find_weight_ops(model):
        if op.weight in exclude or op.trans_a or (op.op == "Conv" and (not conv or op.groups != 1)):
            continue
        e = Emitter(edit, f"{op.weight}.lora_")
        if op.op == "Conv":
            cout, cin, kshape = op.shape[0], op.shape[1], list(op.shape[2:])
            rows, cols = cout, cin * int(np.prod(kshape))
            a = rng.uniform(-1 / np.sqrt(cols), 1 / np.sqrt(cols), size=[rank, cin] + kshape).astype(np.float32)
            b = np.zeros([cout, rank] + [1] * len(kshape), dtype=np.float32)
            attrs = {k: node_attr(op.node, k, None) for k in ("strides", "pads", "dilations", "auto_pad")}
            xa = e.node("Conv", [op.node.input[0], e.init("A", a)], "xa", **{k: v for k, v in attrs.items() if v is not None})
            xab = e.node("Conv", [xa, e.init("B", b)], "xab")
        else:
            rows, cols = op.rows, op.cols
            a = rng.uniform(-1 / np.sqrt(cols), 1 / np.sqrt(cols), size=(cols, rank)).astype(np.float32)
            b = np.zeros((rank, rows), dtype=np.float32)
            xab = e.node("MatMul", [e.node("MatMul", [op.node.input[0], e.init("A", a)], "xa"), e.init("B", b)], "xab")
        y = op.node.output[0]
        op.node.output[0] = e.name("base_out")
        e.node("Add", [op.node.output[0], e.node("Mul", [xab, scale], "scaled")], "out")
        e.nodes[-1].output[0] = y                              # the Add takes over the op's output name
        edit.insert_after(op.node, e.nodes)
        table.append({"layer": op.name, "op": op.op, "weight": op.weight, "rows": rows, "cols": cols,
                      "params": [e.name("A"), e.name("B")], "trainable": int(a.size + b.size)})
    edit.commit()
    return table


def _write(model: onnx.ModelProto, base: onnx.ModelProto, trainable: List[str], out: Path, info: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    prepare_for_training(model)
    generate_ort_artifacts(model, trainable, out)
    onnx.save(base, str(out / B.BASE_MODEL))
    info = {**info, "trainable": trainable,
            "trainable_params": int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name in set(trainable)))}
    (out / "baseline.json").write_text(json.dumps(info, indent=2))
    return info


def build_full_ft(model: onnx.ModelProto, num_classes: int, out, seed: int = 0, head_lr_scale: float = 1.0) -> dict:
    """ORT artifacts for full fine-tuning (all float initializers + new head trainable)."""
    m = copy.deepcopy(model)
    head = add_head(m, num_classes, seed)
    num_weights = count_weights(m, exclude=set(head["params"]))
    base = copy.deepcopy(m)
    scale_head(m, head_lr_scale)
    trainable = full_ft_trainable(m)
    return _write(m, base, trainable, Path(out),
                  {"method": "full_ft", "num_weights": num_weights, "head_lr_scale": head_lr_scale,
                   "head": head, "trainable_rule": "every float initializer with > 1 element (scalar constants "
                                                   "frozen): all weights, biases, LayerNorms, embeddings + head"})


def build_lora(model: onnx.ModelProto, num_classes: int, out, rank: int = 8, alpha: float = 16.0, seed: int = 0,
               head_lr_scale: float = 1.0) -> dict:
    """ORT artifacts for LoRA r=`rank` on every MatMul/Gemm (and groups-1 Conv) weight op + new head."""
    m = copy.deepcopy(model)
    head = add_head(m, num_classes, seed)
    num_weights = count_weights(m, exclude=set(head["params"]))
    base = copy.deepcopy(m)
    table = add_lora(m, rank, alpha, seed, exclude=set(head["params"]))
    head_names = scale_head(m, head_lr_scale)
    trainable = sorted(p for row in table for p in row["params"]) + head_names
    return _write(m, base, trainable, Path(out),
                  {"method": "lora", "rank": rank, "alpha": alpha, "num_weights": num_weights,
                   "head_lr_scale": head_lr_scale, "head": head, "layers": table,
                   "update_params": int(sum(r["trainable"] for r in table))})


def build_floor(model: onnx.ModelProto, num_classes: int, out, seed: int = 0) -> dict:
    """ORT artifacts whose only trainables are the head and a zero bias on the first adapted
    layer's input (see the module docstring)."""
    m = copy.deepcopy(model)
    head = add_head(m, num_classes, seed)
    num_weights = count_weights(m, exclude=set(head["params"]))
    base = copy.deepcopy(m)
    ops = [op for op in find_weight_ops(m) if op.weight not in set(head["params"])]
    if not ops:
        raise ValueError("no weight op to put the floor probe under")
    op, x = ops[0], ops[0].activation
    if op.op == "Conv":                      # NCHW: one bias per input channel
        bias = np.zeros((int(op.shape[1]) * op.groups, 1, 1), np.float32)
    elif op.op == "Gemm" and op.trans_a:     # x is [cols, batch]
        bias = np.zeros((op.cols, 1), np.float32)
    else:                                    # x is [..., cols]
        bias = np.zeros(op.cols, np.float32)
    name = "taskedge_floor.bias"
    edit = GraphEdit(m)
    consumers = [n for n in m.graph.node if x in n.input]
    for node in consumers:
        node.input[:] = [name + ".out" if t == x else t for t in node.input]
    edit.insert_before(consumers[0], [helper.make_node("Add", [x, edit.const(name, bias)], [name + ".out"], name=name)])
    edit.commit()
    return _write(m, base, [name] + sorted(head["params"]), Path(out),
                  {"method": "floor", "num_weights": num_weights, "head": head, "probe_input": x})


def head_arrays(model: onnx.ModelProto, num_classes: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """The new head exactly as `add_head` initialises it (for the PyTorch baselines)."""
    m = copy.deepcopy(model)
    add_head(m, num_classes, seed)
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in (HEAD_WEIGHT, HEAD_BIAS)}
