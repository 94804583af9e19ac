"""The task's classifier head: a new dense layer with --num-classes outputs that replaces the
model's own classifier or is appended to its [batch, features] output."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from .graph import prune_unused_initializers

HEAD_WEIGHT = "taskedge_head.weight"
HEAD_BIAS = "taskedge_head.bias"
LOGITS = "logits"


def _static_last_dim(model: onnx.ModelProto, tensor: str) -> Optional[int]:
    inferred = shape_inference.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.name == tensor:
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return len(dims), dims[-1].dim_value
    return None


def add_head(model: onnx.ModelProto, num_classes: int, seed: int = 0) -> Dict[str, object]:
    """Replace the classifier (a final Gemm/MatMul[+Add] with a weight initializer) by a new
    dense head with `num_classes` outputs, or append one to a [batch, features] output.
    The graph's single output becomes `logits` [batch, num_classes]."""
    if num_classes < 2:
        raise ValueError(f"bad --num-classes {num_classes}: need at least 2 classes")
    g = model.graph
    out = g.output[0].name
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    node = producers.get(out)
    removed, features, feat_in = [], None, out
    if node is not None and node.op_type == "Add" and node.input[0] in producers \
            and producers[node.input[0]].op_type == "MatMul" and producers[node.input[0]].input[1] in inits:
        mm = producers[node.input[0]]
        removed, feat_in = [node, mm], mm.input[0]
        features = inits[mm.input[1]].dims[0]
    elif node is not None and node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
        w = inits[node.input[1]]
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
        removed, feat_in = [node], node.input[0]
        features = w.dims[1] if trans_b else w.dims[0]
    else:
        info = _static_last_dim(model, out)
        if info is None or info[0] != 2:
            raise ValueError(f"model output {out!r} is not a [batch, features] tensor with a known feature size; "
                             "export a module that returns pooled features (or logits) to use --num-classes")
        features = info[1]
    rng = np.random.default_rng(seed)
    bound = np.sqrt(6.0 / (features + num_classes))
    w = rng.uniform(-bound, bound, size=(num_classes, features)).astype(np.float32)
    b = np.zeros(num_classes, dtype=np.float32)
    for n in removed:
        g.node.remove(n)
    g.initializer.extend([numpy_helper.from_array(w, HEAD_WEIGHT), numpy_helper.from_array(b, HEAD_BIAS)])
    g.node.append(helper.make_node("Gemm", [feat_in, HEAD_WEIGHT, HEAD_BIAS], [LOGITS], name="taskedge_head",
                                   transB=1))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(LOGITS, onnx.TensorProto.FLOAT, ["batch", num_classes]))
    prune_unused_initializers(model)
    return {"params": [HEAD_WEIGHT, HEAD_BIAS], "size": int(w.size + b.size), "features": int(features),
            "replaced": [n.name for n in removed]}
