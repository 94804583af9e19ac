"""Rewrite an ONNX graph so that each selected weight gets an update path whose only
trainable tensor is its delta (or, with sparse LoRA, its A and B factors).

Four formulations (README "Update formulations"), two kinds:
  gather, gather_rows, gather_elements
           y = op(x, W) + ReduceSum(Gather(x, idx) * delta, -1)   never builds a dense update
  scatter  y = op(x, W'),  W' = ScatterElements(W, idx, GatherElements(W, idx) + delta)
Names derive from the weight: `<weight>.taskedge_delta`, `<weight>.taskedge_idx`, ...
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from taskedge.runtime.bundle import LayerAllocation

from .graph import Emitter, GraphEdit, prune_unused_initializers
from .layers import WeightOp, node_attr

HEAD_WEIGHT = "taskedge_head.weight"
HEAD_BIAS = "taskedge_head.bias"
LOGITS = "logits"

# Chosen by measurement (`python -m taskedge.tools.formulations`, README "Update formulations"),
# on the standard-ONNX step graph in plain onnxruntime. MiniLM (3-D MatMul), batch 16: scatter
# 228 ms, gather_rows 277, gather_elements 356, gather 387. MLP 8x1024 (2-D Gemm), batch 64:
# gather_elements 28.8 ms, gather_rows 28.7, gather 29.3, scatter 39.2 (the lowered gradient of
# a gather is a ScatterElements-add, cheaper than rebuilding W').
DEFAULT_FORMULATION = {"MatMul": "scatter", "Gemm": "gather_elements", "Conv": "scatter"}
FORMULATIONS = ("gather", "gather_rows", "gather_elements", "scatter")


def _delta(b: Emitter, rows: int, idx_rows: np.ndarray, cols: int, lora_rank: Optional[int],
           rng: np.random.Generator) -> Tuple[str, List[str], int]:
    """The [rows, k] update tensor: a trainable initializer, or (B @ A) gathered at the mask."""
    k = idx_rows.shape[1]
    if not lora_rank:
        d = b.init("delta", np.zeros((rows, k), dtype=np.float32))
        return d, [d], rows * k
    r = int(lora_rank)
    bound = 1.0 / np.sqrt(cols)                       # kaiming-uniform-like, as in LoRA/peft
    a = b.init("lora_A", rng.uniform(-bound, bound, size=(r, cols)).astype(np.float32))
    bb = b.init("lora_B", np.zeros((rows, r), dtype=np.float32))
    idx = b.init("lora_idx", idx_rows)
    ga = b.node("Gather", [a, idx], "lora_gathered", axis=1)            # [r, rows, k]
    bt = b.node("Transpose", [bb], "lora_Bt", perm=[1, 0])              # [r, rows]
    bt3 = b.unsqueeze(bt, -1, "lora_Bt3")                               # [r, rows, 1]
    prod = b.node("Mul", [ga, bt3], "lora_prod")
    d = b.reduce_sum(prod, 0, "lora_delta")                             # [rows, k]
    return d, [a, bb], r * (rows + cols)


def _times_alpha(b: Emitter, op: WeightOp, update: str) -> str:
    """Gemm computes alpha * A @ B: the update's output term is scaled the same way, so that
    delta lives in weight space (what `merge` adds to W)."""
    alpha = float(node_attr(op.node, "alpha", 1.0)) if op.op == "Gemm" else 1.0
    if alpha == 1.0:
        return update
    return b.node("Mul", [update, b.init("alpha", np.array(alpha, dtype=np.float32))], "update_scaled")


def _gather_path(b: Emitter, op: WeightOp, idx_rows: np.ndarray, delta: str, y: str) -> str:
    """Extra output ReduceSum(Gather(x, idx) * delta) added to y."""
    idx = b.init("idx", idx_rows)
    axis = -1 if op.op == "MatMul" else 1
    g = b.node("Gather", [op.activation, idx], "gathered", axis=axis)     # [..., rows, k]
    m = b.node("Mul", [g, delta], "weighted")
    s = b.reduce_sum(m, -1, "update_out")                                # [..., rows]
    s = _times_alpha(b, op, s)
    return b.node("Add", [y, s], "out")


def _gather_rows_path(b: Emitter, op: WeightOp, idx_rows: np.ndarray, delta: str, y: str) -> str:
    """Like _gather_path, but gathers whole rows of the transposed input ([cols, tokens]).

    Same math; the backward pass becomes a row scatter-add (GatherGrad on axis 0), which
    ORT runs far faster than the strided GatherGrad on the last axis (README, measured).
    """
    rows, k = idx_rows.shape
    cols = op.cols
    flat = b.node("Reshape", [op.activation, b.init("flat_shape", np.array([-1, cols], dtype=np.int64))], "x_flat")
    xt = b.node("Transpose", [flat], "x_t", perm=[1, 0])                              # [cols, tokens]
    g = b.node("Gather", [xt, b.init("idx", idx_rows.reshape(-1))], "gathered", axis=0)  # [rows*k, tokens]
    g3 = b.node("Reshape", [g, b.init("g_shape", np.array([rows, k, -1], dtype=np.int64))], "gathered3")
    d3 = b.unsqueeze(delta, -1, "delta3")                                              # [rows, k, 1]
    s = b.reduce_sum(b.node("Mul", [g3, d3], "weighted"), 1, "update_t")               # [rows, tokens]
    st = b.node("Transpose", [s], "update_tokens", perm=[1, 0])                        # [tokens, rows]
    st = _times_alpha(b, op, st)
    shaped = b.node("Reshape", [st, b.node("Shape", [y], "y_shape")], "update_out")
    return b.node("Add", [y, shaped], "out")


def _gather_elements_path(b: Emitter, op: WeightOp, idx_rows: np.ndarray, delta: str, y: str) -> str:
    """Same math again, with GatherElements on [tokens, cols] (its backward is a ScatterElements-add)."""
    rows, k = idx_rows.shape
    flat = b.node("Reshape", [op.activation, b.init("flat_shape", np.array([-1, op.cols], dtype=np.int64))],
                  "x_flat")                                                           # [tokens, cols]
    tokens = b.node("Slice", [b.node("Shape", [flat], "x_shape"), b.init("zero", np.array([0], np.int64)),
                              b.init("one", np.array([1], np.int64))], "tokens")
    shape = b.node("Concat", [tokens, b.init("width", np.array([rows * k], np.int64))], "idx_shape", axis=0)
    idx = b.node("Expand", [b.init("idx", idx_rows.reshape(1, -1)), shape], "idx_tokens")   # [tokens, rows*k]
    g = b.node("GatherElements", [flat, idx], "gathered", axis=1)
    g3 = b.node("Reshape", [g, b.init("g_shape", np.array([-1, rows, k], dtype=np.int64))], "gathered3")
    s = b.reduce_sum(b.node("Mul", [g3, delta], "weighted"), -1, "update_rows")      # [tokens, rows]
    s = _times_alpha(b, op, s)
    shaped = b.node("Reshape", [s, b.node("Shape", [y], "y_shape")], "update_out")
    return b.node("Add", [y, shaped], "out")


FORWARD_TIE = "w_updated_after_x"     # W' is built once the layer's input exists (backward.py moves it to x[..., U])


def _scatter_path(b: Emitter, op: WeightOp, idx_rows: np.ndarray, delta: str) -> str:
    """W' = W with delta added at the selected entries; returns the name of W'."""
    w = op.weight
    if op.op == "Conv":
        shape = b.init("flat_shape", np.array([op.shape[0], -1], dtype=np.int64))
        w2 = b.node("Reshape", [w, shape], "w_rows")
        idx, upd, axis = b.init("idx", idx_rows), delta, 1
    elif op.row_axis == 0:                       # Gemm transB=1: W is [rows, cols]
        w2, idx, upd, axis = w, b.init("idx", idx_rows), delta, 1
    else:                                        # W is [cols, rows]: index along axis 0
        w2, idx, axis = w, b.init("idx", np.ascontiguousarray(idx_rows.T)), 0
        upd = b.node("Transpose", [delta], "delta_t", perm=[1, 0])
    old = b.node("GatherElements", [w2, idx], "w_selected", axis=axis)
    new = b.node("Add", [old, upd], "w_updated")
    new_tied = b.tie_after(new, op.activation, FORWARD_TIE)
    w3 = b.node("ScatterElements", [w2, idx, new_tied], "w_scattered", axis=axis)
    if op.op == "Conv":
        w3 = b.node("Reshape", [w3, b.init("w_shape", np.array(op.shape, dtype=np.int64))], "w_new")
    return w3


def insert_updates(model: onnx.ModelProto, ops: List[WeightOp], indices: Dict[str, np.ndarray],
                   formulation: Optional[Dict[str, str]] = None, lora_rank: Optional[int] = None,
                   seed: int = 0) -> List[LayerAllocation]:
    """Insert update paths in place; return the allocation table for the manifest."""
    formulation = {**DEFAULT_FORMULATION, **(formulation or {})}
    rng = np.random.default_rng(seed)
    edit = GraphEdit(model)
    table = []
    for op in ops:
        idx_rows = indices[op.weight]
        form = formulation[op.op]
        if form.startswith("gather") and (op.op == "Conv" or op.trans_a):
            form = "scatter"                                  # gather needs x laid out as [..., cols]
        b = Emitter(edit, f"{op.weight}.taskedge_")
        delta, params, count = _delta(b, op.rows, idx_rows, op.cols, lora_rank, rng)
        if form in ("gather", "gather_rows", "gather_elements"):
            y = op.node.output[0]
            base = b.name("base_out")
            op.node.output[0] = base
            path = {"gather": _gather_path, "gather_rows": _gather_rows_path,
                    "gather_elements": _gather_elements_path}[form]
            path(b, op, idx_rows, delta, base)
            b.nodes[-1].output[0] = y                          # the Add takes over the original name
            edit.insert_after(op.node, b.nodes)       # the Add reads the op's output
        else:
            op.node.input[1] = _scatter_path(b, op, idx_rows, delta)
            edit.insert_before(op.node, b.nodes)      # W' must exist before the op reads it
        table.append(LayerAllocation(layer=op.name, op=op.op, weight=op.weight, weight_shape=list(op.shape),
                                     rows=op.rows, cols=op.cols, k=int(idx_rows.shape[1]), formulation=form,
                                     row_axis=op.row_axis, trainable=count, params=params))
    edit.commit()
    return table


def _static_last_dim(model: onnx.ModelProto, tensor: str) -> Optional[int]:
    inferred = shape_inference.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.name == tensor:
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return len(dims), dims[-1].dim_value
    return None


def add_head(model: onnx.ModelProto, num_classes: int, seed: int = 0) -> Dict[str, object]:
    """Replace the classifier (a final Gemm/MatMul[+Add] with a weight initializer) by a new
    dense head with `num_classes` outputs, or append one to a [batch, features] output.
    The graph's single output becomes `logits` [batch, num_classes]."""
    if num_classes < 2:
        raise ValueError(f"bad --num-classes {num_classes}: need at least 2 classes")
    g = model.graph
    out = g.output[0].name
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    node = producers.get(out)
    removed, features, feat_in = [], None, out
    if node is not None and node.op_type == "Add" and node.input[0] in producers \
            and producers[node.input[0]].op_type == "MatMul" and producers[node.input[0]].input[1] in inits:
        mm = producers[node.input[0]]
        removed, feat_in = [node, mm], mm.input[0]
        features = inits[mm.input[1]].dims[0]
    elif node is not None and node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
        w = inits[node.input[1]]
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
        removed, feat_in = [node], node.input[0]
        features = w.dims[1] if trans_b else w.dims[0]
    else:
        info = _static_last_dim(model, out)
        if info is None or info[0] != 2:
            raise ValueError(f"model output {out!r} is not a [batch, features] tensor with a known feature size; "
                             "export a module that returns pooled features (or logits) to use --num-classes")
        features = info[1]
    rng = np.random.default_rng(seed)
    bound = np.sqrt(6.0 / (features + num_classes))
    w = rng.uniform(-bound, bound, size=(num_classes, features)).astype(np.float32)
    b = np.zeros(num_classes, dtype=np.float32)
    for n in removed:
        g.node.remove(n)
    g.initializer.extend([numpy_helper.from_array(w, HEAD_WEIGHT), numpy_helper.from_array(b, HEAD_BIAS)])
    g.node.append(helper.make_node("Gemm", [feat_in, HEAD_WEIGHT, HEAD_BIAS], [LOGITS], name="taskedge_head",
                                   transB=1))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(LOGITS, onnx.TensorProto.FLOAT, ["batch", num_classes]))
    prune_unused_initializers(model)
    return {"params": [HEAD_WEIGHT, HEAD_BIAS], "size": int(w.size + b.size), "features": int(features),
            "replaced": [n.name for n in removed]}


def prepare_for_training(model: onnx.ModelProto) -> None:
    """Make the graph differentiable by ORT's gradient builder.

    LayerNormalization's gradient reads the saved Mean and InvStdDev, which torch.onnx
    leaves out (they are optional outputs); name them so the backward pass can use them.
    """
    for i, node in enumerate(model.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            base = node.name or f"layernorm_{i}"
            node.output.extend([f"{base}.taskedge_mean", f"{base}.taskedge_inv_std"])
