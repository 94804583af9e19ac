"""TaskEdge importance and allocation: the whole method in a few lines of numpy.

Weights are viewed as a matrix [rows = output neurons, cols = inputs of a neuron].
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np


def importance(weight_rows: np.ndarray, input_norms: np.ndarray) -> np.ndarray:
    """S_ij = |W_ij| * ||X_j||_2  (weights AND input activations).

    weight_rows: [rows, cols]; input_norms: [cols] or [rows, cols] (grouped convs).
    """
    return np.abs(weight_rows).astype(np.float32) * input_norms.astype(np.float32)


SELECTIONS = ("taskedge", "magnitude", "activation", "random", "gradient")


def selection_scores(selection: str, weight_rows: np.ndarray, input_norms: np.ndarray,
                     rng: np.random.Generator, grad_rows: Optional[np.ndarray] = None) -> np.ndarray:
    """The score each rule ranks a neuron's inputs by (the ablations of `--selection`):
    taskedge |W|*||X||; magnitude |W|; activation ||X||; random; gradient sum |dL/dW| (GPS)."""
    if selection == "taskedge":
        return importance(weight_rows, input_norms)
    if selection == "magnitude":
        return np.abs(weight_rows).astype(np.float32)
    if selection == "activation":
        return np.broadcast_to(input_norms.astype(np.float32), weight_rows.shape)
    if selection == "random":
        return rng.random(weight_rows.shape, dtype=np.float32)
    if selection == "gradient":
        return np.asarray(grad_rows, np.float32)
    raise ValueError(f"bad --selection {selection!r}: use one of {', '.join(SELECTIONS)}")


def parse_nm(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """'2:4' -> (2, 4). Raises ValueError with a message naming the fix."""
    if text is None or text == "":
        return None
    try:
        n, m = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ValueError(f"bad --nm {text!r}: expected N:M with integers, e.g. 2:4") from None
    if not (0 < n < m):
        raise ValueError(f"bad --nm {text!r}: need 0 < N < M, e.g. 2:4")
    return n, m


def per_row_k(budget_entries: int, rows: Sequence[int]) -> int:
    """The one k every output neuron gets: floor(budget / total rows), at least 1.

    Model-agnostic and even: the trainable set is spread over every selected layer.
    """
    return max(1, budget_entries // max(1, sum(rows)))


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """The n rows (output neurons) whose best entry scores highest, sorted ascending: where a
    budget below one entry per neuron goes (each of them trains its best input)."""
    best = scores.max(axis=1)
    return np.sort(np.argsort(-best, kind="stable")[:max(1, min(n, len(best)))]).astype(np.int64)


def layer_k(k: int, cols: int, nm: Optional[Tuple[int, int]] = None) -> int:
    """Cap k by what a row can hold (all its inputs, or N per group of M)."""
    cap = cols
    if nm is not None:
        n, m = nm
        cap = (cols // m) * n + min(n, cols % m)
    return max(1, min(k, cap))


def select_topk(scores: np.ndarray, k: int, nm: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Per row, the indices of the k highest scores (sorted ascending), optionally N:M.

    With N:M only each group's top-N can be picked; the top-k of those is the
    best set that keeps at most N per group of M consecutive inputs.
    """
    rows, cols = scores.shape
    s = scores.astype(np.float32, copy=True)
    if nm is not None:
        n, m = nm
        pad = (-cols) % m
        g = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf).reshape(rows, -1, m)
        order = np.argsort(-g, axis=-1, kind="stable")
        drop = order[..., n:]
        np.put_along_axis(g, drop, -np.inf, axis=-1)
        s = g.reshape(rows, -1)[:, :cols]
    k = layer_k(k, cols, nm)
    # stable, deterministic top-k: argsort on (-score), ties by lower index
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.sort(idx, axis=1).astype(np.int64)


def check_nm(indices: np.ndarray, nm: Tuple[int, int]) -> int:
    """Largest number of selected inputs in any group of M (for tests and inspect)."""
    n, m = nm
    groups = indices // m
    worst = 0
    for row in groups:
        _, counts = np.unique(row, return_counts=True)
        worst = max(worst, int(counts.max()))
    return worst


def floored(entries: int, neurons: int, floor: int) -> int:
    """`entries` raised to one input per neuron, but to no more than `floor` entries (--min-entries):
    on a small model a share is a handful of weights (0.1 % of the digits CNN's 11,712 is 11 entries
    beside a 645-value head, no better than the linear probe; one input in each of its 320 neurons beat
    the probe at every seed tried, README "Default flags"); a large model's budget is above it anyway."""
    return max(entries, min(neurons, floor))


def budget_entries(budget: float, num_weights: int) -> int:
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(f"bad --budget {budget}: must be a fraction in (0, 1], e.g. 0.001 for 0.1 %")
    return int(budget * num_weights)
