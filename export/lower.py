"""Lower ORT's training-only ops to standard ONNX, so the step graph runs in a plain
`onnxruntime.InferenceSession` (CPU wheel on aarch64, onnxruntime-gpu on JetPack).

ORT's gradient builder (host) emits a handful of `com.microsoft` training ops. Each has
a lowering below: the same math in standard ops (opset >= 13; the graphs here are 17).
`FusedMatMul` and `Gelu` are contrib ops of every onnxruntime build (CPU and CUDA), so
they stay. Any other non-standard op is an export error naming it.

op (com.microsoft)                    lowering
InPlaceAccumulatorV2(buf, g, reset)   removed by stepgraph.py: the gradient is a graph output (the runtime
                                      accumulates micro-batches)
ConcatTraining(xs)                    Concat(xs)
LayerNormalizationGrad(dy,x,s,mu,r)   xh=(x-mu)r; g=dy*s; dx=(g-mean(g)-xh*mean(g*xh))*r; ds=sum(dy*xh); db=sum(dy)
SimplifiedLayerNormalizationGrad      xh=x*r; g=dy*s; dx=(g-xh*mean(g*xh))*r; ds=sum(dy*xh)
GeluGrad(dy, x)                       dy*(Phi(x) + x*phi(x))
FastGeluGrad(dy, x)                   tanh form: dy*(0.5(1+t) + 0.5x(1-t^2)*c(1+3*0.044715x^2)), t=tanh(c(x+0.044715x^3))
BiasGeluGrad_dX(dy, x, b)             GeluGrad(dy, x+b)
QuickGeluGrad(dy, x; alpha)           s=sigmoid(alpha x); dy*s*(1+alpha x(1-s))
SoftmaxGrad_13(dy, y; axis)           y*(dy - sum(dy*y, axis))
LogSoftmaxGrad_13(dy, y; axis)        dy - exp(y)*sum(dy, axis)
SoftmaxCrossEntropyLossGrad(dl,lp,t)  (exp(lp) - onehot(t)) * w_t * dl / sum(w_t)  (mean; ignore_index masked)
ReluGrad(dy, y)                       dy where y > 0
SigmoidGrad(dy, y) / TanhGrad(dy, y)  dy*y*(1-y) / dy*(1-y^2)
Scale(x, s; scale_down)               x/s or x*s
ConvGrad(dy, x, w)                    dx: ConvTranspose(dy, w) cropped to x's shape (inference kernel);
                                      dw: per kernel offset, the strided slice of padded x times dy (grouped
                                      GEMMs); db: sum(dy). TaskEdge layers never ask for dw (backward.py).
GatherElementsGrad(dy, shape, i)      ScatterElements(zeros(shape), i, dy, reduction=add)
GatherGrad(shape, i, dy; axis)       ScatterND(zeros, i[..., None], dy, reduction=add), axis moved to the front
SliceGrad(dy, shape, st, en, ax)      Pad(dy) with the clamped starts/ends (unit steps)
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from taskedge.runtime.fsutil import UserError

from .graphedit import Emitter, GraphEdit
from .layers import node_attr

MS = "com.microsoft"
# Contrib ops kept as they are: present in every onnxruntime build, CPU and CUDA EPs.
KEPT_CONTRIB = {"FusedMatMul", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "SkipLayerNormalization",
                "SimplifiedLayerNormalization"}
STANDARD_DOMAINS = ("", "ai.onnx")

Lowering = Callable[[Emitter, onnx.NodeProto, "Context"], None]
LOWERINGS: Dict[str, Lowering] = {}


def lowering(*ops: str):
    def register(fn: Lowering) -> Lowering:
        for op in ops:
            LOWERINGS[op] = fn
        return fn
    return register


class Context:
    """What a lowering may need to know about the graph: tensor ranks (from shape inference)."""

    def __init__(self, model: onnx.ModelProto):
        self.used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.rank: Dict[str, int] = {}
        self.shape: Dict[str, list] = {}           # static dims where known (None for a symbolic one)
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=False)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                tt = vi.type.tensor_type
                if tt.HasField("shape"):
                    self.rank[vi.name] = len(tt.shape.dim)
                    self.shape[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        except Exception:  # noqa: BLE001 - ranks are a convenience; lowerings that need one say so
            pass
        for t in model.graph.initializer:
            self.rank[t.name] = len(t.dims)

    def rank_of(self, name: str, node: onnx.NodeProto) -> int:
        if name not in self.rank:
            raise UserError(f"lowering {node.op_type} ({node.name}): the rank of {name!r} is unknown; "
                            "export the model with static ranks (torch.onnx does)")
        return self.rank[name]


def _out(node: onnx.NodeProto, i: int) -> Optional[str]:
    return node.output[i] if len(node.output) > i and node.output[i] else None


def _in(node: onnx.NodeProto, i: int) -> Optional[str]:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _reduce(e: Emitter, op: str, x: str, axes, keepdims: int = 1, out: str = None) -> str:
    """ReduceSum takes its axes as an input from opset 13, the other reductions from opset 18."""
    if e.edit.opset >= (13 if op == "ReduceSum" else 18):
        return e(op, [x, e.c(list(axes))], out, keepdims=keepdims)
    return e(op, [x], out, axes=list(axes), keepdims=keepdims)


def _sum_to_shape_of(e: Emitter, t: str, like: str, out: str) -> str:
    """Sum `t` over its leading axes so that it has `like`'s shape (a LayerNorm scale/bias gradient)."""
    flat = e("Reshape", [t, e("Concat", [e.c([-1]), e("Shape", [like])], axis=0)])
    return _reduce(e, "ReduceSum", flat, [0], keepdims=0, out=out)


