"""Sparse backward for Conv layers (called by backward.py on ORT's generated training graph).

Every selected entry (o, c, offset) of a conv weight reads the strided window
`x_pad[:, c, offset*d + s*p]`; call its stack over the entries P [N, entries, Ho, Wo]. Then

    gradient of the entry  = sum over n, p of dy[:, o] * P[:, entry]

Full and pointwise convs compute P by a channel Gather and a strided Slice per kernel offset, one
offset at a time (so only that offset's windows are live: with all of P at once, 7 entries per
neuron made O-Net's step peak 275 vs 141 MB at 0.1 %), and drop ConvGrad's dense weight gradient. Depthwise convs (which onnxruntime runs slowly with a
non-constant weight) are rebuilt around the constant weight W: P_j is a depthwise conv of x with
a constant one-hot kernel (entry j of every channel), and

    forward   y  = Conv(x, W) + sum_j delta[:, j] * P_j
    backward  d delta[:, j] = sum(dy * P_j),   dx = ConvGrad_dX(dy, W) + sum_j ConvGrad_dX(dy * delta[:, j], one-hot j)

so every conv of the step runs on a constant weight (onnxruntime's prepacked NCHWc kernels;
lower.py turns ConvGrad's dX into a plain Conv). All of it is exact.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx

from taskedge.runtime.bundle import LayerAllocation

from .graph import Emitter, GraphEdit
from .layers import node_attr
from .lower_conv import strided_window


class _Conv:
    """The pieces of one scatter-path conv layer in ORT's training graph, and its selection."""

    def __init__(self, G: GraphEdit, layer: LayerAllocation, idx_rows: np.ndarray):
        w = self.w = layer.weight
        self.ok = False
        wp, scattered = f"{w}.taskedge_w_new", f"{w}.taskedge_w_scattered"
        self.scatter = G.producer.get(scattered)
        grads = [n for n in G.consumers.get(wp, []) if n.op_type == "ConvGrad" and n.input[2] == wp]
        fwds = [n for n in G.consumers.get(wp, []) if n.op_type == "Conv" and n.input[1] == wp]
        if self.scatter is None or self.scatter.op_type != "ScatterElements" or len(grads) != 1 or len(fwds) != 1:
            return
        self.cg, self.fwd = grads[0], fwds[0]
        self.upd_grad = self.scatter.input[2] + "_grad"
        self.pick = G.producer.get(self.upd_grad)
        if self.pick is None or self.pick.op_type != "GatherElements" or self.pick.input[0] != scattered + "_grad":
            return
        auto_pad = node_attr(self.cg, "auto_pad", b"NOTSET")
        if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
            return
        self.kernel = [int(k) for k in layer.weight_shape[2:]]
        sp = self.spatial = len(self.kernel)
        self.strides = list(node_attr(self.cg, "strides", [1] * sp))
        self.dil = list(node_attr(self.cg, "dilations", [1] * sp))
        self.pads = list(node_attr(self.cg, "pads", [0] * 2 * sp))
        self.group = int(node_attr(self.cg, "group", 1))
        self.rows, cg_in = layer.weight_shape[0], layer.weight_shape[1]
        self.k = idx_rows.shape[1]
        self.shape = idx_rows.shape
        self.idx = idx_rows
        self.depthwise = cg_in == 1 and self.group == self.rows and sp == 2
        # the rows that train (sub-neuron budgets: the others' delta is a constant zero, so their
        # entries need no gradient); entry order = delta's [rows, k] over those rows
        self.trained = None if layer.trained_rows is None else np.asarray(layer.trained_rows, np.int64)
        rows = np.arange(self.rows) if self.trained is None else self.trained
        o_idx = np.repeat(rows, self.k)
        flat = idx_rows[rows].reshape(-1).astype(np.int64)
        offs = np.stack(np.unravel_index(flat % int(np.prod(self.kernel)), self.kernel), -1)
        c_abs = (o_idx // (self.rows // self.group)) * cg_in + flat // int(np.prod(self.kernel))
        # entries grouped by kernel offset (one strided slice each); `order` = entry index per position
        self.groups, order = [], []
        for off in np.unique(offs, axis=0):
            sel = np.where((offs == off).all(1))[0]
            self.groups.append(([int(o) * d for o, d in zip(off, self.dil)], c_abs[sel], len(order), len(sel)))
            order.extend(sel.tolist())
        self.order = np.array(order)
        self.inverse = np.argsort(self.order)                              # positions back to entry order
        self.o_of = o_idx[self.order]                                       # output channel per position
        self.ok = True

    def window(self, e: Emitter, x: str, out_sp: str, group) -> str:
        """[N, entries of one kernel offset, Ho, Wo]: their input windows (a 1x1 conv of stride 1
        reads the whole input: no slice)."""
        start, chans, _, _ = group
        part = e("Gather", [x, e.c(chans)], axis=1)
        whole = all(k == 1 for k in self.kernel) and all(s == 1 for s in self.strides)
        return part if whole else strided_window(e, part, start, out_sp, self.strides)

    def padded(self, e: Emitter, x: str) -> str:
        sp = self.spatial
        return e("Pad", [x, e.c([0, 0] + self.pads[:sp] + [0, 0] + self.pads[sp:])]) if any(self.pads) else x


def rewrite_conv_layer(G: GraphEdit, layer: LayerAllocation, idx_rows: np.ndarray) -> bool:
    c = _Conv(G, layer, idx_rows)
    if not c.ok:
        return False
    return _constant_weight_depthwise(G, c) if c.depthwise else _sparse_weight_grad(G, c)


def _sparse_weight_grad(G: GraphEdit, c: _Conv) -> bool:
    """Drop ConvGrad's dense weight gradient; the selected entries' gradients from P and dy."""
    dy, x = c.cg.input[0], c.cg.input[1]
    e = Emitter(G, f"{c.w}.taskedge_sbconv")
    out_sp = e("Slice", [e("Shape", [dy]), e.c([2]), e.c([2 + c.spatial])])
    xp, axes = c.padded(e, x), [0] + list(range(2, 2 + c.spatial))
    vals = []
    for group in c.groups:        # one kernel offset at a time: its windows are freed before the next's
        _, _, at, n = group
        rows = c.o_of[at:at + n]                                                  # their output channels
        dys = dy if n == c.rows and (rows == np.arange(n)).all() else e("Gather", [dy, e.c(rows)], axis=1)
        vals.append(e.reduce("ReduceSum", e("Mul", [c.window(e, xp, out_sp, group), dys]), axes))
    vals = e("Concat", vals, axis=0) if len(vals) > 1 else vals[0]
    if (c.inverse != np.arange(len(c.inverse))).any():
        vals = e("Gather", [vals, e.c(c.inverse)], axis=0)
    if c.trained is None:
        e("Reshape", [vals, e.c(list(c.shape))], c.upd_grad)
    else:                                    # zeros where the rows do not train (k == 1)
        e("ScatterElements", [e.edit.const(f"{c.w}.taskedge_sbconv_zeros", np.zeros(c.shape, np.float32)),
                              e.c(c.trained.reshape(-1, 1)), e("Unsqueeze", [vals, e.c([1])])], c.upd_grad, axis=0)
    G.replace(c.pick, e.nodes)
    c.cg.output[1] = ""                                                     # no dense weight gradient
    return True


def _delta_of(G: GraphEdit, c: _Conv) -> Optional[str]:
    """The [rows, k] update tensor: the second input of `W[idx] + delta` (updates.scatter)."""
    add = G.producer.get(f"{c.w}.taskedge_w_updated")
    return add.input[1] if add is not None and add.op_type == "Add" else None


def _constant_weight_depthwise(G: GraphEdit, c: _Conv) -> bool:
    """Depthwise: every entry's window is a depthwise conv of x with a constant one-hot kernel
    (the selection is fixed at export), so forward, gradient and adjoint all run as convs with
    constant weights -- onnxruntime's fast depthwise path -- plus a few elementwise ops. With a
    budget below one entry per neuron only the trained channels R get windows; their terms are
    added at R by a ScatterND (one copy of y, of dx) instead of computed for every channel."""
    delta = _delta_of(G, c)
    if delta is None:
        return _sparse_weight_grad(G, c)
    sp = c.spatial
    rows, k = c.shape
    chans = np.arange(rows) if c.trained is None else c.trained          # the channels that train
    real = len(chans)
    if c.trained is not None and real % 4:
        # onnxruntime runs these one-hot depthwise convs on its fast NCHWc kernels only when their
        # channel count is a multiple of 4 (measured, [16, C, 32, 32]: 42 channels 1.48 ms, 44
        # channels 0.52 ms); pad with channels that do not train: zero kernels, so their terms are
        # exact zeros added where nothing else is, and their gradients land in rows that are zero
        idle = np.setdiff1d(np.arange(rows), chans)[:-real % 4]
        chans = np.concatenate([chans, idle]) if len(idle) == -real % 4 else chans
    n = len(chans)
    onehots = []
    for j in range(k):                                   # kernel j: entry (o, j) of every channel o in chans
        e_j = np.zeros([n, 1] + c.kernel, np.float32)
        for i, o in enumerate(chans[:real]):
            e_j[(i, 0) + tuple(np.unravel_index(int(c.idx[o, j]), c.kernel))] = 1.0
        onehots.append(G.const(f"{c.w}.taskedge_window_{j}", e_j))
    # forward: y = Conv(x, W) + sum_j delta[:, j] * P_j
    f = Emitter(G, f"{c.w}.taskedge_dwfwd")
    x, y, y0 = c.fwd.input[0], c.fwd.output[0], f"{c.w}.taskedge_dw_y0"
    c.fwd.input[1] = c.w
    c.fwd.output[0] = y0
    sub = (lambda e, t, axis: t) if c.trained is None else (lambda e, t, axis: e("Gather", [t, e.c(chans)], axis=axis))
    xs, d = sub(f, x, 1), sub(f, delta, 0)
    d_cols = [f("Reshape", [f("Gather", [d, f.c(j)], axis=1), f.c([1, n] + [1] * sp)]) for j in range(k)]
    windows = [f("Conv", [xs, e_j], kernel_shape=c.kernel, strides=c.strides, dilations=c.dil, pads=c.pads, group=n)
               for e_j in onehots]
    at = None if c.trained is None else _channel_index(f, x, chans)
    _add_at(f, y0, [f("Mul", [p, dj]) for p, dj in zip(windows, d_cols)], at, y)
    G.insert_after(c.fwd, f.nodes)
    # backward: d delta[:, j] = sum(dy * P_j) over batch and space (replacing ORT's pick from the dense gradient)
    dy = c.cg.input[0]
    b = Emitter(G, f"{c.w}.taskedge_dwbwd")
    dys = sub(b, dy, 1)
    axes = b.c([0] + list(range(2, 2 + sp)))
    cols = [b("Unsqueeze", [b("ReduceSum", [b("Mul", [dys, p]), axes], keepdims=0), b.c([1])]) for p in windows]
    if c.trained is None:
        b("Concat", cols, c.upd_grad, axis=1)
    else:                                                # zeros where the rows do not train
        b("ScatterElements", [G.const(f"{c.w}.taskedge_dw_zeros", np.zeros(c.shape, np.float32)),
                              b.c(np.repeat(chans.reshape(-1, 1), k, 1)), b("Concat", cols, axis=1)],
          c.upd_grad, axis=0)
    G.replace(c.pick, b.nodes)
    c.cg.input[2] = c.w                                  # constant: lowered to a Conv (lower.py)
    c.cg.output[1] = ""
    if not c.cg.output[0]:                               # the input needs no gradient
        return True
    # dx = ConvGrad_dX(dy, W) + sum_j ConvGrad_dX(dy * delta[:, j], one-hot j): constant weights again
    a = Emitter(G, f"{c.w}.taskedge_dwdx")
    dx = c.cg.output[0]
    c.cg.output[0] = f"{c.w}.taskedge_dw_dx0"
    grad_attrs = {att.name: onnx.helper.get_attribute_value(att) for att in c.cg.attribute}
    grad_attrs["group"] = n
    parts = []
    for j, e_j in enumerate(onehots):
        out = f"{c.w}.taskedge_dw_dx_window_{j}"
        a.nodes.append(onnx.helper.make_node("ConvGrad", [a("Mul", [dys, d_cols[j]]), xs, e_j], [out, "", ""],
                                             name=out, domain="com.microsoft", **grad_attrs))
        parts.append(out)
    _add_at(a, c.cg.output[0], parts, at, dx)
    G.insert_after(c.cg, a.nodes)
    return True


def _channel_index(e: Emitter, x: str, chans: np.ndarray) -> str:
    """[N, len(chans), 2] indices (n, chans[i]) of a ScatterND that writes whole [H, W] planes."""
    n = len(chans)
    batch = e("Slice", [e("Shape", [x]), e.c([0]), e.c([1])])
    ns = e("Range", [e.c(0), e("Squeeze", [batch, e.c([0])]), e.c(1)])
    dims = e("Concat", [batch, e.c([n, 1])], axis=0)
    b_idx = e("Expand", [e("Reshape", [ns, e.c([-1, 1, 1])]), dims])
    c_idx = e("Expand", [e.c(chans.reshape(1, n, 1)), dims])
    return e("Concat", [b_idx, c_idx], axis=2)


def _add_at(e: Emitter, base: str, terms: List[str], at: Optional[str], out: str) -> None:
    """out = base + the sum of terms, added at the channels of `at` (all channels when None)."""
    if at is None:
        e("Sum", [base] + terms, out)
        return
    e("ScatterND", [base, at, e("Sum", terms) if len(terms) > 1 else terms[0]], out, reduction="add")
