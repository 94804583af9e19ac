"""The on-device adaptation loop.

plan the micro-batch under the memory budget -> sparse steps on plain onnxruntime (the bundle's
standard-ONNX step graph; AdamW on the trainable state in numpy), metering energy and memory
-> periodic eval and atomic checkpoints -> stop at the step/time/energy budget -> final
checkpoint, update.npz and a report.

Robustness (power loss, divergence, memory pressure) lives here too: the data order is
a function of the step alone, so `--resume` replays exactly; a NaN/Inf loss or update
rolls back to the last good checkpoint with a lower learning rate (3 tries); a lowered
budget in the control file or a failed allocation steps the micro-batch down.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from . import bundle as B
from .checkpoints import CheckpointStore
from .data import Dataset, load_dataset, split
from .options import AdaptOptions, options  # noqa: F401  (re-exported: the API adapt(bundle, options(...)))
from .fsutil import UserError, atomic_path
from .trainer import Trainer, TrainState
from .profiles import load_profile
from .telemetry import MemorySampler, make_power_meter

MAX_DIVERGENCE_RETRIES = 3
# A finite loss this many times the run's early loss (median of its first 10 steps) counts as
# divergence too: with too high a learning rate the loss explodes to 1e11 long before it is Inf.
EXPLODED_FACTOR = 1000.0

# TEST-ONLY fault-injection hooks (used by tests/faults; unset in production, where they do nothing):
#   TASKEDGE_FAULT_ALLOC_FAIL_AT_STEP=N  raise MemoryError once from the train step at step N
#   TASKEDGE_FAULT_NAN_AT_STEP=N         report a NaN loss once at step N (a transient divergence)
# and fsutil.TASKEDGE_FAULT_DELAY_CKPT (widen the checkpoint write window).
_FAULTS_FIRED: set = set()


def _fault_at(name: str, step: int) -> bool:
    v = os.environ.get(name)
    if v is None or name in _FAULTS_FIRED or int(v) != step:
        return False
    _FAULTS_FIRED.add(name)
    return True


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
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


def accuracy(trainer: Trainer, ds: Dataset, batch: int) -> float:
    correct = 0
    for idx in ds.batches(batch):
        logits = trainer.eval_step(ds.batch(idx))[1]
        correct += int((logits.argmax(-1) == ds.labels[idx]).sum())
    trainer.close_eval()                  # the eval session's memory is not held during training
    return correct / max(1, len(ds))


def _is_alloc_failure(e: Exception) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "alloc" in text or "out of memory" in text or "bad_alloc" in text


class Progress:
    """One status line on stderr, refreshed at most twice a second."""

    def __init__(self, total: Optional[int], quiet: bool):
        self.total, self.quiet, self.last = total, quiet, 0.0
        self.tty = sys.stderr.isatty()          # a log file gets a plain line every 10 s instead

    def __call__(self, step, loss, rate, mem, budget, energy, estimated, final=False):
        now = time.monotonic()
        if self.quiet or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        bar = ""
        if self.total:
            done = int(20 * min(1.0, step / self.total))
            bar = "[" + "#" * done + "." * (20 - done) + "] "
        total = f"/{self.total}" if self.total else ""
        print(f"{chr(13) if self.tty else ''}[adapt] {bar}step {step}{total}  loss {loss:.4f}  {rate:.2f} step/s  "
              f"mem {mem:.0f}/{budget:.0f} MB  energy {energy:.1f} J{' (est)' if estimated else ''}  ",
              end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


class Session:
    """One adaptation run over a bundle; `run()` returns the report."""

    def __init__(self, bundle_dir, opts: AdaptOptions, log: Optional[Callable[[str], None]] = None):
        self.opts = opts
        self.log = log or (lambda m: None if opts.quiet else print(f"\r[adapt] {m}", file=sys.stderr, flush=True))
        if opts.from_run:
            self.log("resuming with the run's settings: " + " ".join(
                _flag(k) if v is True else f"{_flag(k)} {v}" for k, v in opts.from_run.items()))
        self.dir = Path(bundle_dir)
        self.manifest = B.load_bundle(self.dir)
        self.profile = load_profile(opts.profile)
        if opts.power_mode:
            self.profile.mode_watts(opts.power_mode)          # validates the mode name
        self.budget_mb = float(opts.memory_budget_mb or self.profile.budget_mb)
        self.energy_budget = opts.energy_budget_j if opts.energy_budget_j is not None \
            else self.profile.energy_budget_j
        self.train_ds = load_dataset(opts.data, self.manifest, self.dir, skip_bad=opts.skip_bad)
        if opts.eval_data:
            self.eval_ds = load_dataset(opts.eval_data, self.manifest, self.dir, skip_bad=opts.skip_bad)
            self.eval_source = str(opts.eval_data)
        else:
            self.train_ds, self.eval_ds = split(self.train_ds, 0.1, opts.seed)
            self.eval_source = f"holdout 10% of {opts.data}"
        if len(self.train_ds) == 0:
            raise UserError(f"{opts.data}: no training records left")
        self.full_train = self.train_ds
        self.excluded: List[int] = []        # positions in full_train dropped at run time (--skip-bad)
        self.store = CheckpointStore(opts.run_dir or self.dir / "run", keep=opts.keep)
        self.control = Path(opts.control_file) if opts.control_file else self.store.dir / "control.json"
        self._control_mtime = None
        self.state: Dict[str, object] = {}
        self.model_bytes = int(self.manifest.files[B.WEIGHTS]["bytes"])     # the frozen weights
        self.trainer: Optional[Trainer] = None

    # -- setup ----------------------------------------------------------------
    def _open(self, ckpt_path: Optional[Path]) -> None:
        """Load the trainable state of a checkpoint (None: the bundle's initial state); the
        onnxruntime session is created once and kept."""
        state = TrainState.initial(self.dir, self.manifest) if ckpt_path is None else \
            TrainState.from_file(ckpt_path, self.manifest.trainable_names)
        if self.trainer is None:
            self.trainer = Trainer(self.dir, self.manifest, state, device=self.opts.device, threads=self.opts.threads,
                                   providers=self.profile.execution_providers)
        else:
            self.trainer.state = state
            self.trainer.reset_grad()

    def _start_point(self) -> Optional[Path]:
        if self.opts.resume:
            found = self.store.latest(warn=self.log)
            self.resume_info = {"from": None, "skipped_bad_checkpoints": list(self.store.skipped)}
            if found is not None:
                path, self.state = found
                self.resume_info["from"] = str(path)
                self.log(f"resuming from {path.name} (step {self.state['step']})")
                return path
            self.log(f"no good checkpoint in {self.store.dir}; starting from the bundle"
                     + (f" ({len(self.store.skipped)} bad ones skipped)" if self.store.skipped else ""))
        elif self.store.steps():
            if not self.opts.fresh:
                raise UserError(f"{self.store.dir} already holds checkpoints; pass --resume to continue them "
                                "or --fresh to start over")
            self.store.clear()
        return None

    def plan_batch(self, effective: int) -> Dict[str, object]:
        """Measure the peak RSS of a train step at micro-batch 1 and 4 (gradients are reset
        afterwards, so the probe changes nothing) and pick the largest micro-batch that fits."""
        def peak_of(b: int) -> float:
            self.sampler.reset()
            self.trainer.train_step(self.train_ds.batch(np.arange(min(b, len(self.train_ds)))))
            self.trainer.reset_grad()
            return self.sampler.peak_mb()

        peak_of(1)                                   # warm-up: the first run allocates kernels and caches
        p1 = peak_of(1)
        probe = min(4, effective, len(self.train_ds))
        pk = peak_of(probe) if probe > 1 else p1
        slope = max(0.0, (pk - p1) / max(1, probe - 1))
        if p1 > self.budget_mb:
            raise UserError(f"even micro-batch 1 needs ~{p1:.0f} MB peak RSS, above the memory budget "
                            f"{self.budget_mb:.0f} MB; raise --memory-budget-mb, pick a larger profile, or "
                            "export fewer layers (--include/--exclude)")
        fits = [b for b in range(1, effective + 1)
                if effective % b == 0 and (b == 1 or p1 + (b - 1) * slope <= 0.9 * self.budget_mb)]
        # check the extrapolation at the chosen size; a larger-than-linear peak moves down a size
        measured = None
        while len(fits) > 1:
            measured = peak_of(fits[-1])
            if measured <= 0.9 * self.budget_mb:
                break
            fits.pop()
        micro = fits[-1]
        plan = {"micro_batch": micro, "accumulation": effective // micro, "effective_batch": effective,
                "peak_mb_at_1": round(p1, 1), "mb_per_sample": round(slope, 3),
                "predicted_peak_mb": round(p1 + (micro - 1) * slope, 1),
                "measured_peak_mb": round(measured if measured is not None and micro > 1 else p1, 1)}
        self.log(f"memory plan: micro-batch {micro} x {plan['accumulation']} accumulation "
                 f"(measured peak {plan['measured_peak_mb']} MB of {self.budget_mb:.0f} MB budget)")
        return plan

    # -- control --------------------------------------------------------------
    def _read_control(self) -> None:
        """A lowered memory budget written to the control file takes effect at the next step."""
        try:
            mtime = self.control.stat().st_mtime_ns
        except OSError:
            return
        if mtime == self._control_mtime:
            return
        self._control_mtime = mtime
        try:
            new = float(json.loads(self.control.read_text())["memory_budget_mb"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log(f"{self.control}: ignored ({type(e).__name__}: {e}); want {{\"memory_budget_mb\": N}}")
            return
        if new != self.budget_mb:
            self.log(f"memory budget changed by {self.control.name}: {self.budget_mb:.0f} -> {new:.0f} MB")
            self.budget_mb = new
            self.sampler.reset()

    def _step_down(self, why: str) -> bool:
        if self.micro <= 1:
            return False
        self.micro = max(1, self.micro // 2)
        self.stepdowns.append({"step": self.step, "why": why, "micro_batch": self.micro})
        self.log(f"{why}: micro-batch -> {self.micro}")
        self.sampler.reset()
        return True

    def _on_sigusr1(self, signum, frame) -> None:   # signal handler: only set a flag, act at the next step
        self._halve_requested = True

    def _exclude(self, positions: List[int]) -> None:
        """Drop records (positions in the full training split) for the rest of the run."""
        self.excluded = sorted(set(self.excluded) | set(int(p) for p in positions))
        keep = np.setdiff1d(np.arange(len(self.full_train)), np.array(self.excluded, dtype=np.int64))
        if keep.size == 0:
            raise UserError(f"{self.opts.data}: every training record was dropped as bad")
        self.train_ds = self.full_train.take(keep, self.full_train.skipped + len(self.excluded))
        self._positions = keep

    # -- one optimizer step ---------------------------------------------------
    def _train_step(self, idx: np.ndarray) -> float:
        while True:
            try:
                if _fault_at("TASKEDGE_FAULT_ALLOC_FAIL_AT_STEP", self.step):
                    raise MemoryError("test-only fault hook TASKEDGE_FAULT_ALLOC_FAIL_AT_STEP")
                if _fault_at("TASKEDGE_FAULT_NAN_AT_STEP", self.step):
                    return float("nan")
                loss_sum = 0.0
                for j in range(0, len(idx), self.micro):
                    part = idx[j:j + self.micro]
                    loss_sum += self.trainer.train_step(self.train_ds.batch(part))[0] * len(part)
                return loss_sum / len(idx)
            except Exception as e:  # ORT raises RuntimeException (a RuntimeError subclass) on allocation failure
                if not _is_alloc_failure(e):
                    raise
                self.trainer.reset_grad()
                if not self._step_down(f"allocation failed at step {self.step} ({str(e)[:80]})"):
                    raise UserError(f"allocation failed even at micro-batch 1: {e}") from None

    def _update_finite(self) -> bool:
        return self.trainer.state.finite()

    def _culprits(self, idx: np.ndarray) -> List[int]:
        """Records of the batch whose loss is NaN/Inf on their own (the state is still the last good one:
        the loss is checked before the optimizer step). Empty if the batch as a whole is the problem."""
        bad = []
        for i in idx:
            try:
                loss = float(self.trainer.eval_step(self.train_ds.batch(np.array([i])))[0])
            except Exception:  # noqa: BLE001 - a record that cannot even run is a culprit too
                loss = float("nan")
            if not math.isfinite(loss):
                bad.append(int(i))
        self.trainer.close_eval()
        return bad if len(bad) < len(idx) or len(idx) == 1 else []

    def _rollback(self, why: str, culprits: Optional[List[int]] = None) -> bool:
        """Back to the newest good checkpoint with half the learning rate; False after 3 tries.
        With --skip-bad, records that are non-finite on their own are dropped instead (no lr change)."""
        culprits = culprits or []
        named = [self.train_ds.describe(i) for i in culprits[:5]]
        entry = {"step": self.step, "why": why, "lr_scale": self.lr_scale}
        if named:
            entry["bad_records"] = named
        if culprits and self.opts.skip_bad:
            entry["excluded"] = len(culprits)
            self._exclude([int(self._positions[i]) for i in culprits])
        self.divergences.append(entry)
        found = self.store.latest(warn=self.log)
        path, state = found if found else (None, {"step": 0})
        self._open(path)                        # never keep (or checkpoint) a diverged state
        where = path.name if path else "the bundle's initial state"
        self._saved_at = None
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))[: self.step]
        self.evals = [e for e in self.evals if e[0] <= self.step]
        if culprits and self.opts.skip_bad:
            self.log(f"{why} at step {entry['step']}: dropped {len(culprits)} bad record(s) ({', '.join(named)}); "
                     f"rolled back to {where}")
            return True
        tries = sum(1 for d in self.divergences if "excluded" not in d)
        if tries > MAX_DIVERGENCE_RETRIES:
            hint = (f"records that are non-finite on their own: {', '.join(named)} (fix them or pass --skip-bad)"
                    if named else "lower --lr (the update overflows) or check the data for extreme values")
            self.stop_message = (f"training diverged {tries} times ({why} at step {entry['step']}); "
                                 f"{MAX_DIVERGENCE_RETRIES} rollbacks with a halved learning rate did not help; "
                                 f"stopped at the last good state: step {self.step} ({where}). {hint}")
            self.log(self.stop_message)
            return False
        self.lr_scale *= 0.5
        self.log(f"{why} at step {entry['step']}" + (f" (bad records: {', '.join(named)})" if named else "")
                 + f": rolled back to {where} (step {self.step}), learning rate x{self.lr_scale:g}")
        return True

    # --resume must see the same data (else it silently trains on another set or order) ...
    RESUME_SAME = {"data": "--data", "eval_data": "--eval-data", "records": "the record count of --data",
                   "seed": "--seed", "batch_size": "--batch-size"}
    # ... and may change the schedule (extend --steps, lower --lr, add --skip-bad) or the device profile:
    # noted in the log
    RESUME_MAY_CHANGE = {"steps": "--steps", "epochs": "--epochs", "lr": "--lr", "schedule": "--schedule",
                         "warmup": "--warmup", "skip_bad": "--skip-bad", "profile": "--profile",
                         "power_mode": "--power-mode"}

    def run_flags(self) -> dict:
        """The run's settings, recorded in every checkpoint (paths absolute, so --resume works from anywhere)."""
        o = self.opts
        return {"data": str(Path(o.data).resolve()), "eval_data": str(Path(o.eval_data).resolve()) if o.eval_data else None,
                "records": len(self.full_train), "steps": o.steps, "epochs": o.epochs,
                "lr": o.lr, "schedule": o.schedule, "warmup": o.warmup, "seed": o.seed,
                "batch_size": o.batch_size, "skip_bad": o.skip_bad,
                "profile": str(Path(o.profile).resolve()) if Path(o.profile).is_file() else o.profile,
                "power_mode": o.power_mode}

    def _check_resume_flags(self, saved: Optional[dict]) -> None:
        if not saved:                       # checkpoints written before the flags were recorded
            return
        now = self.run_flags()
        changed = {k: f"{saved[k]!r} then, {now[k]!r} now" for k in now if k in saved and saved[k] != now[k]}
        refused = [f"{self.RESUME_SAME[k]}: {v}" for k, v in changed.items() if k in self.RESUME_SAME]
        if refused:
            raise UserError("--resume with different data than the interrupted run (" + "; ".join(refused) +
                            "): leave these flags out to continue the run with its own, or pass --fresh to start over")
        notes = [f"{self.RESUME_MAY_CHANGE[k]}: {v}" for k, v in changed.items() if k in self.RESUME_MAY_CHANGE]
        if notes:
            self.log("resuming with changed settings (" + "; ".join(notes) + "); the schedule follows the new values")
        if self.resume_info is not None:
            self.resume_info["changed"] = {k: v for k, v in changed.items() if k in self.RESUME_MAY_CHANGE}
            self.resume_info["taken_from_run"] = dict(self.opts.from_run or {})

    def snapshot(self) -> dict:
        return {"flags": self.run_flags(), "step": self.step, "plan": {**self.plan, "micro_batch": self.micro}, "lr_scale": self.lr_scale,
                "energy_j": self.energy_prev + self.meter.energy_j,
                "seconds": self.seconds_prev + time.monotonic() - self.t0, "losses": self.losses,
                "evals": self.evals, "accuracy_before": self.acc_before, "stepdowns": self.stepdowns,
                "divergences": self.divergences, "excluded": self.excluded, "seed": self.opts.seed}

    # -- the loop -------------------------------------------------------------
    def run(self) -> dict:
        self.store.lock()                   # one writer per run folder; removes temp files of a killed run
        old_handler = None
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGUSR1, self._on_sigusr1)
        try:
            return self._run()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGUSR1, old_handler)
            self.store.unlock()

    def _run(self) -> dict:
        opts = self.opts
        self.resume_info = None
        self.stop_message = None
        self._saved_at = None
        self._halve_requested = False
        self._positions = np.arange(len(self.full_train))
        self._open(self._start_point())
        self._check_resume_flags(self.state.get("flags"))
        self.sampler = MemorySampler(interval_ms=5).start()
        self.meter = make_power_meter(self.profile, power_mode=opts.power_mode).start()
        effective = max(1, min(opts.batch_size, len(self.train_ds)))
        st = self.state
        self.plan = st.get("plan") or ({"micro_batch": opts.micro_batch, "effective_batch": effective,
                                        "accumulation": max(1, effective // opts.micro_batch), "forced": True}
                                       if opts.micro_batch else self.plan_batch(effective))
        self.micro, effective = int(self.plan["micro_batch"]), int(self.plan["effective_batch"])
        per_epoch = math.ceil(len(self.train_ds) / effective)
        total = opts.steps or (int(math.ceil(opts.epochs * per_epoch)) if opts.epochs else None)
        if total is None and not opts.max_seconds and opts.energy_budget_j is None:
            total = per_epoch
        base_lr = float(opts.lr or self.manifest.method.get("lr", 1e-3))
        eval_batch = max(self.micro, 16)
        self.acc_before = st.get("accuracy_before")
        if self.acc_before is None:
            self.acc_before = accuracy(self.trainer, self.eval_ds, eval_batch)
            self.log(f"accuracy before adaptation: {self.acc_before:.4f} on {len(self.eval_ds)} examples "
                     f"({self.eval_source})")
        self.step = int(st.get("step", 0))
        self.lr_scale = float(st.get("lr_scale", 1.0))
        self.energy_prev, self.seconds_prev = float(st.get("energy_j", 0.0)), float(st.get("seconds", 0.0))
        self.losses: List[float] = list(st.get("losses", []))
        self.evals: List[list] = list(st.get("evals", []))
        self.stepdowns: List[dict] = list(st.get("stepdowns", []))
        self.divergences: List[dict] = list(st.get("divergences", []))
        if st.get("excluded"):
            self._exclude(list(st["excluded"]))
        progress = Progress(total, opts.quiet)
        stop, last_step_j, run_steps = None, 0.0, 0
        self.t0 = time.monotonic()
        self.sampler.reset()
        while stop is None:
            if total is not None and self.step >= total:
                stop = "steps"
                break
            if opts.max_seconds and time.monotonic() - self.t0 >= opts.max_seconds:
                stop = "max_seconds"
                break
            used = self.energy_prev + self.meter.energy_j
            if self.energy_budget is not None and used + last_step_j > self.energy_budget:
                stop = "energy_budget"
                break
            self._read_control()
            if self._halve_requested:
                self._halve_requested = False
                self._step_down("SIGUSR1 received")
            e0 = self.meter.energy_j
            idx = batch_indices(self.step, len(self.train_ds), effective, opts.seed)
            loss = self._train_step(idx)
            if not math.isfinite(loss):
                self.trainer.reset_grad()
                stop = None if self._rollback(f"loss is {loss}", self._culprits(idx)) else "diverged"
                continue
            ref = float(np.median(self.losses[:10])) if self.losses else None
            if ref is not None and loss > EXPLODED_FACTOR * max(ref, 1e-3):
                self.trainer.reset_grad()
                stop = None if self._rollback(f"loss exploded to {loss:.4g} (early loss {ref:.4g})") else "diverged"
                continue
            self.trainer.lr = self.lr_scale * lr_at(self.step, total or 10 ** 9, base_lr, opts.schedule,
                                                    opts.warmup)
            self.trainer.optimizer_step()
            if not self._update_finite():
                stop = None if self._rollback("update has NaN/Inf") else "diverged"
                continue
            self.losses.append(round(loss, 6))
            self.step += 1
            run_steps += 1
            self.meter.tick()
            last_step_j = self.meter.energy_j - e0
            peak = self.sampler.peak_mb()
            if peak > self.budget_mb:
                self._step_down(f"peak RSS {peak:.0f} MB over the {self.budget_mb:.0f} MB budget")
            rate = run_steps / max(time.monotonic() - self.t0, 1e-9)
            progress(self.step, loss, rate, peak, self.budget_mb, self.energy_prev + self.meter.energy_j,
                     not self.meter.measured)
            if opts.eval_every and self.step % opts.eval_every == 0:
                self.evals.append([self.step, round(accuracy(self.trainer, self.eval_ds, eval_batch), 6)])
            if opts.checkpoint_every and self.step % opts.checkpoint_every == 0:
                self.store.save(self.trainer.state, self.snapshot(), self.step)
                self._saved_at = self.step
        self.meter.tick()
        progress(self.step, self.losses[-1] if self.losses else float("nan"),
                 run_steps / max(time.monotonic() - self.t0, 1e-9), self.sampler.peak_mb(), self.budget_mb,
                 self.energy_prev + self.meter.energy_j, not self.meter.measured, final=True)
        if self._saved_at == self.step:       # nothing changed since the last checkpoint: don't rewrite it
            ckpt = self.store.path(self.step)
        else:
            ckpt = self.store.save(self.trainer.state, self.snapshot(), self.step)
        update_path = write_update(self.trainer.state, self.manifest, self.store.dir / "update.npz")
        acc_after = accuracy(self.trainer, self.eval_ds, eval_batch)
        peak = self.sampler.stop()
        self.log(f"stopped ({stop}) at step {self.step}; accuracy {self.acc_before:.4f} -> {acc_after:.4f}; "
                 f"checkpoint {ckpt}")
        return self.report(stop, run_steps, total, acc_after, peak, ckpt, update_path, effective)

    def report(self, stop, run_steps, total, acc_after, peak, ckpt, update_path, effective) -> dict:
        curve, secs = self.losses, time.monotonic() - self.t0
        m = self.manifest
        return {
            "bundle": str(self.dir), "profile": self.profile.name, "stop_reason": stop,
            "steps": self.step, "steps_this_run": run_steps, "steps_planned": total, "effective_batch": effective,
            "loss": {"first": curve[0] if curve else None, "last": curve[-1] if curve else None,
                     "min": min(curve) if curve else None,
                     "first10_mean": float(np.mean(curve[:10])) if curve else None,
                     "last10_mean": float(np.mean(curve[-10:])) if curve else None,
                     "curve_every": max(1, len(curve) // 20), "curve": curve[:: max(1, len(curve) // 20)]},
            "accuracy": {"before": self.acc_before, "after": acc_after, "eval_examples": len(self.eval_ds),
                         "eval_source": self.eval_source, "periodic": self.evals},
            "memory": {"budget_mb": self.budget_mb, "peak_rss_mb": round(peak, 1), "measured": True,
                       "source": "psutil RSS of this process, sampled every 5 ms", "plan": self.plan,
                       "stepdowns": self.stepdowns, "final_micro_batch": self.micro},
            "energy": {"joules": round(self.energy_prev + self.meter.energy_j, 3), "budget_j": self.energy_budget,
                       "measured": bool(self.meter.measured), "source": self.meter.source,
                       "fallback_reason": getattr(self.meter, "fallback_reason", None)},
            "time": {"seconds": round(self.seconds_prev + secs, 2), "seconds_this_run": round(secs, 2),
                     "steps_per_second": round(run_steps / max(secs, 1e-9), 3)},
            "divergences": self.divergences, "lr_scale": self.lr_scale, "stop_message": self.stop_message,
            "resume": self.resume_info, "excluded_records": len(self.excluded),
            "skipped_records": self.train_ds.skipped + self.eval_ds.skipped,
            "trainable": {"update": m.update_params, "head": m.head_params, "share_of_weights": m.update_share},
            "checkpoint": str(ckpt), "checkpoint_bytes": ckpt.stat().st_size,
            "checkpoint_write_seconds": (self.store.last_write or {}).get("seconds"),
            "checkpoint_share_of_model": round(ckpt.stat().st_size / max(1, self.model_bytes), 6),
            "update": str(update_path), "update_bytes": update_path.stat().st_size,
            "runtime": {"onnxruntime": self.trainer.ort_version, "providers": self.trainer.providers},
        }


def adapt(bundle_dir, opts: AdaptOptions, log: Optional[Callable[[str], None]] = None) -> dict:
    return Session(bundle_dir, opts, log).run()


def write_update(state: TrainState, manifest: B.Manifest, path: Path) -> Path:
    """The trained tensors only (deltas / LoRA factors / head): what `merge` folds into the base model."""
    arrays = {name: state.params[name] for name in manifest.trainable_names}
    try:
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; the checkpoints in {path.parent} are intact "
                        "(free disk space, then --resume to write it again)") from None
    return path
