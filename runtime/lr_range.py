"""The learning rate when the user gives none: a short trial of each candidate from the run's
starting state, judged by the loss on a held-out slice of the TRAINING data (the eval data is
never looked at). The trials leave the trainer's state as it was."""
from __future__ import annotations

import copy
from typing import Callable, List, Sequence, Tuple

import numpy as np

CANDIDATES = (1e-3, 3e-3, 1e-2, 3e-2)
TRIAL_STEPS = 12


def _loss(trainer, batches: Sequence[Sequence[np.ndarray]]) -> float:
    losses = [(trainer.eval_step(b)[0], len(b[-1])) for b in batches]
    return float(sum(l * n for l, n in losses) / sum(n for _, n in losses))


def pick_lr(trainer, step_batches: Callable[[int], List[Sequence[np.ndarray]]],
            held_out: Sequence[Sequence[np.ndarray]], steps: int = TRIAL_STEPS,
            candidates: Sequence[float] = CANDIDATES, log=lambda m: None) -> Tuple[float, List[dict]]:
    """For each candidate: `steps` optimizer steps at that (constant) rate on `step_batches(s)`
    (the micro-batches of step s), then the mean loss on `held_out`. Returns the rate with the
    lowest held-out loss (a diverged trial counts as infinite) and the table of trials."""
    start, start_lr = copy.deepcopy(trainer.state), trainer.lr
    table = [{"lr": None, "held_out_loss": _loss(trainer, held_out)}]
    try:
        for lr in candidates:
            trainer.state, trainer.lr = copy.deepcopy(start), lr
            trainer.reset_grad()
            for s in range(steps):
                for micro in step_batches(s):
                    trainer.train_step(micro)
                trainer.optimizer_step()
            loss = _loss(trainer, held_out) if trainer.state.finite() else float("inf")
            table.append({"lr": lr, "held_out_loss": loss if np.isfinite(loss) else float("inf")})
            log(f"lr trial {lr:g}: held-out loss {table[0]['held_out_loss']:.4f} -> {loss:.4f} after {steps} steps")
    finally:
        trainer.state, trainer.lr = start, start_lr
        trainer.reset_grad()
    best = min(table[1:], key=lambda r: (r["held_out_loss"], r["lr"]))
    return best["lr"], table