def _norm_axes(node: onnx.NodeProto, x: str, ctx: Context) -> List[int]:
    axis = int(node_attr(node, "axis", -1))
    if axis < 0:
        return list(range(axis, 0))
    rank = ctx.rank_of(x, node)
    return list(range(axis - rank, 0))


@lowering("ConcatTraining")
def _concat_training(e, node, ctx):
    if _out(node, 1) in ctx.used:
        raise UserError(f"ConcatTraining {node.name}: its per-input lengths output is used; no lowering for that")
    e("Concat", list(node.input), node.output[0], axis=int(node_attr(node, "axis", 0)))


@lowering("LayerNormalizationGrad", "SimplifiedLayerNormalizationGrad")
def _layer_norm_grad(e, node, ctx):
    simplified = node.op_type.startswith("Simplified")
    dy, x, scale = node.input[0], node.input[1], node.input[2]
    axes = _norm_axes(node, x, ctx)
    if simplified:                      # (dy, x, scale, inv_std)
        inv = node.input[3]
        xh = e("Mul", [x, inv])
    else:                               # (dy, x, scale, mean, inv_std)
        mean, inv = node.input[3], node.input[4]
        xh = e("Mul", [e("Sub", [x, mean]), inv])
    g = e("Mul", [dy, scale])
    t = e("Mul", [xh, _reduce(e, "ReduceMean", e("Mul", [g, xh]), axes)])
    if not simplified:
        t = e("Add", [t, _reduce(e, "ReduceMean", g, axes)])
    if _out(node, 0):
        e("Mul", [e("Sub", [g, t]), inv], node.output[0])
    if _out(node, 1):
        _sum_to_shape_of(e, e("Mul", [dy, xh]), scale, node.output[1])
    if not simplified and _out(node, 2):
        _sum_to_shape_of(e, dy, scale, node.output[2])


def _f(e: Emitter, value: float) -> str:
    return e.c(value, np.float32)


def _gelu_grad(e: Emitter, dy: str, x: str, out: str) -> None:
    cdf = e("Mul", [_f(e, 0.5), e("Add", [_f(e, 1.0), e("Erf", [e("Mul", [x, _f(e, 1 / math.sqrt(2))])])])])
    pdf = e("Mul", [_f(e, 1 / math.sqrt(2 * math.pi)), e("Exp", [e("Mul", [_f(e, -0.5), e("Mul", [x, x])])])])
    e("Mul", [dy, e("Add", [cdf, e("Mul", [x, pdf])])], out)


@lowering("GeluGrad")
def _gelu(e, node, ctx):
    _gelu_grad(e, node.input[0], node.input[1], node.output[0])


@lowering("BiasGeluGrad_dX")
def _bias_gelu(e, node, ctx):
    _gelu_grad(e, node.input[0], e("Add", [node.input[1], node.input[2]]), node.output[0])


