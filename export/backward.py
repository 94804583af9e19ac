"""Sparse backward: rewrite ORT's generated training graph so a scatter-path weight's
gradient is computed only where it is trainable.

ORT differentiates y = x @ W' (W' = W with the delta scattered in) like any MatMul: the
dense weight gradient x^T @ dy, one GEMM as large as the forward, of which the update then
reads `rows * k` entries. For each such layer this pass

1. replaces that GEMM with x[..., U]^T @ dy, where U is the set of input columns the layer's
   selection uses (MiniLM: 16-129 of 384/1536), gathered once in the forward pass;
2. rebuilds W' in the backward pass just before the GEMM that computes dx, so that the
   forward's copy of W' is freed after the forward op instead of living until backward.
   The rebuilt copy is tied to dy (rewrite.tie_after), so ORT cannot schedule it early.

Conv layers (Conv, depthwise and grouped included): ConvGrad's dense weight gradient is dropped
(its dX stays, lowered to ConvTranspose) and each selected entry's gradient is computed directly,
grouped by kernel offset (_rewrite_conv_layer).

All are exact: the same products are summed, only over fewer columns. A layer whose graph
does not show the expected pattern keeps ORT's dense gradient (`backward: dense`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from taskedge.runtime.bundle import LayerAllocation

from .graphedit import Emitter, GraphEdit
from .layers import node_attr
from .rewrite import FORWARD_TIE, tie_after


def _alpha(layer: LayerAllocation, fwd: onnx.NodeProto) -> Optional[float]:
    """The forward op's scale on x @ W' for the layouts handled (x is [..., cols]), else None."""
    if layer.op == "MatMul":
        return 1.0
    if layer.op == "Gemm" and not node_attr(fwd, "transA", 0):
        return float(node_attr(fwd, "alpha", 1.0))
    return None


def _rewrite_layer(G: GraphEdit, layer: LayerAllocation, idx_rows: np.ndarray) -> bool:
    w = layer.weight
    wp = f"{w}.taskedge_w_scattered"                           # names from rewrite._scatter_path
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
        G.after.setdefault(id(fwd), []).append(
            helper.make_node("Gather", [x, G.const(p + "_cols", cols_used)], [xu], name=xu, axis=-1))
        # W' waits for x[..., U] (not just x): ORT then gathers before the forward op, and x is
        # freed after it instead of living until backward (MiniLM: 27 MB of GELU outputs)
        tie = G.producer.get(f"{w}.taskedge_{FORWARD_TIE}_after_dims")
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
    G.before.setdefault(id(pick), []).extend(nodes)
    G.removed.update({id(pick), id(dense)})
    # backward: rebuild W' where dx needs it, ordered after dy exists
    later = [n for n in G.consumers.get(wp, []) if n is not fwd and n is not dense]
    if later:
        rebuilt = wp + "_bwd"
        nodes, tied = tie_after(scatter.input[2], upd_grad, p + "_upd_after_grad", G.const(p + "_zero", np.array([0], np.int64)))
        nodes.append(helper.make_node("ScatterElements", [scatter.input[0], scatter.input[1], tied], [rebuilt],
                                      name=rebuilt, axis=axis))
        first = later[0]
        G.before.setdefault(id(first), []).extend(nodes)
        for n in later:
            for i, name in enumerate(n.input):
                if name == wp:
                    n.input[i] = rebuilt
    return True


def _rewrite_conv_layer(G: GraphEdit, layer: LayerAllocation, idx_rows: np.ndarray) -> bool:
    """Conv: drop ConvGrad's dense weight gradient; compute the gradient of each selected entry
    (o, c, offset) as sum(dy[:, o] * x_pad[:, c_abs, offset + stride * p]), grouped by kernel offset
    (a channel Gather, a strided Slice, Mul, ReduceSum each)."""
    w = layer.weight
    wp, scattered = f"{w}.taskedge_w_new", f"{w}.taskedge_w_scattered"
    scatter = G.producer.get(scattered)
    grads = [n for n in G.consumers.get(wp, []) if n.op_type == "ConvGrad" and n.input[2] == wp]
    if scatter is None or scatter.op_type != "ScatterElements" or len(grads) != 1:
        return False
    cg = grads[0]
    upd_grad = scatter.input[2] + "_grad"
    pick = G.producer.get(upd_grad)
    if pick is None or pick.op_type != "GatherElements" or pick.input[0] != scattered + "_grad":
        return False
    kernel = [int(k) for k in layer.weight_shape[2:]]
    spatial = len(kernel)
    strides = list(node_attr(cg, "strides", [1] * spatial))
    dil = list(node_attr(cg, "dilations", [1] * spatial))
    pads = list(node_attr(cg, "pads", [0] * 2 * spatial))
    auto_pad = node_attr(cg, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
        return False
    rows, cg_in = layer.weight_shape[0], layer.weight_shape[1]
    group = int(node_attr(cg, "group", 1))
    dy, x = cg.input[0], cg.input[1]
    e = Emitter(G, f"{w}.taskedge_sbconv")
    if any(pads):
        x = e("Pad", [x, e.c([0, 0] + pads[:spatial] + [0, 0] + pads[spatial:])])
    out_sp = e("Slice", [e("Shape", [dy]), e.c([2]), e.c([2 + spatial])])
    axes_sp = e.c(list(range(2, 2 + spatial)))
    o_idx = np.repeat(np.arange(rows), idx_rows.shape[1])                 # entry order = delta's [rows, k]
    flat = idx_rows.reshape(-1).astype(np.int64)
    chan = flat // int(np.prod(kernel))
    offs = np.stack(np.unravel_index(flat % int(np.prod(kernel)), kernel), -1)   # [entries, spatial]
    c_abs = (o_idx // (rows // group)) * cg_in + chan
    parts, order = [], []
    for off in np.unique(offs, axis=0):
        sel = np.where((offs == off).all(1))[0]
        start = [int(o) * d for o, d in zip(off, dil)]
        end = e("Add", [e("Mul", [e("Sub", [out_sp, e.c([1] * spatial)]), e.c(strides)]),
                        e.c([s + 1 for s in start])])
        xs = e("Slice", [e("Gather", [x, e.c(c_abs[sel])], axis=1), e.c(start), end, axes_sp, e.c(strides)])
        ds = e("Gather", [dy, e.c(o_idx[sel])], axis=1)
        parts.append(e("ReduceSum", [e("Mul", [xs, ds]), e.c([0] + list(range(2, 2 + spatial)))], keepdims=0))
        order.append(sel)
    vals = e("Concat", parts, axis=0) if len(parts) > 1 else parts[0]
    inverse = np.argsort(np.concatenate(order))                            # back to delta's order
    e("Reshape", [e("Gather", [vals, e.c(inverse)], axis=0), e.c(list(idx_rows.shape))], upd_grad)
    G.replace(pick, e.nodes)
    cg.output[1] = ""                                                       # no dense weight gradient
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
        rewrite = _rewrite_conv_layer if layer.op == "Conv" else _rewrite_layer
        if rewrite(G, layer, indices[layer.weight]):
            layer.backward = "sparse"
            done += 1
    if done:
        G.commit()
    return done
