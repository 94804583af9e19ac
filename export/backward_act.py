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
from onnx import helper

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


# Elementwise ops cheap enough to run twice; their output is recomputed in the backward pass.
RECOMPUTABLE = {"QuickGelu", "Gelu", "FastGelu", "Sigmoid", "Tanh", "Relu", "Softplus", "Mul"}
BACKWARD = "_Grad/"             # ORT's gradient builder names every backward node <forward node>_Grad/...


def recompute_in_backward(model: onnx.ModelProto) -> int:
    """An elementwise forward op whose output the backward reads, while the backward also reads
    every input of it (so they are kept anyway), is run again in the backward from those inputs,
    tied after the gradient that reaches it; its forward output is then freed after its forward
    consumers instead of living until the backward. SmolLM2's MLP keeps gate, SiLU(gate) and up
    for the backward of SiLU(gate) * up; SiLU(gate) is recomputed (30 x [batch, seq, 1536]).
    Returns how many ops are recomputed."""
    G = GraphEdit(model)
    inits = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    outputs = {o.name for o in model.graph.output}
    bwd_reads = {}                                   # tensor -> backward nodes reading it
    for n in model.graph.node:
        if BACKWARD in n.name:
            for i in n.input:
                bwd_reads.setdefault(i, []).append(n)
    done = 0
    for f in [n for n in model.graph.node if n.op_type in RECOMPUTABLE and BACKWARD not in n.name and n.name]:
        y = f.output[0]
        readers = bwd_reads.get(y, [])
        data = [i for i in f.input if i and i not in inits]
        if len(f.output) != 1 or y in outputs or not readers or not data or not all(bwd_reads.get(i) for i in data):
            continue
        dy = next((i for i in readers[0].input if i != y and BACKWARD in getattr(G.producer.get(i), "name", "")), None)
        if dy is None:
            continue
        e = Emitter(G, f"{f.name}_Grad/recompute")
        tied = {data[0]: e.tie_after(data[0], dy, "_after_dy")}
        again = helper.make_node(f.op_type, [tied.get(i, i) for i in f.input], [e.name("_again")],
                                 name=e.name("_again"), domain=f.domain)
        again.attribute.extend(f.attribute)
        e.nodes.append(again)
        G.insert_before(readers[0], e.nodes)
        for r in readers:
            r.input[:] = [again.output[0] if i == y else i for i in r.input]
        bwd_reads[y] = []
        bwd_reads.setdefault(data[0], []).append(again)
        done += 1
    if done:
        G.commit()
    return done
