"""The learning rate when the user gives none: short trials from the run's starting state, each a
small copy of the planned run (the run's schedule, warm-up and decay, squeezed into the trial's
steps), judged by the loss on a held-out slice of the TRAINING data (the eval data is never
looked at). The trials leave the trainer's state as it was.

Why this shape (README, "The learning rate and the run length, when you give none"): trials at a
constant rate favour low rates (a high rate still bounces when the trial stops; the run's decay
would have settled it), and 12 steps say little about a 100- or 200-step run, so a trial runs the
run's schedule over about a quarter of its steps. The rates are walked from START along the grid,
towards the lower loss, until the loss rises again (the full tables measured on the digits models
had one valley), which costs three or four trials where the whole grid would cost five."""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .train.schedule import lr_at

CANDIDATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
START = 2                              # the walk starts at CANDIDATES[START] and its upper neighbour
TRIAL_SHARE = 0.25                     # a trial is this share of the planned steps ...
MIN_TRIAL_STEPS, MAX_TRIAL_STEPS = 12, 30      # ... within these bounds


def trial_steps(planned: Optional[int]) -> int:
    """Steps per trial for a run of `planned` steps (None: no step limit -> the longest trial)."""
    if planned is None:
        return MAX_TRIAL_STEPS
    return int(min(MAX_TRIAL_STEPS, max(MIN_TRIAL_STEPS, round(TRIAL_SHARE * planned))))


def trial_warmup(steps: int, planned: Optional[int], warmup: int) -> int:
    """The run's warm-up scaled to a trial of `steps`: the same share of it (no planned length: the
    run's warm-up steps, a quarter of the trial at most)."""
    return round(steps * min(1.0, warmup / planned)) if planned else min(warmup, steps // 4)


def _loss(trainer, batches: Sequence[Sequence[np.ndarray]]) -> float:
    losses = [(trainer.eval_step(b)[0], len(b[-1])) for b in batches]
    return float(sum(l * n for l, n in losses) / sum(n for _, n in losses))


def _trial(trainer, start, lr: float, steps: int, step_batches, held_out, schedule: str, warmup: int) -> float:
    """`steps` optimizer steps from `start` with the run's schedule at peak rate `lr`; the held-out loss."""
    trainer.state = copy.deepcopy(start)
    trainer.reset_grad()
    for s in range(steps):
        for micro in step_batches(s):
            trainer.train_step(micro)
        trainer.lr = lr_at(s, steps, lr, schedule, warmup)
        trainer.optimizer_step()
    loss = _loss(trainer, held_out) if trainer.state.finite() else float("inf")
    return loss if np.isfinite(loss) else float("inf")


def pick_lr(trainer, step_batches: Callable[[int], List[Sequence[np.ndarray]]],
            held_out: Sequence[Sequence[np.ndarray]], steps: int = MIN_TRIAL_STEPS,
            candidates: Sequence[float] = CANDIDATES, schedule: str = "cosine", warmup: int = 0,
            start: int = START, log=lambda m: None) -> Tuple[float, List[dict]]:
    """Walk `candidates` (ascending) from `start`: a trial of `steps` steps (the run's `schedule` and
    `warmup`, scaled to the trial) per rate on `step_batches(s)` (the micro-batches of step s), then
    the mean loss on `held_out`; move towards the lower loss until it rises (a diverged trial counts
    as infinite). Returns the rate with the lowest held-out loss and the table of trials (the first
    row: the loss before any step)."""
    start_state, start_lr = copy.deepcopy(trainer.state), trainer.lr
    table = [{"lr": None, "held_out_loss": _loss(trainer, held_out)}]
    tried = {}

    def loss_at(i: int) -> float:
        if i not in tried:
            tried[i] = _trial(trainer, start_state, candidates[i], steps, step_batches, held_out, schedule, warmup)
            table.append({"lr": candidates[i], "held_out_loss": tried[i]})
            log(f"lr trial {candidates[i]:g}: held-out loss {table[0]['held_out_loss']:.4f} -> {tried[i]:.4f} "
                f"after {steps} steps")
        return tried[i]

    try:
        i = min(max(0, start), len(candidates) - 1)
        j = min(i + 1, len(candidates) - 1)
        lower = loss_at(i)
        step = 1 if loss_at(j) < lower else -1
        best = j if step == 1 else i
        while 0 <= best + step < len(candidates) and loss_at(best + step) < loss_at(best):
            best += step
    finally:
        trainer.state, trainer.lr = start_state, start_lr
        trainer.reset_grad()
    return candidates[best], table
