"""Update paths: rewrite an ONNX graph so each selected weight gets a path whose only trainable
tensor is its delta (or, with sparse LoRA, its A and B factors). One registry, `FORMULATIONS`:

  gather, gather_rows, gather_elements   y = op(x, W) + ReduceSum(Gather(x, idx) * delta, -1)
  scatter                                y = op(x, W'),  W' = W with delta added at idx

Names derive from the weight: `<weight>.taskedge_delta`, `<weight>.taskedge_idx`, ...
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx

from taskedge.runtime.bundle import LayerAllocation

from ..graph import Emitter, GraphEdit
from ..layers import WeightOp
from .gather import gather, gather_elements, gather_rows
from .delta import update_tensor
from .scatter import FORWARD_TIE, scatter

# Chosen by measurement (`python -m taskedge.tools.formulations`, README "Update formulations"),
# on the standard-ONNX step graph in plain onnxruntime. MiniLM (3-D MatMul), batch 16: scatter
# 228 ms, gather_rows 277, gather_elements 356, gather 387. MLP 8x1024 (2-D Gemm), batch 64:
# gather_elements 28.8 ms, gather_rows 28.7, gather 29.3, scatter 39.2 (the lowered gradient of
# a gather is a ScatterElements-add, cheaper than rebuilding W').
DEFAULT_FORMULATION = {"MatMul": "scatter", "Gemm": "gather_elements", "Conv": "scatter"}
GATHERS = {"gather": gather, "gather_rows": gather_rows, "gather_elements": gather_elements}
FORMULATIONS = (*GATHERS, "scatter")


def insert_updates(model: onnx.ModelProto, ops: List[WeightOp], indices: Dict[str, np.ndarray],
                   formulation: Optional[Dict[str, str]] = None, lora_rank: Optional[int] = None,
                   seed: int = 0, trained_rows: Optional[Dict[str, np.ndarray]] = None) -> List[LayerAllocation]:
    """Insert update paths in place; return the allocation table for the manifest.
    `trained_rows[weight]`: the only rows that train (budgets below one entry per neuron)."""
    trained_rows = trained_rows or {}
    formulation = {**DEFAULT_FORMULATION, **(formulation or {})}
    rng = np.random.default_rng(seed)
    edit = GraphEdit(model)
    table = []
    for op in ops:
        idx_rows = indices[op.weight]
        form = formulation[op.op]
        if form.startswith("gather") and (op.op == "Conv" or op.trans_a):
            form = "scatter"                                  # gather needs x laid out as [..., cols]
        b = Emitter(edit, f"{op.weight}.taskedge_")
        rows_only = trained_rows.get(op.weight)
        delta, params, count = update_tensor(b, op.rows, idx_rows, op.cols, lora_rank, rng, rows_only)
        if form in GATHERS:
            y = op.node.output[0]
            base = b.name("base_out")
            op.node.output[0] = base
            GATHERS[form](b, op, idx_rows, delta, base)
            b.nodes[-1].output[0] = y                          # the Add takes over the original name
            edit.insert_after(op.node, b.nodes)       # the Add reads the op's output
        else:
            op.node.input[1] = scatter(b, op, idx_rows, delta)
            edit.insert_before(op.node, b.nodes)      # W' must exist before the op reads it
        table.append(LayerAllocation(layer=op.name, op=op.op, weight=op.weight, weight_shape=list(op.shape),
                                     rows=op.rows, cols=op.cols, k=int(idx_rows.shape[1]), formulation=form,
                                     row_axis=op.row_axis, trainable=count, params=params,
                                     trained_rows=None if rows_only is None else [int(r) for r in rows_only]))
    edit.commit()
    return table


__all__ = ["DEFAULT_FORMULATION", "FORMULATIONS", "FORWARD_TIE", "insert_updates"]
