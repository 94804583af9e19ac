"""Federated vs local-only vs centralised TaskEdge on label-skewed boards (issue 13).

    python -m taskedge.tools.fleet_experiment OUT [--task vision] [--clients 4] [--rounds 10]
           [--local-steps 15] [--json] [--plot OUT/accuracy.png]
"""
from __future__ import annotations

from typing import List

import numpy as np


def label_skew(labels: np.ndarray, clients: int, seed: int = 0, alpha: float = 0.5) -> List[np.ndarray]:
    """Indices of a non-IID split: each class is shared among the clients in Dirichlet(alpha)
    proportions (small alpha: each client holds few classes). Every client gets at least half
    its even share of records (redrawn until so)."""
    rng = np.random.default_rng(seed)
    floor = len(labels) // (2 * clients)
    while True:
        parts: List[list] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= floor:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
