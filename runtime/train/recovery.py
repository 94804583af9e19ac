"""Divergence: detect it, find the records behind it, roll back.

A NaN/Inf loss, a finite loss far above the run's early loss, or a NaN/Inf in the update is a
divergence. The run goes back to its newest good checkpoint (the bundle's initial state if
there is none) with half the learning rate; after MAX_DIVERGENCE_RETRIES rollbacks it stops
at that last good state with a message that says why. A non-finite loss first looks for
culprits: records that are non-finite on their own. With --skip-bad they are dropped for the
rest of the run (and on resume: RunState.excluded) instead of lowering the learning rate.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..checkpoints import CheckpointStore
from ..data import Dataset
from ..fsutil import UserError
from .state import RunState

MAX_DIVERGENCE_RETRIES = 3
# A finite loss this many times the run's early loss (median of its first 10 steps) counts as
# divergence too: with too high a learning rate the loss explodes to 1e11 long before it is Inf.
EXPLODED_FACTOR = 1000.0


def diverged(loss: float, losses: Sequence[float]) -> Optional[str]:
    """Why this step's loss is a divergence (None: it is not), given the losses of the steps so far."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    ref = float(np.median(losses[:10])) if losses else None
    if ref is not None and loss > EXPLODED_FACTOR * max(ref, 1e-3):
        return f"loss exploded to {loss:.4g} (early loss {ref:.4g})"
    return None


def culprits(trainer, ds: Dataset, idx: np.ndarray) -> List[int]:
    """Records of the batch whose loss is NaN/Inf on their own (the state is still the last good one:
    the loss is checked before the optimizer step). Empty if the batch as a whole is the problem."""
    bad = []
    for i in idx:
        try:
            loss = float(trainer.eval_step(ds.batch(np.array([i])))[0])
        except Exception:  # noqa: BLE001 - a record that cannot even run is a culprit too
            loss = float("nan")
        if not math.isfinite(loss):
            bad.append(int(i))
    trainer.close_eval()
    return bad if len(bad) < len(idx) or len(idx) == 1 else []


def without(full: Dataset, excluded: Sequence[int], source) -> Tuple[Dataset, np.ndarray]:
    """The training set less the excluded records, and the positions in `full` of those it keeps."""
    keep = np.setdiff1d(np.arange(len(full)), np.array(excluded, dtype=np.int64))
    if keep.size == 0:
        raise UserError(f"{source}: every training record was dropped as bad")
    return full.take(keep, full.skipped + len(excluded)), keep


def rollback(state: RunState, why: str, named: List[str], dropped: int, store: CheckpointStore,
             log: Callable[[str], None]) -> Tuple[Optional[Path], Optional[str]]:
    """Note the divergence in `state` and rewind its step and losses to the newest good checkpoint.
    The learning rate is halved unless `dropped` records were excluded instead (their positions are
    already in state.excluded); `named`: the culprits, as data.describe names them. Returns the
    checkpoint to load (None: the bundle's initial state) and, after MAX_DIVERGENCE_RETRIES
    rollbacks, the message the run stops with (else None)."""
    entry = {"step": state.step, "why": why, "lr_scale": state.lr_scale}
    if named:
        entry["bad_records"] = named
    if dropped:
        entry["excluded"] = dropped
    state.divergences.append(entry)
    found = store.latest(warn=log)
    path, good = (found[0], RunState.from_record(found[1])) if found else (None, RunState())
    where = path.name if path else "the bundle's initial state"
    state.step = good.step
    state.losses = list(good.losses)[: state.step]
    state.evals = [e for e in state.evals if e[0] <= state.step]
    if dropped:
        log(f"{why} at step {entry['step']}: dropped {dropped} bad record(s) ({', '.join(named)}); "
            f"rolled back to {where}")
        return path, None
    tries = sum(1 for d in state.divergences if "excluded" not in d)
    if tries > MAX_DIVERGENCE_RETRIES:
        hint = (f"records that are non-finite on their own: {', '.join(named)} (fix them or pass --skip-bad)"
                if named else "lower --lr (the update overflows) or check the data for extreme values")
        message = (f"training diverged {tries} times ({why} at step {entry['step']}); "
                   f"{MAX_DIVERGENCE_RETRIES} rollbacks with a halved learning rate did not help; "
                   f"stopped at the last good state: step {state.step} ({where}). {hint}")
        log(message)
        return path, message
    state.lr_scale *= 0.5
    log(f"{why} at step {entry['step']}" + (f" (bad records: {', '.join(named)})" if named else "")
        + f": rolled back to {where} (step {state.step}), learning rate x{state.lr_scale:g}")
    return path, None
