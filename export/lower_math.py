"""Lowerings of ORT's training-only ops for activations, norms, softmax, the loss, and the
gather/slice/broadcast family (the table is in lower.py)."""
from __future__ import annotations

import math
from typing import List

import numpy as np
import onnx
from onnx import helper

from taskedge.runtime.fsutil import UserError

from .graph import Emitter
from .layers import node_attr
from .lower import Context, f32, lowering, opt_in, opt_out, reduce_axes


def _sum_to_shape_of(e: Emitter, t: str, like: str, out: str) -> str:
    """Sum `t` over its leading axes so that it has `like`'s shape (a LayerNorm scale/bias gradient)."""
    flat = e("Reshape", [t, e("Concat", [e.c([-1]), e("Shape", [like])], axis=0)])
    return reduce_axes(e, "ReduceSum", flat, [0], keepdims=0, out=out)


def _after_dy(e: Emitter, x: str, dy: str) -> str:
    """`x` as read by a backward formula, tied after the incoming gradient: what the formula
    computes from forward tensors alone (GELU's derivative, a norm's x-hat) would otherwise be run
    by onnxruntime in the forward pass and kept until the backward reaches it, a second
    activation-sized tensor per layer (SmolLM2's SiLU derivative: 66 MB at batch 4 x 94)."""
    return e.tie_after(x, dy, "_x_after_dy")


def _norm_axes(node: onnx.NodeProto, x: str, ctx: Context) -> List[int]:
    axis = int(node_attr(node, "axis", -1))
    if axis < 0:
        return list(range(axis, 0))
    rank = ctx.rank_of(x, node)
    return list(range(axis - rank, 0))


@lowering("ConcatTraining")
def _concat_training(e, node, ctx):
    axis = int(node_attr(node, "axis", 0))
    e("Concat", list(node.input), node.output[0], axis=axis)
    if opt_out(node, 1) in ctx.used:    # per-input lengths along `axis`: SplitTraining's split sizes
        e("Concat", [e("Gather", [e("Shape", [x]), e.c([axis])]) for x in node.input], node.output[1], axis=0)


@lowering("LayerNormalizationGrad", "SimplifiedLayerNormalizationGrad")
def _layer_norm_grad(e, node, ctx):
    simplified = node.op_type.startswith("Simplified")
    dy, x, scale = node.input[0], node.input[1], node.input[2]
    axes = _norm_axes(node, x, ctx)
    x = _after_dy(e, x, dy)
    if simplified:                      # (dy, x, scale, inv_std)
        inv = node.input[3]
        xh = e("Mul", [x, inv])
    else:                               # (dy, x, scale, mean, inv_std)
        mean, inv = node.input[3], node.input[4]
        xh = e("Mul", [e("Sub", [x, mean]), inv])
    g = e("Mul", [dy, scale])
    t = e("Mul", [xh, reduce_axes(e, "ReduceMean", e("Mul", [g, xh]), axes)])
    if not simplified:
        t = e("Add", [t, reduce_axes(e, "ReduceMean", g, axes)])
    if opt_out(node, 0):
        e("Mul", [e("Sub", [g, t]), inv], node.output[0])
    if opt_out(node, 1):
        _sum_to_shape_of(e, e("Mul", [dy, xh]), scale, node.output[1])
    if not simplified and opt_out(node, 2):
        _sum_to_shape_of(e, dy, scale, node.output[2])


def _gelu_grad(e: Emitter, dy: str, x: str, out: str) -> None:
    cdf = e("Mul", [f32(e, 0.5), e("Add", [f32(e, 1.0), e("Erf", [e("Mul", [x, f32(e, 1 / math.sqrt(2))])])])])
    pdf = e("Mul", [f32(e, 1 / math.sqrt(2 * math.pi)), e("Exp", [e("Mul", [f32(e, -0.5), e("Mul", [x, x])])])])
    e("Mul", [dy, e("Add", [cdf, e("Mul", [x, pdf])])], out)


@lowering("GeluGrad")
def _gelu(e, node, ctx):
    _gelu_grad(e, node.input[0], _after_dy(e, node.input[1], node.input[0]), node.output[0])


@lowering("BiasGeluGrad_dX")
def _bias_gelu(e, node, ctx):
    dy = node.input[0]
    _gelu_grad(e, dy, e("Add", [_after_dy(e, node.input[1], dy), node.input[2]]), node.output[0])


