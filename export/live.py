"""Live weights: a scatter-path MatMul/Gemm layer reads W' = W + delta (delta at its selected
entries) as a graph input that the runtime keeps equal to it (runtime/live.py), instead of the
step graph building W' twice a step (forward, and again in the backward for dx, each a full copy
of W by a single-threaded ScatterElements: MiniLM at 0.1 %, 69 copies, 10.5 ms of a 194 ms step).

The runtime maps W copy-on-write and writes W[idx] + delta at the selected entries only, so a
step copies nothing and the pages it ever writes are the ones holding selected entries (MiniLM
0.1 %: 6.2 of 42 MB; SmolLM2-135M: 58 of 425 MB). Nothing else changes: the gradient of delta
never read W' (backward.py computes it from x[..., U] and dy, or ORT's dense gradient from x and
dy), and dx reads the input where it read the rebuilt W'. Exact: W' holds the same fp32 sums
W[idx] + delta the graph computed. Conv layers keep W' in the graph (onnxruntime reorders a conv's
constant weight at load; their update path is backward_conv.py's).

Called by the exporter on the lowered step graph (after stepgraph.step_graph), before the eval
graph is cut from it."""
from __future__ import annotations

from typing import List

import onnx

from taskedge.runtime.bundle import LayerAllocation

from .graph import Emitter, GraphEdit, tied_to


def live_input(weight: str) -> str:
    """The graph input that carries a live layer's W' (the manifest records it: `LayerAllocation.live`)."""
    return f"{weight}.taskedge_live"


def live_weights(model: onnx.ModelProto, table: List[LayerAllocation]) -> int:
    """Replace each eligible layer's W' by the graph input `live_input(weight)`, in place; marks the
    layer `live`. Returns how many layers read a live weight."""
    G = GraphEdit(model)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    done = 0
    for layer in table:
        w = layer.weight
        built = f"{w}.taskedge_w_scattered"                   # updates/scatter.py's W'
        scatter = G.producer.get(built)
        fwd = next((n for n in G.consumers.get(built, []) if n.op_type in ("MatMul", "Gemm") and n.input[1] == built),
                   None)
        after = tied_to(G, scatter.input[2]) if scatter is not None and len(scatter.input) == 3 else None
        if (layer.formulation != "scatter" or layer.op not in ("MatMul", "Gemm") or fwd is None or after is None
                or w not in shapes):
            continue
        name = live_input(w)
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shapes[w]))
        # the forward op waits for what W' waited for (x, or x[..., U] gathered for the backward),
        # so onnxruntime keeps scheduling that gather before the op and frees x after it
        e = Emitter(G, f"{w}.taskedge_live_")
        tied = e.tie_after(name, after, "after_x")
        G.insert_before(fwd, e.nodes)
        G.rewire(built, tied)
        G.rewire(f"{built}_bwd", name)
        layer.live = name
        done += 1
    if done:
        G.commit()                               # the W' builds are dead now: dropped
    return done
