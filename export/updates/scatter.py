"""The scatter formulation: y = op(x, W') with W' = ScatterElements(W, idx, GatherElements(W, idx)
+ delta), built just before the layer runs (tied to its input). backward.py later replaces the
dense weight gradient ORT derives for W' by one at the used columns only."""
from __future__ import annotations

import numpy as np

from ..graph import Emitter
from ..layers import WeightOp

FORWARD_TIE = "w_updated_after_x"     # W' is built once the layer's input exists (backward.py moves it to x[..., U])


def scatter(b: Emitter, op: WeightOp, idx_rows: np.ndarray, delta: str) -> str:
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
