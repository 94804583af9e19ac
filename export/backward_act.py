"""Activation gradients that ORT's gradient builder writes from the activation's input,
rewritten to read its output (called by stepgraph.step_graph on ORT's training graph).

Clip (ReLU6 in MobileNets): ORT masks dy with `min <= x <= max` on the input x. This reads
`min < y < max` on the output y = Clip(x) instead -- PyTorch's convention (hardtanh_backward),
the same mask wherever x is not exactly min or max. Then nothing in the backward reads x, so
onnxruntime fuses the Clip into the conv before it (FusedConv) and frees the pre-activation
after the forward op (MobileNetV2: the expanded tensors, the largest of the step).
"""
from __future__ import annotations

import onnx

from .graph import Emitter, GraphEdit
from .layers import node_attr

ORT_CLIP_GRAD = ("And", "Cast", "GreaterOrEqual", "LessOrEqual", "Mul")   # ORT's Clip gradient, sorted


def clip_grads_from_output(model: onnx.ModelProto) -> int:
    """Rewrite every Clip gradient of ORT's form in place; returns how many were rewritten."""
    G = GraphEdit(model)
    by_prefix = {}
    for n in model.graph.node:
        if "_Grad/" in n.name:
            by_prefix.setdefault(n.name.rsplit("_Grad/", 1)[0], []).append(n)
    done = 0
    for clip in [n for n in model.graph.node if n.op_type == "Clip"]:
        group = by_prefix.get(clip.name, [])
        if not clip.name or tuple(sorted(n.op_type for n in group)) != ORT_CLIP_GRAD:
            continue
        op = {n.op_type: n for n in group}
        x, lo, hi = (list(clip.input) + ["", ""])[:3]
        mask = op["Cast"].output[0]
        if (list(op["GreaterOrEqual"].input) != [x, lo] or list(op["LessOrEqual"].input) != [x, hi]
                or mask not in op["Mul"].input):
            continue
        dy = [i for i in op["Mul"].input if i != mask][0]
        e = Emitter(G, f"{clip.name}_Grad/from_output")
        inside = e("And", [e("Greater", [clip.output[0], lo]), e("Less", [clip.output[0], hi])])
        # the float mask is made when dy exists (else ORT casts every mask in the forward pass and
        # keeps them, 4 bytes per element, until the backward reaches them)
        inside = e.tie_after(inside, dy, "_mask_after_dy")
        e("Mul", [dy, e("Cast", [inside], to=int(node_attr(op["Cast"], "to", onnx.TensorProto.FLOAT)))],
          op["Mul"].output[0])
        G.replace(op["Mul"], e.nodes)
        G.remove(*[n for n in group if n is not op["Mul"]])
        done += 1
    if done:
        G.commit()
    return done
