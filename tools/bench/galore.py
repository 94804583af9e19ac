"""GaLore (Zhao et al. 2024, "Memory-Efficient LLM Training by Gradient Low-Rank Projection") as a
numpy optimizer over the full-FT step graph's gradients (GaLore changes the optimizer, not the
graph, so it runs beside the step graph on the host, as the runtime's AdamW does).

Each weight with >= 2 dims is viewed as a matrix [rows, cols] (convs: [C_out, C_in/g * k * k]).
Every `gap` updates its projector is refreshed from the current gradient's SVD: P = the top-r left
singular vectors when rows <= cols (low-rank gradient P^T G [r, cols]), else the top-r right ones
(G P [rows, r]). Adam's moments live in the low-rank space; the update is projected back and
scaled by `scale` (GaLore's alpha, 0.25 as in the paper). Vectors (biases, PReLU slopes) and the
head get plain AdamW. Moments are not reset when the projector changes (as the reference code).
"""
from __future__ import annotations

from typing import Dict, Iterable

import numpy as np


class GaLoreAdamW:
    def __init__(self, params: Dict[str, np.ndarray], rank: int, dense: Iterable[str] = (), gap: int = 50,
                 scale: float = 0.25, betas=(0.9, 0.999), eps: float = 1e-6):
        self.rank, self.gap, self.scale, self.betas, self.eps = rank, gap, scale, betas, eps
        dense = set(dense)
        self.low = {n for n, p in params.items() if p.ndim >= 2 and n not in dense}
        self.proj: Dict[str, np.ndarray] = {}
        self.m: Dict[str, np.ndarray] = {}
        self.v: Dict[str, np.ndarray] = {}
        self.t = 0
        self.projection_flops = 0          # the last step's projection matmuls (2 * m * n * r each way)

    @staticmethod
    def _mat(a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], -1)

    def _project(self, name: str, g: np.ndarray) -> np.ndarray:
        rows, cols = g.shape
        r = min(self.rank, rows, cols)
        if name not in self.proj or self.t % self.gap == 1:
            u, _, vt = np.linalg.svd(g, full_matrices=False)
            self.proj[name] = np.ascontiguousarray(u[:, :r] if rows <= cols else vt[:r].T, dtype=np.float32)
        p = self.proj[name]
        self.projection_flops += 4 * rows * cols * r          # project down and back up
        return p.T @ g if rows <= cols else g @ p

    def _back(self, name: str, low: np.ndarray, shape) -> np.ndarray:
        p = self.proj[name]
        return (p @ low if shape[0] <= int(np.prod(shape[1:])) else low @ p.T).reshape(shape)

    def step(self, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray], lrs: Dict[str, float]) -> None:
        """One update in place; lrs: each parameter's learning rate."""
        self.t += 1
        self.projection_flops = 0
        b1, b2 = self.betas
        c = np.sqrt(1.0 - b2 ** self.t) / (1.0 - b1 ** self.t)
        for name, p in params.items():
            g = grads[name]
            low = name in self.low
            if low:
                g = self._project(name, self._mat(g))
            m = self.m[name] = b1 * self.m.get(name, 0.0) + (1 - b1) * g
            v = self.v[name] = b2 * self.v.get(name, 0.0) + (1 - b2) * g * g
            u = (m / (np.sqrt(v) + self.eps)).astype(np.float32)
            if low:
                u = self.scale * self._back(name, u, p.shape)
            p -= np.float32(lrs[name] * c) * u

    def state_values(self) -> int:
        """Values the optimizer holds (moments + projectors): GaLore's memory saving."""
        return int(sum(a.size for a in self.m.values()) + sum(a.size for a in self.v.values())
                   + sum(a.size for a in self.proj.values()))
