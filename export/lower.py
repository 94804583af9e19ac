"""Lower ORT's training-only ops to standard ONNX, so the step graph runs in a plain
`onnxruntime.InferenceSession` (CPU wheel on aarch64, onnxruntime-gpu on JetPack).

ORT's gradient builder (host) emits a handful of `com.microsoft` training ops. Each has a
lowering (in lower_math.py and lower_conv.py; this module is the registry and the driver): the
same math in standard ops (opset >= 13; the graphs here are 17).
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

from typing import Callable, Dict, Optional

import numpy as np
import onnx
from onnx import numpy_helper
from onnx import shape_inference

from taskedge.runtime.fsutil import UserError

from .graph import Emitter, GraphEdit

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
            from .artifacts import structure     # the graph without its weights: no 2 GB limit
            inferred = shape_inference.infer_shapes(structure(model)[0], strict_mode=False)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                tt = vi.type.tensor_type
                if tt.HasField("shape"):
                    self.rank[vi.name] = len(tt.shape.dim)
                    self.shape[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        except Exception:  # noqa: BLE001 - ranks are a convenience; lowerings that need one say so
            pass
        for t in model.graph.initializer:
            self.rank[t.name] = len(t.dims)
            self.shape[t.name] = [int(d) for d in t.dims]
        self.constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}

    def value(self, name: str):
        """The value of a constant tensor (an initializer or a Constant node), else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.constants.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def rank_of(self, name: str, node: onnx.NodeProto) -> int:
        if name not in self.rank:
            raise UserError(f"lowering {node.op_type} ({node.name}): the rank of {name!r} is unknown; "
                            "export the model with static ranks (torch.onnx does)")
        return self.rank[name]


def opt_out(node: onnx.NodeProto, i: int) -> Optional[str]:
    return node.output[i] if len(node.output) > i and node.output[i] else None


def opt_in(node: onnx.NodeProto, i: int) -> Optional[str]:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def reduce_axes(e: Emitter, op: str, x: str, axes, keepdims: int = 1, out: str = None) -> str:
    """ReduceSum takes its axes as an input from opset 13, the other reductions from opset 18."""
    if e.edit.opset >= (13 if op == "ReduceSum" else 18):
        return e(op, [x, e.c(list(axes))], out, keepdims=keepdims)
    return e(op, [x], out, axes=list(axes), keepdims=keepdims)


def f32(e: Emitter, value: float) -> str:
    return e.c(value, np.float32)


# ops every onnxruntime build registers in the default domain beyond the ONNX standard (ORT's
# fusions write them there: an RMSNorm becomes SimplifiedLayerNormalization; checked on 1.32.0)
ORT_DEFAULT_DOMAIN = {"SimplifiedLayerNormalization"}


def runs_on_plain_ort(node: onnx.NodeProto) -> bool:
    """A standard ONNX op (ORT's training build also registers MaxPoolGrad etc. in the default
    domain: those are not in the ONNX standard) or a contrib op of every onnxruntime build."""
    if node.domain in STANDARD_DOMAINS:
        return onnx.defs.has(node.op_type) or node.op_type in ORT_DEFAULT_DOMAIN
    return node.domain == MS and node.op_type in KEPT_CONTRIB


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
    return counts


# the lowerings register themselves in LOWERINGS when imported
from . import lower_conv, lower_math  # noqa: E402,F401
