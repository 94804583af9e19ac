"""The [rows, k] update tensor of one weight: a trainable `delta` initializer, or with sparse
LoRA the product of trainable factors B [rows, r] and A [r, cols], read only at the selected
entries: delta[o, j] = sum_r B[o, r] * A[r, idx[o, j]]."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from ..graph import Emitter


def update_tensor(b: Emitter, rows: int, idx_rows: np.ndarray, cols: int, lora_rank: Optional[int],
           rng: np.random.Generator) -> Tuple[str, List[str], int]:
    """The [rows, k] update tensor: a trainable initializer, or (B @ A) gathered at the mask."""
    k = idx_rows.shape[1]
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
