"""Find the weight-bearing ops of an ONNX graph and view each weight as [rows, cols].

rows = output neurons, cols = the inputs one neuron reads. Supported:
MatMul with a 2-D weight initializer as its second input, Gemm with a weight
initializer, Conv (grouped and depthwise included) with a weight initializer.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from taskedge.runtime.bundle import rows_view


@dataclass
class WeightOp:
    node: onnx.NodeProto
    op: str
    weight: str            # initializer name
    shape: tuple
    activation: str        # tensor name of the op's data input
    act_axis: int          # channel axis of that input
    row_axis: int          # axis of the weight indexing output neurons
    groups: int = 1
    trans_a: int = 0

    @property
    def name(self) -> str:
        return self.node.name or self.weight

    @property
    def rows(self) -> int:
        return int(self.shape[self.row_axis])

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape)) // self.rows

    def rows_view(self, w: np.ndarray) -> np.ndarray:
        return rows_view(w, self.op, self.row_axis)

    def row_norms(self, channel_norms: np.ndarray) -> np.ndarray:
        """Per-row view of the input-channel norms, [cols] or [rows, cols] for grouped convs."""
        if self.op != "Conv":
            return channel_norms
        cout, cin_g = self.shape[0], self.shape[1]
        spatial = int(np.prod(self.shape[2:]))
        per_group = channel_norms.reshape(self.groups, cin_g)           # [g, cin_g]
        group_of_row = np.arange(cout) // (cout // self.groups)
        return np.repeat(per_group[group_of_row], spatial, axis=1)       # [cout, cin_g*spatial]


def node_attr(node: onnx.NodeProto, name: str, default):
    """The value of a node attribute, or `default` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_weight_ops(model: onnx.ModelProto) -> List[WeightOp]:
    inits = {t.name: t for t in model.graph.initializer}
    ops, seen = [], set()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or w.data_type not in (onnx.TensorProto.FLOAT,) or w.name in seen:
            continue
        shape = tuple(w.dims)
        if node.op_type == "MatMul":
            if len(shape) != 2:
                continue
            op = WeightOp(node, "MatMul", w.name, shape, node.input[0], -1, row_axis=1)
        elif node.op_type == "Gemm":
            trans_a = node_attr(node, "transA", 0)
            op = WeightOp(node, "Gemm", w.name, shape, node.input[0], 0 if trans_a else 1,
                          row_axis=0 if node_attr(node, "transB", 0) else 1, trans_a=trans_a)
        else:
            if len(shape) < 3:
                continue
            op = WeightOp(node, "Conv", w.name, shape, node.input[0], 1, row_axis=0,
                          groups=int(node_attr(node, "group", 1)))
        seen.add(w.name)
        ops.append(op)
    return ops


def filter_ops(ops: Sequence[WeightOp], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> List[WeightOp]:
    """Keep ops whose node or weight name matches any --include glob and no --exclude glob."""
    def hit(op, pats):
        return any(fnmatch.fnmatchcase(op.name, p) or fnmatch.fnmatchcase(op.weight, p) for p in pats)
    return [op for op in ops if (not include or hit(op, include)) and not hit(op, exclude)]


def count_weights(model: onnx.ModelProto, exclude: Sequence[str] = ()) -> int:
    """All float parameters of the model (what the budget is a share of)."""
    skip = set(exclude)
    total = 0
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) \
                and t.name not in skip:
            total += int(np.prod(t.dims)) if len(t.dims) else 1
    return total


def initializer_arrays(model: onnx.ModelProto, names: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    want = set(names) if names is not None else None
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if want is None or t.name in want}