@lowering("FastGeluGrad", "BiasFastGeluGrad_dX")
def _fast_gelu(e, node, ctx):
    dy, x = node.input[0], _after_dy(e, node.input[1], node.input[0])
    if opt_in(node, 2):
        x = e("Add", [x, node.input[2]])
    c, a = math.sqrt(2 / math.pi), 0.044715
    x2 = e("Mul", [x, x])
    t = e("Tanh", [e("Mul", [f32(e, c), e("Mul", [x, e("Add", [f32(e, 1.0), e("Mul", [f32(e, a), x2])])])])])
    left = e("Mul", [f32(e, 0.5), e("Add", [f32(e, 1.0), t])])
    sech2 = e("Sub", [f32(e, 1.0), e("Mul", [t, t])])
    inner = e("Mul", [f32(e, c), e("Add", [f32(e, 1.0), e("Mul", [f32(e, 3 * a), x2])])])
    right = e("Mul", [e("Mul", [f32(e, 0.5), x]), e("Mul", [sech2, inner])])
    e("Mul", [dy, e("Add", [left, right])], node.output[0])


@lowering("QuickGeluGrad")
def _quick_gelu(e, node, ctx):
    dy, x = node.input[0], _after_dy(e, node.input[1], node.input[0])
    alpha = float(node_attr(node, "alpha", 1.702))
    ax = e("Mul", [x, f32(e, alpha)])
    s = e("Sigmoid", [ax])
    e("Mul", [dy, e("Mul", [s, e("Add", [f32(e, 1.0), e("Mul", [ax, e("Sub", [f32(e, 1.0), s])])])])], node.output[0])


def _softmax_axes(node, y, ctx) -> List[int]:
    axis = int(node_attr(node, "axis", 1 if node.op_type in ("SoftmaxGrad", "LogSoftmaxGrad") else -1))
    if node.op_type.endswith("_13"):
        return [axis]
    if axis == -1:                      # opset < 13 semantics: the trailing axes from `axis` on
        return [-1]
    rank = ctx.rank_of(y, node)
    axis = axis % rank
    return list(range(axis, rank))


@lowering("SoftmaxGrad_13", "SoftmaxGrad")
def _softmax(e, node, ctx):
    dy, y = node.input[0], node.input[1]
    s = reduce_axes(e, "ReduceSum", e("Mul", [dy, y]), _softmax_axes(node, y, ctx))
    e("Mul", [y, e("Sub", [dy, s])], node.output[0])


@lowering("LogSoftmaxGrad_13", "LogSoftmaxGrad")
def _log_softmax(e, node, ctx):
    dy, y = node.input[0], node.input[1]
    s = reduce_axes(e, "ReduceSum", dy, _softmax_axes(node, y, ctx))
    e("Sub", [dy, e("Mul", [e("Exp", [y]), s])], node.output[0])


