"""FLOPs of one training step, counted from the step graph that runs it (forward + backward +
loss, as onnxruntime executes the file), at the bench's batch.

Counting rule: every Conv, ConvTranspose, MatMul and Gemm node of the graph counts 2 FLOPs per
multiply-accumulate (bias adds not counted): Conv 2*N*C_out*H_out*W_out*(C_in/groups)*k_h*k_w,
ConvTranspose 2*N*C_in*H_in*W_in*(C_out/groups)*k_h*k_w, MatMul/Gemm 2*M*N*K (batched MatMul:
times the batch dims); so does a Mul read only by ReduceSums (a multiply-accumulate written out:
2 per element of its output) -- the depthwise weight gradient (lower_conv) and TaskEdge's sparse
weight gradients are computed that way. Other elementwise ops, pooling, other reductions and the
optimizer are not counted
(GaLore's projections are added by the bench from galore.py). The shapes are read off one real
run of the graph with graph optimisations off, so every node counted is a node of the file.
The forward's share comes from the eval graph (forward + loss) the same way.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import onnx

COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_flops(node, shape) -> int:
    """FLOPs of one counted node, `shape(tensor name)` giving its tensors' shapes."""
    if node.op_type == "Conv":
        w, y = shape(node.input[1]), shape(node.output[0])
        return 2 * int(np.prod(y)) * int(np.prod(w[1:]))
    if node.op_type == "Mul":                       # read only by ReduceSums: a multiply-accumulate
        return 2 * int(np.prod(shape(node.output[0])))
    if node.op_type == "ConvTranspose":
        x, w = shape(node.input[0]), shape(node.input[1])
        return 2 * int(np.prod(x)) * int(np.prod(w[1:]))
    a, y = shape(node.input[0]), shape(node.output[0])
    k = a[0] if node.op_type == "Gemm" and _attr(node, "transA", 0) else a[-1]
    return 2 * int(np.prod(y)) * int(k)


def graph_flops(model: onnx.ModelProto, feeds: Dict[str, np.ndarray]) -> Dict[str, int]:
    """{op type: FLOPs, "total": sum} of one run of `model` on `feeds`."""
    from taskedge.runtime.ort import onnxruntime as ort
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {t.name: list(t.dims) for t in m.graph.initializer}
    known.update({n.output[0]: list(onnx.numpy_helper.to_array(_attr(n, "value", None)).shape)
                  for n in m.graph.node if n.op_type == "Constant"})
    known.update({k: list(v.shape) for k, v in feeds.items()})
    readers: Dict[str, set] = {}
    for n in m.graph.node:
        for t in n.input:
            readers.setdefault(t, set()).add(n.op_type)
    nodes = [n for n in m.graph.node if n.op_type in COUNTED
             or (n.op_type == "Mul" and readers.get(n.output[0]) == {"ReduceSum"})]
    want = sorted({t for n in nodes for t in (n.input[0], n.input[1], n.output[0]) if t and t not in known})
    outputs = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in want if t not in outputs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    got = sess.run(want, {k: v for k, v in feeds.items() if k in inputs}) if want else []
    known.update({t: list(a.shape) for t, a in zip(want, got)})
    out: Dict[str, int] = {}
    for n in nodes:
        out[n.op_type] = out.get(n.op_type, 0) + node_flops(n, lambda t: known[t])
    out["total"] = sum(out.values())
    return out
