"""The schedule: how many steps a run takes, which examples each step sees, at which learning rate.

All three are functions of the step alone (and the run's settings), so a resumed run replays
exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np


# The default run: one epoch, but at least this many steps. One epoch of a small data set is too short
# to learn from: 20 steps on 627 digits reached at most 0.47 / 0.55 / 0.72 (CNN / MLP / transformer, best
# rate of the grid), 100 steps 0.81 / 0.70 / 0.91 (README, "The learning rate and the run length").
MIN_DEFAULT_STEPS = 100


def planned_steps(opts, n_train: int, effective: int) -> Optional[int]:
    """--steps, else --epochs over the training set, else one epoch but at least MIN_DEFAULT_STEPS,
    unless --max-seconds or an energy budget given on the command line ends the run (None: no step limit)."""
    per_epoch = math.ceil(n_train / effective)
    total = opts.steps or (int(math.ceil(opts.epochs * per_epoch)) if opts.epochs else None)
    if total is None and not opts.max_seconds and opts.energy_budget_j is None:
        total = max(per_epoch, MIN_DEFAULT_STEPS)
    return total


def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then constant, cosine or linear decay to 0 at `total`."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t)


def batch_indices(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """The examples of global step `step`: a per-epoch permutation fixed by (seed, epoch),
    so a resumed run sees exactly the data an uninterrupted one would."""
    per_epoch = max(1, math.ceil(n / batch))
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[pos * batch:(pos + 1) * batch]