@lowering("FastGeluGrad", "BiasFastGeluGrad_dX")
def _fast_gelu(e, node, ctx):
    dy, x = node.input[0], node.input[1]
    if _in(node, 2):
        x = e("Add", [x, node.input[2]])
    c, a = math.sqrt(2 / math.pi), 0.044715
    x2 = e("Mul", [x, x])
    t = e("Tanh", [e("Mul", [_f(e, c), e("Mul", [x, e("Add", [_f(e, 1.0), e("Mul", [_f(e, a), x2])])])])])
    left = e("Mul", [_f(e, 0.5), e("Add", [_f(e, 1.0), t])])
    sech2 = e("Sub", [_f(e, 1.0), e("Mul", [t, t])])
    inner = e("Mul", [_f(e, c), e("Add", [_f(e, 1.0), e("Mul", [_f(e, 3 * a), x2])])])
    right = e("Mul", [e("Mul", [_f(e, 0.5), x]), e("Mul", [sech2, inner])])
    e("Mul", [dy, e("Add", [left, right])], node.output[0])


@lowering("QuickGeluGrad")
def _quick_gelu(e, node, ctx):
    dy, x = node.input[0], node.input[1]
    alpha = float(node_attr(node, "alpha", 1.702))
    ax = e("Mul", [x, _f(e, alpha)])
    s = e("Sigmoid", [ax])
    e("Mul", [dy, e("Mul", [s, e("Add", [_f(e, 1.0), e("Mul", [ax, e("Sub", [_f(e, 1.0), s])])])])], node.output[0])


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
    s = _reduce(e, "ReduceSum", e("Mul", [dy, y]), _softmax_axes(node, y, ctx))
    e("Mul", [y, e("Sub", [dy, s])], node.output[0])


@lowering("LogSoftmaxGrad_13", "LogSoftmaxGrad")
def _log_softmax(e, node, ctx):
    dy, y = node.input[0], node.input[1]
    s = _reduce(e, "ReduceSum", dy, _softmax_axes(node, y, ctx))
    e("Sub", [dy, e("Mul", [e("Exp", [y]), s])], node.output[0])


@lowering("SoftmaxCrossEntropyLossGrad")
def _sce_grad(e, node, ctx):
    """dlogits for ONNX SoftmaxCrossEntropyLoss: (softmax - onehot) scaled by the reduction."""
    dloss, log_prob, labels = node.input[0], node.input[1], node.input[2]
    weight = _in(node, 3)
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
    dy, y = node.input[0], node.input[1]
    e("Where", [e("Greater", [y, _f(e, 0.0)]), dy, _f(e, 0.0)], node.output[0])


@lowering("SigmoidGrad")
def _sigmoid(e, node, ctx):
    dy, y = node.input[0], node.input[1]
    e("Mul", [dy, e("Mul", [y, e("Sub", [_f(e, 1.0), y])])], node.output[0])


@lowering("TanhGrad")
def _tanh(e, node, ctx):
    dy, y = node.input[0], node.input[1]
    e("Mul", [dy, e("Sub", [_f(e, 1.0), e("Mul", [y, y])])], node.output[0])


@lowering("Scale")
def _scale(e, node, ctx):
    x, s = node.input[0], node.input[1]
    s = e("CastLike", [s, x])
    e("Div" if node_attr(node, "scale_down", 0) else "Mul", [x, s], node.output[0])


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
    weight = _flipped_transposed_kernel(e, w, ctx, kernel, group) if _out(node, 0) else None
    if weight is not None and all(p <= r for p, r in zip(pads, reach + reach)) and (spatial == 2 or max(strides) == 1):
        _conv_input_grad(e, node, dy, x, weight, kernel, strides, dilations, pads, group, ctx)
    elif _out(node, 0):     # dX with the inference ConvTranspose kernel, cropped to x's shape
        full = e("ConvTranspose", [dy, w], strides=strides, dilations=dilations, group=group, pads=pads,
                 kernel_shape=kernel, output_padding=[s - 1 for s in strides])
        axes = list(range(2, 2 + spatial))
        e("Slice", [full, e.c([0] * spatial), e("Slice", [e("Shape", [x]), e.c([2]), e.c([2 + spatial])]),
                    e.c(axes)], node.output[0])
    if _out(node, 1):
        _conv_weight_grad(e, node, dy, x, w, kernel, strides, dilations, pads, group, node.output[1])
    if _out(node, 2):
        _reduce(e, "ReduceSum", dy, [0] + list(range(2, 2 + spatial)), keepdims=0, out=node.output[2])


