"""The [rows, k] update tensor of one weight: a trainable `delta` initializer; with a budget
below one entry per neuron, a trainable [n, 1] `delta` for n chosen rows scattered into zeros;
or with sparse LoRA the product of trainable factors B [rows, r] and A [r, cols], read only at
the selected entries: delta[o, j] = sum_r B[o, r] * A[r, idx[o, j]]."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ..graph import Emitter


def update_tensor(b: Emitter, rows: int, idx_rows: np.ndarray, cols: int, lora_rank: Optional[int],
                  rng: np.random.Generator, trained_rows: Optional[np.ndarray] = None) -> Tuple[str, List[str], int]:
    """The [rows, k] update tensor and its trainable tensors and parameter count."""
    k = idx_rows.shape[1]
    if trained_rows is not None:               # only these rows train (k == 1); the others add zero
        d = b.init("delta", np.zeros((len(trained_rows), 1), dtype=np.float32))
        where = b.init("delta_rows", np.asarray(trained_rows, np.int64).reshape(-1, 1))
        full = b.node("ScatterElements", [b.init("delta_zeros", np.zeros((rows, 1), np.float32)), where, d],
                      "delta_full", axis=0)
        return full, [d], len(trained_rows)
    if not lora_rank:
        d = b.init("delta", np.zeros((rows, k), dtype=np.float32))
        return d, [d], rows * k
    r = int(lora_rank)
    bound = 1.0 / np.sqrt(cols)                       # kaiming-uniform-like, as in LoRA/peft
    a = b.init("lora_A", rng.uniform(-bound, bound, size=(r, cols)).astype(np.float32))
    bb = b.init("lora_B", np.zeros((rows, r), dtype=np.float32))
    idx = b.init("lora_idx", idx_rows)
    ga = b.node("Gather", [a, idx], "lora_gathered", axis=1)            # [r, rows, k]
    bt = b.node("Transpose", [bb], "lora_Bt", perm=[1, 0])              # [r, rows]
    bt3 = b.unsqueeze(bt, -1, "lora_Bt3")                               # [r, rows, 1]
    prod = b.node("Mul", [ga, bt3], "lora_prod")
    d = b.reduce_sum(prod, 0, "lora_delta")                             # [rows, k]
    return d, [a, bb], r * (rows + cols)
