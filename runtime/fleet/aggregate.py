"""Aggregation of the clients' trained states (numpy only; the server needs nothing else).

    fedavg        mean weighted by each client's training examples (FedAvg)
    median        coordinate-wise median: a single bad client cannot move any entry past the
                  good clients' range
    trimmed-mean  coordinate-wise mean after dropping the `trim` share of the largest and of the
                  smallest values per entry (at least one each way once there are 3 clients)
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

RULES = ("fedavg", "median", "trimmed-mean")


def _stack(states: Sequence[Dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([s[name] for s in states]).astype(np.float64)


def fedavg(states: Sequence[Dict[str, np.ndarray]], examples: Sequence[int]) -> Dict[str, np.ndarray]:
    w = np.asarray(examples, dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(states), 1.0 / len(states))
    return {n: np.tensordot(w, _stack(states, n), axes=1).astype(np.float32) for n in states[0]}


def median(states: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {n: np.median(_stack(states, n), axis=0).astype(np.float32) for n in states[0]}


def trimmed_mean(states: Sequence[Dict[str, np.ndarray]], trim: float = 0.2) -> Dict[str, np.ndarray]:
    k = int(np.floor(trim * len(states)))
    if len(states) >= 3:
        k = max(k, 1)
    k = min(k, (len(states) - 1) // 2)
    out = {}
    for n in states[0]:
        s = np.sort(_stack(states, n), axis=0)
        out[n] = s[k:len(states) - k].mean(axis=0).astype(np.float32)
    return out


def aggregate(rule: str, states: List[Dict[str, np.ndarray]], examples: List[int],
              trim: float = 0.2) -> Dict[str, np.ndarray]:
    if not states:
        raise ValueError("no states to aggregate")
    if rule == "fedavg":
        return fedavg(states, examples)
    if rule == "median":
        return median(states)
    if rule == "trimmed-mean":
        return trimmed_mean(states, trim)
    raise ValueError(f"unknown aggregation {rule!r}: use one of {', '.join(RULES)}")
