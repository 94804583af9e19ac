"""The one way the exporter edits an ONNX graph: splice new nodes in before or after existing
ones (`GraphEdit.insert_before/insert_after`), replace nodes, then `commit()`: drop what became
dead, re-establish a valid topological order, prune unused initializers. `Emitter` builds the
new nodes of one edit under a name prefix. Used by the update paths (updates/), the head (head.py), the baselines
(baselines.py), the sparse backward (backward*.py), the step graph and the lowering (lower*.py)."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain opset version."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def reads(node: onnx.NodeProto) -> List[str]:
    """Every tensor a node reads, its subgraphs' outer-scope reads included."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            names += [i for n in sub.node for i in reads(n)]
    return names


def prune_unused_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers no node and no graph output reads."""
    used = {i for n in model.graph.node for i in reads(n)} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


class GraphEdit:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self.opset = opset_of(model)
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.before: Dict[int, List[onnx.NodeProto]] = {}
        self.after: Dict[int, List[onnx.NodeProto]] = {}
        self.removed: set = set()
        self._consts: Dict[tuple, str] = {}
        self._new_consts: List[onnx.NodeProto] = []
        self._names = {t.name for t in self.g.initializer} | {i.name for i in self.g.input} | set(self.producer)

    def const(self, name: str, array: np.ndarray) -> str:
        self.g.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def shared_const(self, array, dtype=np.int64) -> str:
        """A small constant (axes, shapes, scalars), created once per value and dtype as a Constant
        node: it stays in the graph file, where shape inference reads it (initializers move to
        weights.bin)."""
        a = np.asarray(array, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            i = len(self._consts)
            while f"taskedge_const_{i}" in self._names:      # an earlier edit of this graph made it
                i += 1
            name = f"taskedge_const_{i}"
            self._names.add(name)
            self._new_consts.append(helper.make_node("Constant", [], [name], name=name,
                                                     value=numpy_helper.from_array(a, name)))
            self._consts[key] = name
        return self._consts[key]

    def insert_before(self, node: onnx.NodeProto, nodes: List[onnx.NodeProto]) -> None:
        self.before.setdefault(id(node), []).extend(nodes)

    def insert_after(self, node: onnx.NodeProto, nodes: List[onnx.NodeProto]) -> None:
        self.after.setdefault(id(node), []).extend(nodes)

    def remove(self, *nodes: onnx.NodeProto) -> None:
        self.removed.update(id(n) for n in nodes)

    def replace(self, node: onnx.NodeProto, nodes: List[onnx.NodeProto]) -> None:
        self.insert_before(node, nodes)
        self.remove(node)

    def rewire(self, old: str, new: str, nodes: Optional[List[onnx.NodeProto]] = None) -> None:
        """`nodes` (default: every consumer of `old`) read `new` where they read `old`."""
        for n in self.consumers.get(old, []) if nodes is None else nodes:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new

    def commit(self) -> None:
        """Splice the new nodes in, drop dead ones, keep a valid topological order."""
        nodes, self._new_consts = list(self._new_consts), []
        for n in self.g.node:
            nodes += self.before.get(id(n), [])
            if id(n) not in self.removed:
                nodes.append(n)
            nodes += self.after.get(id(n), [])
        outputs = {o.name for o in self.g.output}
        while True:
            used = {i for n in nodes for i in reads(n)} | outputs
            live = [n for n in nodes if any(o in used for o in n.output)]
            if len(live) == len(nodes):
                break
            nodes = live
        known = {i.name for i in self.g.input} | {t.name for t in self.g.initializer} | {""}
        order, pending = [], nodes
        while pending:
            rest = []
            for n in pending:
                if all(i in known for i in n.input):
                    order.append(n)
                    known.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                missing = sorted({i for n in rest for i in n.input if i not in known})[:3]
                raise RuntimeError(f"graph edit: cannot order {[n.name for n in rest[:3]]} (missing {missing})")
            pending = rest
        del self.g.node[:]
        self.g.node.extend(order)
        prune_unused_initializers(self.model)
        self.before, self.after, self.removed = {}, {}, set()


class Emitter:
    """Builds the new nodes of one edit: `e(op, inputs)` names its output `<prefix>/<op>_<n>`,
    `e.node(op, inputs, suffix)` and `e.init(suffix, array)` name theirs `<prefix><suffix>`
    (stable names the manifest and later passes refer to); `e.c(value)` is a shared constant."""

    def __init__(self, edit: GraphEdit, prefix: str):
        self.edit, self.prefix, self.nodes, self._n = edit, prefix, [], 0

    def __call__(self, op: str, inputs: List[str], out: Optional[str] = None, domain: str = "", **attrs) -> str:
        if out is None:
            self._n += 1
            out = f"{self.prefix}/{op}_{self._n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, domain=domain or None, **attrs))
        return out

    def c(self, value, dtype=np.int64) -> str:
        return self.edit.shared_const(value, dtype)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}"

    def init(self, suffix: str, array: np.ndarray) -> str:
        return self.edit.const(self.name(suffix), array)

    def node(self, op: str, inputs: List[str], suffix: str, **attrs) -> str:
        return self(op, inputs, self.name(suffix), **attrs)

    def reduce_sum(self, x: str, axis: int, suffix: str) -> str:
        if self.edit.opset >= 13:
            return self.node("ReduceSum", [x, self.c([axis])], suffix, keepdims=0)
        return self.node("ReduceSum", [x], suffix, axes=[axis], keepdims=0)

    def reduce(self, op: str, x: str, axes: List[int], keepdims: int = 0) -> str:
        """ReduceSum/ReduceMean/ReduceMax over `axes`: axes as an input from opset 13 (ReduceSum) or
        18 (the others), as an attribute before."""
        if self.edit.opset >= (13 if op == "ReduceSum" else 18):
            return self(op, [x, self.c(axes)], keepdims=keepdims)
        return self(op, [x], axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axis: int, suffix: str) -> str:
        if self.edit.opset >= 13:
            return self.node("Unsqueeze", [x, self.c([axis])], suffix)
        return self.node("Unsqueeze", [x], suffix, axes=[axis])

    def tie_after(self, tensor: str, after: str, label: str) -> str:
        """A no-op Reshape of `tensor` whose shape input also reads `after`'s data (an empty slice of
        it), so onnxruntime cannot run what consumes it before `after` exists (e.g. each W' built
        just before its layer runs, not all at the start of the step). A shape-only dependency
        (`Shape(after)`) is not enough: ORT folds Shape of a static shape to a constant, in the
        gradient builder and again when a session loads the graph. Returns the tied tensor's name."""
        flat = self.node("Reshape", [after, self.c([-1])], f"{label}_after_flat")
        empty = self.node("Cast", [self.node("Slice", [flat, self.c([0]), self.c([0])], f"{label}_after_none")],
                          f"{label}_after_none_i64", to=onnx.TensorProto.INT64)
        same = self.node("Concat", [self.node("Shape", [tensor], f"{label}_dims"), empty], f"{label}_same_dims", axis=0)
        return self.node("Reshape", [tensor, same], f"{label}_tied")


