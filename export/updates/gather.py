"""The gather formulations: y = op(x, W) + ReduceSum(Gather(x, idx) * delta, -1). No dense
update is ever built; three layouts of the same math, whose lowered gradients cost differently
(README "Update formulations"). Each returns the name of the new output (the Add)."""
from __future__ import annotations

import numpy as np

from ..graph import Emitter
from ..layers import WeightOp, node_attr


def _times_alpha(b: Emitter, op: WeightOp, update: str) -> str:
    """Gemm computes alpha * A @ B: the update's output term is scaled the same way, so that
    delta lives in weight space (what `merge` adds to W)."""
    alpha = float(node_attr(op.node, "alpha", 1.0)) if op.op == "Gemm" else 1.0
    if alpha == 1.0:
        return update
    return b.node("Mul", [update, b.init("alpha", np.array(alpha, dtype=np.float32))], "update_scaled")


def gather(b: Emitter, op: WeightOp, idx_rows: np.ndarray, delta: str, y: str) -> str:
    """Extra output ReduceSum(Gather(x, idx) * delta) added to y."""
    idx = b.init("idx", idx_rows)
    axis = -1 if op.op == "MatMul" else 1
    g = b.node("Gather", [op.activation, idx], "gathered", axis=axis)     # [..., rows, k]
    m = b.node("Mul", [g, delta], "weighted")
    s = b.reduce_sum(m, -1, "update_out")                                # [..., rows]
    s = _times_alpha(b, op, s)
    return b.node("Add", [y, s], "out")


def gather_rows(b: Emitter, op: WeightOp, idx_rows: np.ndarray, delta: str, y: str) -> str:
    """Like `gather`, but gathers whole rows of the transposed input ([cols, tokens]).

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


def gather_elements(b: Emitter, op: WeightOp, idx_rows: np.ndarray, delta: str, y: str) -> str:
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
