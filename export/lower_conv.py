"""Lowerings of ORT's training-only ops for CNNs: ConvGrad (dX as a plain Conv on the flipped
kernel, prepacked when the weight is constant; dW per kernel offset), MaxPoolGrad, BatchNormalizationGrad
(the table is in lower.py)."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from taskedge.runtime.fsutil import UserError

from .graph import Emitter
from .layers import node_attr
from .lower import Context, lowering, opt_out, reduce_axes


def _conv_attrs(node: onnx.NodeProto, spatial: int):
    auto_pad = node_attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise UserError(f"ConvGrad {node.name}: auto_pad={auto_pad} has no lowering; export the model with "
                        "explicit pads (torch.onnx does)")
    strides = list(node_attr(node, "strides", [1] * spatial))
    dilations = list(node_attr(node, "dilations", [1] * spatial))
    pads = list(node_attr(node, "pads", [0] * 2 * spatial)) if auto_pad == "NOTSET" else [0] * 2 * spatial
    return strides, dilations, pads, int(node_attr(node, "group", 1))


@lowering("ConvGrad")
def _conv_grad(e, node, ctx):
    dy, x, w = node.input[0], node.input[1], node.input[2]
    spatial = ctx.rank_of(w, node) - 2
    kernel = list(node_attr(node, "kernel_shape", []))
    if len(kernel) != spatial:
        raise UserError(f"ConvGrad {node.name}: no kernel_shape attribute; cannot lower it")
    strides, dilations, pads, group = _conv_attrs(node, spatial)
    reach = [(k - 1) * d for k, d in zip(kernel, dilations)]
    weight = _flipped_transposed_kernel(e, w, ctx, kernel, group) if opt_out(node, 0) else None
    channels = (ctx.shape.get(w) or [None])[0]
    if weight is not None and all(p <= r for p, r in zip(pads, reach + reach)) and (channels or max(strides) == 1):
        _conv_input_grad(e, node, dy, x, weight, kernel, strides, dilations, pads, group, ctx, channels)
    elif opt_out(node, 0):     # dX with the inference ConvTranspose kernel, cropped to x's shape
        full = e("ConvTranspose", [dy, w], strides=strides, dilations=dilations, group=group, pads=pads,
                 kernel_shape=kernel, output_padding=[s - 1 for s in strides])
        axes = list(range(2, 2 + spatial))
        e("Slice", [full, e.c([0] * spatial), e("Slice", [e("Shape", [x]), e.c([2]), e.c([2 + spatial])]),
                    e.c(axes)], node.output[0])
    if opt_out(node, 1):
        depthwise = group > 1 and (ctx.shape.get(w) or [None])[:2] == [group, 1]
        (_depthwise_weight_grad if depthwise else _conv_weight_grad)(e, node, dy, x, w, kernel, strides, dilations,
                                                                   pads, group, node.output[1])
    if opt_out(node, 2):
        reduce_axes(e, "ReduceSum", dy, [0] + list(range(2, 2 + spatial)), keepdims=0, out=node.output[2])


def zero_upsample(e: Emitter, t: str, strides: List[int], channels: int) -> str:
    """[N, C, *S] -> [N, C, *((S - 1) * s + 1)] with s - 1 zeros between neighbours: a depthwise
    ConvTranspose with a constant 1x1 kernel of ones (measured: 1.1 ms where a 6-D Pad took 9 ms)."""
    if all(s == 1 for s in strides):
        return t
    ones = e.edit.shared_const(np.ones([channels, 1] + [1] * len(strides)), np.float32)
    return e("ConvTranspose", [t, ones], strides=strides, group=channels, kernel_shape=[1] * len(strides))


def _flipped_transposed_kernel(e: Emitter, w: str, ctx: Context, kernel: List[int], group: int) -> Optional[str]:
    """The kernel of dX as a Conv: W [O, Cg, *k] flipped in space and transposed within each group
    -> [G*Cg, O/G, *k]. Precomputed for a constant weight; a few small ops for a computed one."""
    flip = tuple(slice(None, None, -1) for _ in kernel)
    if w in ctx.inits:
        wa = numpy_helper.to_array(ctx.inits[w])
        o, cg = wa.shape[:2]
        wt = wa[(slice(None), slice(None)) + flip].reshape(group, o // group, cg, *kernel).swapaxes(1, 2)
        return e.edit.const(f"{w}.taskedge_dx_kernel", np.ascontiguousarray(wt.reshape(group * cg, o // group, *kernel)))
    shape = ctx.shape.get(w)
    if not shape or any(d is None for d in shape[:2]):
        return None
    o, cg = shape[:2]
    grouped = e("Reshape", [w, e.c([group, o // group, cg] + kernel)])
    swapped = e("Transpose", [grouped], perm=[0, 2, 1] + list(range(3, 3 + len(kernel))))
    wt = e("Reshape", [swapped, e.c([group * cg, o // group] + kernel)])
    if all(k == 1 for k in kernel):
        return wt
    n = len(kernel)
    return e("Slice", [wt, e.c([-1] * n), e.c([-(2 ** 62)] * n), e.c(list(range(2, 2 + n))), e.c([-1] * n)])


def _conv_input_grad(e, node, dy, x, weight, kernel, strides, dilations, pads, group, ctx, channels):
    """dX as a plain Conv (onnxruntime's fast, prepacked path when the weight is constant): dy,
    zero-upsampled by the stride, padded by (k-1)*d - pad, convolved with the flipped kernel."""
    spatial = len(kernel)
    up = zero_upsample(e, dy, strides, channels)
    begin = [(k - 1) * d - p for k, d, p in zip(kernel, dilations, pads[:spatial])]
    xs = ctx.shape.get(x)
    if xs and len(xs) == 2 + spatial and all(isinstance(v, int) and v > 0 for v in xs[2:]):
        out = [(h + pb + pe - (k - 1) * d - 1) // s + 1 for h, pb, pe, k, d, s in
               zip(xs[2:], pads[:spatial], pads[spatial:], kernel, dilations, strides)]
        end = [h + pb - ((o - 1) * s + 1) for h, pb, o, s in zip(xs[2:], pads[:spatial], out, strides)]
        e("Conv", [up, weight], node.output[0], dilations=dilations, group=group, kernel_shape=kernel,
          pads=begin + end)                                                   # static: no Pad op
        return
    x_sp = e("Slice", [e("Shape", [x]), e.c([2]), e.c([2 + spatial])])
    up_sp = e("Slice", [e("Shape", [up]), e.c([2]), e.c([2 + spatial])])
    end = e("Sub", [e("Add", [x_sp, e.c(pads[:spatial])]), up_sp])               # H + pb - U (>= 0)
    pad = e("Concat", [e.c([0, 0] + begin), e.c([0, 0]), end], axis=0)
    e("Conv", [e("Pad", [up, pad]), weight], node.output[0], dilations=dilations, group=group, kernel_shape=kernel)


def strided_window(e: Emitter, x: str, start: List[int], out_sp: str, strides: List[int]) -> str:
    """x[:, :, start + s*p] for every output position p (out_sp: the output's spatial dims), the
    input window of one kernel offset of a conv on the padded input x."""
    n = len(start)
    end = e("Add", [e("Mul", [e("Sub", [out_sp, e.c([1] * n)]), e.c(strides)]), e.c([s + 1 for s in start])])
    return e("Slice", [x, e.c(start), end, e.c(list(range(2, 2 + n))), e.c(strides)])


def _conv_weight_grad(e, node, dy, x, w, kernel, strides, dilations, pads, group, out):
    """dW[o, c, *off] = sum over batch and output positions of dy[n, o, p] * xpad[n, g(o)*Cg + c, p*s + off*d].

    Per kernel offset: a strided slice of the padded input, then a batched GEMM over groups."""
    spatial = len(kernel)
    xp = _padded(e, x, pads, spatial)
    dy_shape = e("Shape", [dy])
    out_sp = e("Slice", [dy_shape, e.c([2]), e.c([2 + spatial])])             # output spatial dims
    g = e.c([group])
    n_o = e("Slice", [dy_shape, e.c([0]), e.c([2])])                           # [N, O]
    dy4 = e("Reshape", [dy, e("Concat", [n_o, e.c([-1])], axis=0)])            # [N, O, P]
    p_dim = e("Slice", [e("Shape", [dy4]), e.c([2]), e.c([3])])
    dyg = e("Reshape", [dy4, e("Concat", [e.c([0]), g, e.c([-1]), p_dim], axis=0)])   # [N, G, Og, P]
    dyg = e("Transpose", [dyg], perm=[1, 2, 0, 3])                             # [G, Og, N, P]
    dyg = e("Reshape", [dyg, e("Concat", [g, e.c([0]), e.c([-1])], axis=0)])   # [G, Og, N*P]
    cols = []
    offsets = np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"), -1).reshape(-1, spatial)
    for off in offsets:
        start = [int(o) * d for o, d in zip(off, dilations)]
        xs = strided_window(e, xp, start, out_sp, strides)                                        # [N, C, *P]
        xs = e("Reshape", [xs, e("Concat", [e.c([0]), g, e.c([-1]), e("ReduceProd", [out_sp], keepdims=1)],
                                     axis=0)])                                 # [N, G, Cg, P]
        xs = e("Transpose", [xs], perm=[1, 0, 3, 2])                           # [G, N, P, Cg]
        xs = e("Reshape", [xs, e("Concat", [g, e.c([-1]), e("Slice", [e("Shape", [xs]), e.c([3]), e.c([4])])],
                                     axis=0)])                                 # [G, N*P, Cg]
        cols.append(e("Unsqueeze", [e("MatMul", [dyg, xs]), e.c([-1])]))        # [G, Og, Cg, 1]
    stacked = e("Concat", cols, axis=-1) if len(cols) > 1 else cols[0]         # [G, Og, Cg, K]
    e("Reshape", [stacked, e("Shape", [w])], out)


def _padded(e, x, pads, spatial):
    return e("Pad", [x, e.c([0, 0] + pads[:spatial] + [0, 0] + pads[spatial:])]) if any(pads) else x


def _depthwise_weight_grad(e, node, dy, x, w, kernel, strides, dilations, pads, group, out):
    """Depthwise (one input and one output channel per group): dW[c, 0, *off] = sum over batch and
    output positions of dy[n, c, p] * xpad[n, c, p*s + off*d], an elementwise Mul + ReduceSum per
    kernel offset. The batched-GEMM form above transposes dy and every window into [C, ...] layout
    first (measured on MobileNetV2's full-FT step, batch 16: Transpose alone 360 of 1,210 ms)."""
    spatial = len(kernel)
    xp = _padded(e, x, pads, spatial)
    out_sp = e("Slice", [e("Shape", [dy]), e.c([2]), e.c([2 + spatial])])
    axes = [0] + list(range(2, 2 + spatial))
    cols = []
    offsets = np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"), -1).reshape(-1, spatial)
    for off in offsets:
        xs = strided_window(e, xp, [int(o) * d for o, d in zip(off, dilations)], out_sp, strides)   # [N, C, *P]
        cols.append(e.unsqueeze(e.reduce("ReduceSum", e("Mul", [xs, dy]), axes), -1, f"_dw{len(cols)}"))  # [C, 1]
    stacked = e("Concat", cols, axis=-1) if len(cols) > 1 else cols[0]                              # [C, K]
    e("Reshape", [stacked, e("Shape", [w])], out)


@lowering("MaxPoolGrad")
def _max_pool_grad(e, node, ctx):
    """Scatter-add dy at MaxPool's flat N*C*H*W indices into zeros of the input's (static) shape."""
    dy, idx = node.input[0], node.input[1]
    shape = ctx.shape.get(node.output[0])
    if not shape or any(d is None for d in shape[1:]):
        raise UserError(f"MaxPoolGrad {node.name}: the pooled input's shape is not static; cannot lower it")
    dims = e("Concat", [e("Slice", [e("Shape", [dy]), e.c([0]), e.c([1])]), e.c(shape[1:])], axis=0)
    flat = e("ConstantOfShape", [e("ReduceProd", [dims], keepdims=1)],
             value=helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
    dx = e("ScatterElements", [flat, e("Reshape", [idx, e.c([-1])]), e("Reshape", [dy, e.c([-1])])],
           axis=0, reduction="add")
    e("Reshape", [dx, dims], node.output[0])


@lowering("BatchNormalizationGrad")
def _batch_norm_grad(e, node, ctx):
    """(dy, x, scale, saved_mean, saved_inv_std) -> dx, dscale, dbias over N and the spatial axes."""
    dy, x, scale, mean, inv = node.input[:5]
    rank = ctx.rank_of(x, node)
    axes = [0] + list(range(2, rank))
    bshape = e.c([1, -1] + [1] * (rank - 2))
    xh = e("Mul", [e("Sub", [x, e("Reshape", [mean, bshape])]), e("Reshape", [inv, bshape])])
    dbias = reduce_axes(e, "ReduceSum", dy, axes, keepdims=0, out=opt_out(node, 2))
    dscale = reduce_axes(e, "ReduceSum", e("Mul", [dy, xh]), axes, keepdims=0, out=opt_out(node, 1))
    if opt_out(node, 0):
        count = e("CastLike", [e("Div", [e("Size", [x]), e("Gather", [e("Shape", [x]), e.c(1)])]), dy])
        inner = e("Sub", [e("Sub", [e("Mul", [dy, count]), e("Reshape", [dbias, bshape])]),
                          e("Mul", [xh, e("Reshape", [dscale, bshape])])])
        k = e("Div", [e("Mul", [e("Reshape", [scale, bshape]), e("Reshape", [inv, bshape])]), count])
        e("Mul", [k, inner], node.output[0])