@lowering("SoftmaxCrossEntropyLossGrad")
def _sce_grad(e, node, ctx):
    """dlogits for ONNX SoftmaxCrossEntropyLoss: (softmax - onehot) scaled by the reduction."""
    dloss, log_prob, labels = node.input[0], node.input[1], node.input[2]
    weight = opt_in(node, 3)
    reduction = node_attr(node, "reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    ignore = node_attr(node, "ignore_index", None)
    labels64 = e("Cast", [labels], to=onnx.TensorProto.INT64)
    mask = None
    if ignore is not None:
        mask = e("Not", [e("Equal", [labels64, e.c(int(ignore))])])
        labels64 = e("Where", [mask, labels64, e.c(0)])
    depth = e("Gather", [e("Shape", [log_prob]), e.c(1)])
    onehot = e("OneHot", [labels64, depth, e.c([0.0, 1.0], np.float32)], axis=1)
    diff = e("Sub", [e("Exp", [log_prob]), onehot])
    w = None                                                       # per-label weight, labels' shape
    if weight is not None:
        w = e("Gather", [weight, labels64])
    if mask is not None:
        m = e("Cast", [mask], to=onnx.TensorProto.FLOAT)
        w = m if w is None else e("Mul", [w, m])
    if reduction == "none":
        scale = dloss if w is None else e("Mul", [dloss, w])
    else:
        scale = dloss
        if w is not None:
            scale = e("Mul", [w, dloss])
        if reduction == "mean":
            denom = e("Cast", [e("Size", [labels64])], to=onnx.TensorProto.FLOAT) if w is None else \
                e("ReduceSum", [w], keepdims=0)
            scale = e("Div", [scale, denom])
    if w is not None or reduction == "none":
        scale = e("Unsqueeze", [scale, e.c([1])])                  # labels' shape -> the class axis
    e("Mul", [diff, scale], node.output[0])


@lowering("ReluGrad")
def _relu(e, node, ctx):
    dy, y = node.input[0], _after_dy(e, node.input[1], node.input[0])
    e("Where", [e("Greater", [y, f32(e, 0.0)]), dy, f32(e, 0.0)], node.output[0])


@lowering("SigmoidGrad")
def _sigmoid(e, node, ctx):
    dy, y = node.input[0], _after_dy(e, node.input[1], node.input[0])
    e("Mul", [dy, e("Mul", [y, e("Sub", [f32(e, 1.0), y])])], node.output[0])


@lowering("TanhGrad")
def _tanh(e, node, ctx):
    dy, y = node.input[0], _after_dy(e, node.input[1], node.input[0])
    e("Mul", [dy, e("Sub", [f32(e, 1.0), e("Mul", [y, y])])], node.output[0])


@lowering("Scale")
def _scale(e, node, ctx):
    x, s = node.input[0], node.input[1]
    s = e("CastLike", [s, x])
    e("Div" if node_attr(node, "scale_down", 0) else "Mul", [x, s], node.output[0])


@lowering("GatherElementsGrad")
def _gather_elements_grad(e, node, ctx):
    dy, shape, idx = node.input[0], node.input[1], node.input[2]
    zeros = e("ConstantOfShape", [shape], value=helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
    e("ScatterElements", [zeros, idx, dy], node.output[0], axis=int(node_attr(node, "axis", 0)), reduction="add")


@lowering("GatherGrad")
def _gather_grad(e, node, ctx):
    """Scatter-add dy back along `axis`: move that axis (and dy's index dims) to the front, ScatterND
    with reduction=add into zeros, move it back."""
    shape, idx, dy = node.input[0], node.input[1], node.input[2]
    r_dy, r_idx = ctx.rank_of(dy, node), ctx.rank_of(idx, node)
    rank = r_dy - r_idx + 1
    axis = int(node_attr(node, "axis", 0)) % rank
    idx64 = e("Cast", [idx], to=onnx.TensorProto.INT64)
    idx64 = e("Where", [e("Less", [idx64, e.c(0)]), e("Add", [idx64, e("Gather", [shape, e.c(axis)])]), idx64])
    perm_x = [axis] + [i for i in range(rank) if i != axis]
    index_dims = list(range(axis, axis + r_idx))
    perm_dy = index_dims + [i for i in range(r_dy) if i not in index_dims]
    dy_t = e("Transpose", [dy], perm=perm_dy) if perm_dy != list(range(r_dy)) else dy
    zeros = e("ConstantOfShape", [e("Gather", [shape, e.c(perm_x)]) if axis else shape],
              value=helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
    out = node.output[0] if not axis else None
    dx = e("ScatterND", [zeros, e("Unsqueeze", [idx64, e.c([-1])]), dy_t], out, reduction="add")
    if axis:
        e("Transpose", [dx], node.output[0], perm=[perm_x.index(i) for i in range(rank)])


@lowering("SliceGrad")
def _slice_grad(e, node, ctx):
    dy, shape, starts, ends = node.input[:4]
    axes, steps = opt_in(node, 4), opt_in(node, 5)
    if steps is not None:
        values = ctx.value(steps)
        if values is None or not (np.asarray(values) == 1).all():
            raise UserError(f"SliceGrad {node.name}: strided slices have no lowering")
        steps = None                                         # steps of 1 (torch.onnx writes them): a plain slice
    rank = ctx.rank_of(dy, node)
    if axes is None:
        axes = e.c(list(range(rank)))
    axes = e("Cast", [axes], to=onnx.TensorProto.INT64)
    axes = e("Where", [e("Less", [axes, e.c(0)]), e("Add", [axes, e.c(rank)]), axes])
    dims = e("Gather", [shape, axes])
    starts, ends = (e("Cast", [t], to=onnx.TensorProto.INT64) for t in (starts, ends))

    def clamp(v):
        v = e("Where", [e("Less", [v, e.c(0)]), e("Add", [v, dims]), v])
        return e("Min", [e("Max", [v, e.c(0)]), dims])

    begin = clamp(starts)
    after = e("Sub", [dims, clamp(ends)])
    # Pad's pads list all axes: scatter the per-axis values into zeros of length rank
    zeros = e.c([0] * rank)
    pads = e("Concat", [e("ScatterElements", [zeros, axes, begin], axis=0),
                        e("ScatterElements", [zeros, axes, after], axis=0)], axis=0)
    e("Pad", [dy, pads], node.output[0])


@lowering("ReduceSumTraining")
def _reduce_sum_training(e, node, ctx):
    e("ReduceSum", list(node.input), node.output[0], keepdims=int(node_attr(node, "keepdims", 1)),
      noop_with_empty_axes=int(node_attr(node, "noop_with_empty_axes", 0)))


def _padded_shape(e: Emitter, shape: str, rank: str) -> str:
    """`shape` with leading 1s up to length `rank` (both int64 tensors)."""
    ones = e("ConstantOfShape", [e("Sub", [rank, e("Shape", [shape])])],
             value=helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1]))
    return e("Concat", [ones, shape], axis=0)


@lowering("BroadcastGradientArgs")
def _broadcast_gradient_args(e, node, ctx):
    """The axes along which each operand was broadcast (right-aligned shapes; a 1 against a non-1)."""
    a, b = node.input[0], node.input[1]
    rank = e("Max", [e("Shape", [a]), e("Shape", [b])])
    pa, pb = _padded_shape(e, a, rank), _padded_shape(e, b, rank)
    for i, (mine, other) in enumerate(((pa, pb), (pb, pa))):
        if opt_out(node, i):
            mask = e("And", [e("Equal", [mine, e.c(1)]), e("Not", [e("Equal", [other, e.c(1)])])])
            e("Reshape", [e("NonZero", [mask]), e.c([-1])], node.output[i])


def _sum_to(e: Emitter, t: str, like: str, out: str) -> str:
    """Reduce a broadcast result `t` back to the shape of `like` (sum over the broadcast axes)."""
    target = e("Shape", [like])
    padded = _padded_shape(e, target, e("Shape", [e("Shape", [t])]))
    mask = e("And", [e("Equal", [padded, e.c(1)]), e("Not", [e("Equal", [e("Shape", [t]), e.c(1)])])])
    axes = e("Reshape", [e("NonZero", [mask]), e.c([-1])])
    summed = e("ReduceSum", [t, axes], keepdims=1, noop_with_empty_axes=1)
    return e("Reshape", [summed, target], out)


@lowering("DivGrad")
def _div_grad(e, node, ctx):
    dy, a, b = node.input[0], node.input[1], node.input[2]
    if opt_out(node, 0):
        _sum_to(e, e("Div", [dy, b]), a, node.output[0])
    if opt_out(node, 1):
        _sum_to(e, e("Neg", [e("Div", [e("Mul", [dy, a]), e("Mul", [b, b])])]), b, node.output[1])


@lowering("DropoutGrad")
def _dropout_grad(e, node, ctx):
    dy, mask = node.input[0], node.input[1]
    ratio = opt_in(node, 2)
    keep = e("Sub", [f32(e, 1.0), e("CastLike", [ratio, dy])]) if ratio else f32(e, 0.5)
    e("Where", [mask, e("Div", [dy, keep]), f32(e, 0.0)], node.output[0])


@lowering("LeakyReluGrad")
def _leaky_relu(e, node, ctx):
    dy, y = node.input[0], node.input[1]
    alpha = float(node_attr(node, "alpha", 0.01))
    e("Where", [e("Greater", [y, f32(e, 0.0)]), dy, e("Mul", [dy, f32(e, alpha)])], node.output[0])


@lowering("SplitTraining")
def _split_training(e, node, ctx):
    outs = list(node.output)
    e.nodes.append(helper.make_node("Split", list(node.input[:2]), outs, name=f"{e.prefix}/Split",
                                    axis=int(node_attr(node, "axis", 0))))
