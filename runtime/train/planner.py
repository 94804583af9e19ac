"""The micro-batch under the memory budget.

At the start, `measure` runs a train step at micro-batch 1 and 4, extrapolates the peak RSS
linearly and takes the largest divisor of the effective batch that fits in 90 % of the budget
(then measures that size too). During the run the micro-batch only steps down (halves, the
accumulation keeps the effective batch): when a step's peak RSS is over the budget, when an
allocation fails, on SIGUSR1, or when a lower budget is written to the control file (`Controls`).
"""
from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path
from typing import Callable, Dict

import numpy as np

from ..fsutil import UserError
from .state import RunState


def forced(micro: int, effective: int) -> Dict[str, object]:
    """The plan of --micro-batch (nothing measured)."""
    return {"micro_batch": micro, "effective_batch": effective, "accumulation": max(1, effective // micro),
            "forced": True}


def measure(trainer, ds, sampler, effective: int, budget_mb: float, log: Callable[[str], None]) -> Dict[str, object]:
    """Measure the peak RSS of a train step at micro-batch 1 and 4 (gradients are reset afterwards,
    so the probe changes nothing) and pick the largest micro-batch that fits."""
    def peak_of(b: int) -> float:
        sampler.reset()
        trainer.train_step(ds.batch(np.arange(min(b, len(ds)))))
        trainer.reset_grad()
        return sampler.peak_mb()

    peak_of(1)                                   # warm-up: the first run allocates kernels and caches
    p1 = peak_of(1)
    probe = min(4, effective, len(ds))
    pk = peak_of(probe) if probe > 1 else p1
    slope = max(0.0, (pk - p1) / max(1, probe - 1))
    if p1 > budget_mb:
        raise UserError(f"even micro-batch 1 needs ~{p1:.0f} MB peak RSS, above the memory budget "
                        f"{budget_mb:.0f} MB; raise --memory-budget-mb, pick a larger profile, or "
                        "export fewer layers (--include/--exclude)")
    fits = [b for b in range(1, effective + 1)
            if effective % b == 0 and (b == 1 or p1 + (b - 1) * slope <= 0.9 * budget_mb)]
    # check the extrapolation at the chosen size; a larger-than-linear peak moves down a size
    measured = None
    while len(fits) > 1:
        measured = peak_of(fits[-1])
        if measured <= 0.9 * budget_mb:
            break
        fits.pop()
    micro = fits[-1]
    plan = {"micro_batch": micro, "accumulation": effective // micro, "effective_batch": effective,
            "peak_mb_at_1": round(p1, 1), "mb_per_sample": round(slope, 3),
            "predicted_peak_mb": round(p1 + (micro - 1) * slope, 1),
            "measured_peak_mb": round(measured if measured is not None and micro > 1 else p1, 1)}
    log(f"memory plan: micro-batch {micro} x {plan['accumulation']} accumulation "
        f"(measured peak {plan['measured_peak_mb']} MB of {budget_mb:.0f} MB budget)")
    return plan


def step_down(state: RunState, why: str, log: Callable[[str], None]) -> bool:
    """Halve the run's micro-batch (noted in state.stepdowns); False if it is 1 already."""
    if state.micro_batch <= 1:
        return False
    state.plan["micro_batch"] = max(1, state.micro_batch // 2)
    state.stepdowns.append({"step": state.step, "why": why, "micro_batch": state.micro_batch})
    log(f"{why}: micro-batch -> {state.micro_batch}")
    return True


def is_alloc_failure(e: Exception) -> bool:
    """onnxruntime raises RuntimeException (a RuntimeError subclass) when an allocation fails."""
    text = str(e).lower()
    return isinstance(e, MemoryError) or "alloc" in text or "out of memory" in text or "bad_alloc" in text


class Controls:
    """Requests from outside a running `adapt`, acted on at its next step: a memory budget written
    to the control file (`{"memory_budget_mb": N}`, re-read when it changes) and SIGUSR1 (halve
    the micro-batch)."""

    def __init__(self, path: Path, log: Callable[[str], None]):
        self.path, self.log = Path(path), log
        self._mtime = None
        self._halve = False

    def budget(self, current: float) -> float:
        """The control file's budget if the file changed since the last look, else `current`."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return current
        if mtime == self._mtime:
            return current
        self._mtime = mtime
        try:
            new = float(json.loads(self.path.read_text())["memory_budget_mb"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log(f"{self.path}: ignored ({type(e).__name__}: {e}); want {{\"memory_budget_mb\": N}}")
            return current
        if new != current:
            self.log(f"memory budget changed by {self.path.name}: {current:.0f} -> {new:.0f} MB")
        return new

    def halve_requested(self) -> bool:
        """Whether SIGUSR1 came since the last call."""
        asked, self._halve = self._halve, False
        return asked

    @contextlib.contextmanager
    def listening(self):
        """SIGUSR1 handled while the block runs (only in the main thread: signals go there)."""
        old = None
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGUSR1, self._on_sigusr1)
        try:
            yield self
        finally:
            if old is not None:
                signal.signal(signal.SIGUSR1, old)

    def _on_sigusr1(self, signum, frame) -> None:   # a signal handler only sets a flag
        self._halve = True