def zero_upsample(e: Emitter, t: str, strides: List[int]) -> str:
    """[N, C, *S] -> [N, C, *((S - 1) * s + 1)] with s - 1 zeros between neighbours (2-D spatial)."""
    if all(s == 1 for s in strides):
        return t
    sh, sw = strides
    u = e("Unsqueeze", [t, e.c([3, 5])])                                           # [N, C, H, 1, W, 1]
    u = e("Pad", [u, e.c([0] * 6 + [0, 0, 0, sh - 1, 0, sw - 1])])                 # [N, C, H, sh, W, sw]
    dims = e("Shape", [t])
    hw = e("Mul", [e("Slice", [dims, e.c([2]), e.c([4])]), e.c([sh, sw])])
    u = e("Reshape", [u, e("Concat", [e("Slice", [dims, e.c([0]), e.c([2])]), hw], axis=0)])
    keep = e("Sub", [hw, e.c([sh - 1, sw - 1])])
    return e("Slice", [u, e.c([0, 0]), keep, e.c([2, 3])])


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


def _conv_input_grad(e, node, dy, x, weight, kernel, strides, dilations, pads, group, ctx):
    """dX as a plain Conv (onnxruntime's fast, prepacked path when the weight is constant): dy,
    zero-upsampled by the stride, padded by (k-1)*d - pad, convolved with the flipped kernel."""
    spatial = len(kernel)
    up = zero_upsample(e, dy, strides)
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


def _conv_weight_grad(e, node, dy, x, w, kernel, strides, dilations, pads, group, out):
    """dW[o, c, *off] = sum over batch and output positions of dy[n, o, p] * xpad[n, g(o)*Cg + c, p*s + off*d].

    Per kernel offset: a strided slice of the padded input, then a batched GEMM over groups."""
    spatial = len(kernel)
    xp = x
    if any(pads):
        xp = e("Pad", [x, e.c([0, 0] + pads[:spatial] + [0, 0] + pads[spatial:])])
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
        end = e("Add", [e("Mul", [e("Sub", [out_sp, e.c([1] * spatial)]), e.c(strides)]),
                        e.c([s + 1 for s in start])])
        xs = e("Slice", [xp, e.c(start), end, e.c(list(range(2, 2 + spatial))), e.c(strides)])   # [N, C, *P]
        xs = e("Reshape", [xs, e("Concat", [e.c([0]), g, e.c([-1]), e("ReduceProd", [out_sp], keepdims=1)],
                                     axis=0)])                                 # [N, G, Cg, P]
        xs = e("Transpose", [xs], perm=[1, 0, 3, 2])                           # [G, N, P, Cg]
        xs = e("Reshape", [xs, e("Concat", [g, e.c([-1]), e("Slice", [e("Shape", [xs]), e.c([3]), e.c([4])])],
                                     axis=0)])                                 # [G, N*P, Cg]
        cols.append(e("Unsqueeze", [e("MatMul", [dyg, xs]), e.c([-1])]))        # [G, Og, Cg, 1]
    stacked = e("Concat", cols, axis=-1) if len(cols) > 1 else cols[0]         # [G, Og, Cg, K]
    e("Reshape", [stacked, e("Shape", [w])], out)


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
    axes, steps = _in(node, 4), _in(node, 5)
    if steps is not None:
        raise UserError(f"SliceGrad {node.name}: strided slices have no lowering")
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
        if _out(node, i):
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
    if _out(node, 0):
        _sum_to(e, e("Div", [dy, b]), a, node.output[0])
    if _out(node, 1):
        _sum_to(e, e("Neg", [e("Div", [e("Mul", [dy, a]), e("Mul", [b, b])])]), b, node.output[1])


@lowering("DropoutGrad")
def _dropout_grad(e, node, ctx):
    dy, mask = node.input[0], node.input[1]
    ratio = _in(node, 2)
    keep = e("Sub", [_f(e, 1.0), e("CastLike", [ratio, dy])]) if ratio else _f(e, 0.5)
    e("Where", [mask, e("Div", [dy, keep]), _f(e, 0.0)], node.output[0])