def tied_to(G: "GraphEdit", tied: str) -> Optional[str]:
    """The tensor `Emitter.tie_after` tied `tied` after, or None if `tied` is not such a tie (found
    by the tie's structure, not its names: ORT's optimizer merges the identical parts of ties
    to one tensor, e.g. of Q, K and V)."""
    t = tied
    for op, slot in (("Reshape", 1), ("Concat", 1), ("Cast", 0), ("Slice", 0), ("Reshape", 0)):
        n = G.producer.get(t)
        if n is None or n.op_type != op or len(n.input) <= slot:
            return None
        t = n.input[slot]
    return t


def unshare_initializers(model: onnx.ModelProto) -> List[str]:
    """Give every consumer of a shared initializer its own copy, so each weight op gets its own
    update path and ORT's gradient builder never derives one gradient name twice (identical
    tensors merged by torch.onnx, e.g. the LayerNorms of a fresh nn.TransformerEncoder, or tied
    layers). Embedding lookups (Gather) and the first other consumer keep reading the original:
    tied embeddings (a lookup + the LM head) stay one tensor. An `Identity` of an initializer (how torch.onnx stores a tensor
    identical to another) becomes an initializer of its own. Returns the names of the copies made."""
    inits = {t.name: t for t in model.graph.initializer}
    made = []
    for node in [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in inits]:
        t = onnx.TensorProto()
        t.CopyFrom(inits[node.input[0]])
        t.name = node.output[0]
        model.graph.initializer.append(t)
        inits[t.name] = t
        model.graph.node.remove(node)
        made.append(t.name)
    uses: Dict[str, list] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in inits:
                uses.setdefault(name, []).append((node, slot))
    for name, consumers in uses.items():
        others = [(n, s) for n, s in consumers if not (n.op_type == "Gather" and s == 0)]
        for i, (node, slot) in enumerate(others[1:], start=1):     # the first keeps the original
            copy_name = f"{name}.taskedge_copy{i}"
            t = onnx.TensorProto()
            t.CopyFrom(inits[name])
            t.name = copy_name
            model.graph.initializer.append(t)
            node.input[slot] = copy_name
            made.append(copy_name)
    return made


MIN_OPSET = 17      # what the update paths and lowerings emit needs (CastLike 15, ScatterElements reduction 16)


def ensure_opset(model: onnx.ModelProto, minimum: int = MIN_OPSET) -> onnx.ModelProto:
    """The model at opset >= `minimum`, upgraded by onnx's version converter (opsets 13-16 differ
    from 17 only by added types and new optional attributes whose defaults keep the old behaviour)."""
    if opset_of(model) >= minimum:
        return model
    from onnx import version_converter
    ir = model.ir_version
    upgraded = version_converter.convert_version(model, minimum)
    upgraded.ir_version = max(ir, 8)            # opset 17 needs IR >= 8
    return upgraded
