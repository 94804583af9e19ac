"""The one way the exporter edits an ONNX graph after ORT built it: splice nodes in before or
after existing ones, drop nodes, then remove what became dead and re-establish a valid
topological order. Used by the sparse backward (backward.py) and the lowering (lower.py)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphEdit:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.before: Dict[int, List[onnx.NodeProto]] = {}
        self.after: Dict[int, List[onnx.NodeProto]] = {}
        self.removed: set = set()
        self._consts: Dict[tuple, str] = {}
        self._names = {t.name for t in self.g.initializer} | set(self.producer)

    def const(self, name: str, array: np.ndarray) -> str:
        self.g.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def shared_const(self, array, dtype=np.int64) -> str:
        """A small constant, created once per value and dtype."""
        a = np.asarray(array, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            i = len(self._consts)
            while f"taskedge_const_{i}" in self._names:      # an earlier edit of this graph made it
                i += 1
            self._names.add(f"taskedge_const_{i}")
            self._consts[key] = self.const(f"taskedge_const_{i}", a)
        return self._consts[key]

    def replace(self, node: onnx.NodeProto, nodes: List[onnx.NodeProto]) -> None:
        self.before.setdefault(id(node), []).extend(nodes)
        self.removed.add(id(node))

    def commit(self) -> None:
        """Splice the new nodes in, drop dead ones, keep a valid topological order."""
        nodes = []
        for n in self.g.node:
            nodes += self.before.get(id(n), [])
            if id(n) not in self.removed:
                nodes.append(n)
            nodes += self.after.get(id(n), [])
        outputs = {o.name for o in self.g.output}
        while True:
            used = {i for n in nodes for i in n.input} | outputs
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
        used = {i for n in order for i in n.input}
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.node[:]
        self.g.node.extend(order)
        del self.g.initializer[:]
        self.g.initializer.extend(keep)


class Emitter:
    """Builds the replacement nodes of one node: fresh names under a prefix, shared constants."""

    def __init__(self, edit: GraphEdit, prefix: str):
        self.edit, self.prefix, self.nodes, self._n = edit, prefix, [], 0

    def __call__(self, op: str, inputs: List[str], out: str = None, domain: str = "", **attrs) -> str:
        if out is None:
            self._n += 1
            out = f"{self.prefix}/{op}_{self._n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, domain=domain or None, **attrs))
        return out

    def c(self, value, dtype=np.int64) -> str:
        return self.edit.shared_const(value, dtype)
