"""Sparse backward: rewrite ORT's generated training graph so a scatter-path weight's
gradient is computed only where it is trainable.

ORT differentiates y = x @ W' (W' = W with the delta scattered in) like any MatMul: the
dense weight gradient x^T @ dy, one GEMM as large as the forward, of which the update then
reads `rows * k` entries. For each such layer this pass

1. replaces that GEMM with x[..., U]^T @ dy, where U is the set of input columns the layer's
   selection uses (MiniLM: 16-129 of 384/1536), gathered once in the forward pass;
2. rebuilds W' in the backward pass just before the GEMM that computes dx, so that the
   forward's copy of W' is freed after the forward op instead of living until backward.
   The rebuilt copy is tied to dy (graph.Emitter.tie_after), so ORT cannot schedule it early.

Conv layers (Conv, depthwise and grouped included): ConvGrad's dense weight gradient is dropped
(its dX stays, lowered to ConvTranspose) and each selected entry's gradient is computed directly,
grouped by kernel offset; depthwise layers keep their constant weight (backward_conv.py).

All are exact: the same products are summed, only over fewer columns. A layer whose graph
does not show the expected pattern keeps ORT's dense gradient (`backward: dense`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper

from taskedge.runtime.bundle import LayerAllocation

from .backward_conv import rewrite_conv_layer
from .graph import Emitter, GraphEdit
from .layers import node_attr
from .updates.scatter import FORWARD_TIE


def _alpha(layer: LayerAllocation, fwd: onnx.NodeProto) -> Optional[float]:
    """The forward op's scale on x @ W' for the layouts handled (x is [..., cols]), else None."""
    if layer.op == "MatMul":
        return 1.0
    if layer.op == "Gemm" and not node_attr(fwd, "transA", 0):
        return float(node_attr(fwd, "alpha", 1.0))
    return None


def _rewrite_layer(G: GraphEdit, layer: LayerAllocation, idx_rows: np.ndarray) -> bool:
    w = layer.weight
    wp = f"{w}.taskedge_w_scattered"                           # names from updates.scatter
    scatter = G.producer.get(wp)
    if scatter is None or scatter.op_type != "ScatterElements":
        return False
    upd_grad = scatter.input[2] + "_grad"                      # ORT's name for the updates' gradient
    fwd = next((n for n in G.consumers.get(wp, []) if n.op_type in ("MatMul", "Gemm") and n.input[1] == wp), None)
    dense = G.producer.get(wp + "_grad")
    pick = G.producer.get(upd_grad)
    if not (fwd and dense and pick) or pick.op_type != "GatherElements" or pick.input[0] != wp + "_grad":
        return False
    alpha = _alpha(layer, fwd)
    dy = fwd.output[0] + "_grad"
    if alpha is None or dy not in G.producer or len(G.consumers.get(wp + "_grad", [])) != 1:
        return False
    axis = node_attr(scatter, "axis", 0)                       # 0: W' [cols, rows]; 1: W' [rows, cols]
    x = fwd.input[0]
    p = f"{w}.taskedge_sb"
    idx = idx_rows.astype(np.int64)                            # [rows, k]
    cols_used, pos = np.unique(idx, return_inverse=True)
    pos = pos.reshape(idx.shape)
    if 2 * len(cols_used) > layer.cols:          # most columns used (large budgets): gathering costs more
        xu, cols_used, pos = x, np.arange(layer.cols), idx
    else:                                        # forward: keep only the used columns of x
        xu = p + "_x_used"
        G.insert_after(fwd, [
            helper.make_node("Gather", [x, G.const(p + "_cols", cols_used)], [xu], name=xu, axis=-1)])
        # W' waits for x[..., U] (not just x): ORT then gathers before the forward op, and x is
        # freed after it instead of living until backward (MiniLM: 27 MB of GELU outputs)
        tie = G.producer.get(f"{w}.taskedge_{FORWARD_TIE}_after_flat")
        if tie is not None and tie.input[0] == x:
            tie.input[0] = xu
    # backward: the gradient at the used columns only, then the selected entries
    xu2 = p + "_x_used_2d"
    dy2 = p + "_dy_2d"
    g = p + "_grad_used"
    nodes = [helper.make_node("Reshape", [xu, G.const(p + "_s_x", np.array([-1, len(cols_used)], np.int64))],
                              [xu2], name=xu2),
             helper.make_node("Reshape", [dy, G.const(p + "_s_dy", np.array([-1, layer.rows], np.int64))],
                              [dy2], name=dy2)]
    if axis == 0:   # W' [cols, rows]: grad [u, rows], entries at (pos[o, j], o)
        nodes.append(helper.make_node("Gemm", [xu2, dy2], [g], name=g, transA=1, alpha=alpha))
        gather_idx = np.ascontiguousarray(pos.T)               # [k, rows], as the forward scatter
    else:           # W' [rows, cols]: grad [rows, u], entries at (o, pos[o, j])
        nodes.append(helper.make_node("Gemm", [dy2, xu2], [g], name=g, transA=1, alpha=alpha))
        gather_idx = pos                                       # [rows, k]
    nodes.append(helper.make_node("GatherElements", [g, G.const(p + "_pos", gather_idx)], [upd_grad],
                                  name=p + "_pick", axis=axis))
    G.insert_before(pick, nodes)
    G.remove(pick, dense)
    # backward: rebuild W' where dx needs it, ordered after dy exists
    later = [n for n in G.consumers.get(wp, []) if n is not fwd and n is not dense]
    if later:
        rebuilt = wp + "_bwd"
        e = Emitter(G, p)
        tied = e.tie_after(scatter.input[2], upd_grad, "_upd_after_grad")
        e("ScatterElements", [scatter.input[0], scatter.input[1], tied], rebuilt, axis=axis)
        G.insert_before(later[0], e.nodes)
        G.rewire(wp, rebuilt, later)
    return True


def sparsify_backward(model: onnx.ModelProto, table: List[LayerAllocation],
                      indices: Dict[str, np.ndarray]) -> int:
    """Rewrite the training graph in place; marks each rewritten layer `backward="sparse"`.
    Returns how many layers were rewritten."""
    G = GraphEdit(model)
    done = 0
    for layer in table:
        if layer.formulation != "scatter":
            continue
        rewrite = rewrite_conv_layer if layer.op == "Conv" else _rewrite_layer
        if rewrite(G, layer, indices[layer.weight]):
            layer.backward = "sparse"
            done += 1
    if done:
        G.commit()
    return done
