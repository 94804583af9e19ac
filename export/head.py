"""The task's output and classifier head.

`select_output` makes one output the graph's only one (`--output NAME`, or the one float
[batch, F] output there is), pooling a [batch, seq, F] or [batch, C, H, W] output to [batch, F]
with `--pool mean|cls|max` (mean and max honour an `attention_mask` input); unused outputs and
what only they needed are dropped. `add_head` then puts a new dense layer with --num-classes
outputs on it, replacing the model's own classifier when that is the last op."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from taskedge.runtime.fsutil import UserError

from .graph import Emitter, GraphEdit, prune_unused_initializers

POOLS = ("mean", "cls", "max")
MASK_INPUT = "attention_mask"

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


def _describe(shapes: Dict[str, Sequence[int]]) -> str:
    return ", ".join(f"{n} {list(s)}" for n, s in shapes.items())


def select_output(model: onnx.ModelProto, shapes: Dict[str, Sequence[int]], output: Optional[str] = None,
                  pool: Optional[str] = None) -> Tuple[str, int]:
    """Keep one float output (pooled to [batch, F] if asked); `shapes` are the float outputs'
    shapes on a real batch. Returns the kept output's name and F; UserError naming the candidates."""
    if pool is not None and pool not in POOLS:
        raise UserError(f"bad --pool {pool!r}: use one of {', '.join(POOLS)}")
    if not shapes:
        raise UserError("the model has no float output to train a head on")
    if output is None:
        flat = [n for n, s in shapes.items() if len(s) == 2]
        deep = [n for n, s in shapes.items() if len(s) in (3, 4)]
        if len(shapes) == 1:
            output = next(iter(shapes))
        elif len(flat) == 1 and pool is None:
            output = flat[0]
        elif not flat and len(deep) == 1 and pool is not None:
            output = deep[0]
        else:
            raise UserError(f"the model has {len(shapes)} float outputs ({_describe(shapes)}): pick the features "
                            "with --output NAME (and --pool mean|cls|max for a [batch, seq, F] one)")
    if output not in shapes:
        raise UserError(f"--output {output!r}: not a float output of the model; its float outputs are "
                        f"{_describe(shapes)}")
    rank = len(shapes[output])
    if rank == 2 and pool is not None:
        raise UserError(f"--pool {pool}: output {output!r} is already [batch, features] {list(shapes[output])}; "
                        "drop --pool")
    if rank in (3, 4) and pool is None:
        raise UserError(f"output {output!r} is {list(shapes[output])}, not [batch, features]: give --pool "
                        f"{'|'.join(POOLS)} to pool it " + ("over the sequence" if rank == 3 else "over H x W"))
    if rank == 4 and pool == "cls":
        raise UserError(f"--pool cls: output {output!r} is [batch, C, H, W] {list(shapes[output])}, which has no "
                        "CLS token; use --pool mean or max")
    if rank not in (2, 3, 4):
        raise UserError(f"output {output!r} has rank {rank} {list(shapes[output])}; TaskEdge trains a head on "
                        "[batch, F], [batch, seq, F] (--pool) or [batch, C, H, W] (--pool) outputs")
    edit = GraphEdit(model)
    name = output if rank == 2 else _pool(edit, model, output, rank, pool)
    kept = next((o for o in model.graph.output if o.name == output), None)
    del model.graph.output[:]
    model.graph.output.append(kept if rank == 2 else
                              helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", None]))
    edit.commit()                               # drops what only the other outputs needed
    return name, int(shapes[output][1 if rank == 4 else -1])


def _pool(edit: GraphEdit, model: onnx.ModelProto, x: str, rank: int, pool: str) -> str:
    """[batch, seq, F] -> [batch, F] over axis 1, or [batch, C, H, W] -> [batch, C] over H, W."""
    e = Emitter(edit, f"taskedge_pool_{pool}")
    axes = [1] if rank == 3 else [2, 3]
    mask = next((i.name for i in model.graph.input if i.name == MASK_INPUT), None) if rank == 3 else None
    if pool == "cls":
        out = e("Gather", [x, e.c(0)], axis=1)
    elif mask is None:
        out = e.reduce("ReduceMean", x, axes) if pool == "mean" else _max(e, x, axes)
    else:                                                  # positions the mask zeroes out take no part
        m = e("Unsqueeze", [e("Cast", [mask], to=onnx.TensorProto.FLOAT), e.c([-1])])
        if pool == "mean":
            total = e.reduce("ReduceSum", e("Mul", [x, m]), axes)
            out = e("Div", [total, e("Max", [e.reduce("ReduceSum", m, axes), e.c(1e-9, np.float32)])])
        else:
            off = e("Mul", [e("Sub", [e.c(1.0, np.float32), m]), e.c(-1e9, np.float32)])
            out = _max(e, e("Add", [x, off]), axes)
    edit.insert_after(_producer(model, x), e.nodes)
    return out


def _max(e: Emitter, x: str, axes) -> str:
    """Max over `axes` as TopK(k=1) on the flattened axes: ORT's gradient builder has a gradient
    for TopK, none for ReduceMax."""
    if len(axes) > 1:                                      # [B, C, H, W] -> [B, C, H*W]
        x = e("Reshape", [x, e.c([0, 0, -1])])
    values = e("TopK", [x, e.c([1])], axis=axes[0])
    e.nodes[-1].output.append(values + "_indices")
    return e("Squeeze", [values, e.c([axes[0]])])


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def add_head(model: onnx.ModelProto, num_classes: int, seed: int = 0, features: Optional[int] = None) -> Dict[str, object]:
    """Replace the classifier (a final Gemm/MatMul[+Add] with a weight initializer) by a new
    dense head with `num_classes` outputs, or append one to a [batch, features] output.
    The graph's single output becomes `logits` [batch, num_classes]."""
    if num_classes < 2:
        raise UserError(f"bad --num-classes {num_classes}: need at least 2 classes")
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
    elif features is None:
        info = _static_last_dim(model, out)
        if info is None or info[0] != 2:
            raise UserError(f"model output {out!r} is not a [batch, features] tensor with a known feature size; "
                            "pick one with --output (and --pool for [batch, seq, F]) to use --num-classes")
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