@lowering("LeakyReluGrad")
def _leaky_relu(e, node, ctx):
    dy, y = node.input[0], node.input[1]
    alpha = float(node_attr(node, "alpha", 0.01))
    e("Where", [e("Greater", [y, _f(e, 0.0)]), dy, e("Mul", [dy, _f(e, alpha)])], node.output[0])


@lowering("SplitTraining")
def _split_training(e, node, ctx):
    outs = list(node.output)
    e.nodes.append(helper.make_node("Split", list(node.input[:2]), outs, name=f"{e.prefix}/Split",
                                    axis=int(node_attr(node, "axis", 0))))


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
    dbias = _reduce(e, "ReduceSum", dy, axes, keepdims=0, out=_out(node, 2))
    dscale = _reduce(e, "ReduceSum", e("Mul", [dy, xh]), axes, keepdims=0, out=_out(node, 1))
    if _out(node, 0):
        count = e("CastLike", [e("Div", [e("Size", [x]), e("Gather", [e("Shape", [x]), e.c(1)])]), dy])
        inner = e("Sub", [e("Sub", [e("Mul", [dy, count]), e("Reshape", [dbias, bshape])]),
                          e("Mul", [xh, e("Reshape", [dscale, bshape])])])
        k = e("Div", [e("Mul", [e("Reshape", [scale, bshape]), e("Reshape", [inv, bshape])]), count])
        e("Mul", [k, inner], node.output[0])


def runs_on_plain_ort(node: onnx.NodeProto) -> bool:
    """A standard ONNX op (ORT's training build also registers MaxPoolGrad etc. in the default
    domain: those are not in the ONNX standard) or a contrib op of every onnxruntime build."""
    if node.domain in STANDARD_DOMAINS:
        return onnx.defs.has(node.op_type)
    return node.domain == MS and node.op_type in KEPT_CONTRIB


def simplify_masked_gradients(model: onnx.ModelProto) -> int:
    """ORT's gradient of Clip (ReLU6) and similar: Mul(dy, Cast(mask, float)) -> Where(mask, dy, 0),
    one pass instead of two. Returns how many were rewritten."""
    edit = GraphEdit(model)
    done = 0
    for node in model.graph.node:
        if node.op_type != "Mul" or node.domain not in STANDARD_DOMAINS:
            continue
        for i, other in ((0, 1), (1, 0)):
            cast = edit.producer.get(node.input[i])
            if cast is None or cast.op_type != "Cast" or node_attr(cast, "to", 0) != onnx.TensorProto.FLOAT:
                continue
            mask = edit.producer.get(cast.input[0])
            if mask is None or mask.op_type not in ("And", "Or", "Not", "Greater", "Less", "GreaterOrEqual",
                                                     "LessOrEqual", "Equal"):
                continue
            e = Emitter(edit, f"{node.name or node.output[0]}/where")
            e("Where", [cast.input[0], node.input[other], e.c(0.0, np.float32)], node.output[0])
            edit.replace(node, e.nodes)
            done += 1
            break
    edit.commit()                       # a Cast no longer read is dropped with the dead nodes
    return done


def lower(model: onnx.ModelProto) -> Dict[str, int]:
    """Replace every training-only op in place; returns {op: count}. Unknown non-standard ops
    are an error naming them (nothing is half-lowered: the model is only changed on success)."""
    unknown = sorted({n.op_type for n in model.graph.node if not runs_on_plain_ort(n) and n.op_type not in LOWERINGS})
    if unknown:
        raise UserError(f"the training graph uses {', '.join(unknown)}, which plain onnxruntime lacks and "
                        f"TaskEdge cannot lower yet (lowered: {', '.join(sorted(LOWERINGS))}); "
                        "exclude the layers that need it (--exclude) or report the model")
    ctx = Context(model)
    edit = GraphEdit(model)
    counts: Dict[str, int] = {}
    for node in list(model.graph.node):
        if runs_on_plain_ort(node):
            continue
        e = Emitter(edit, f"{node.name or node.output[0]}/lowered")
        LOWERINGS[node.op_type](e, node, ctx)
        edit.replace(node, e.nodes)
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    edit.commit()
    simplify_masked_gradients(model)
    return counts
