"""One adaptation run over a bundle: `adapt(bundle, options(...))` returns its report.

    start (resume.py) -> plan the micro-batch (planner.py) -> accuracy before -> the loop:
    each step's examples and learning rate (schedule.py), gradients accumulated over micro-
    batches, AdamW; a divergence rolls back (recovery.py), memory pressure steps the micro-batch
    down (planner.py); periodic eval and checkpoints (the trainable state + RunState, state.py)
    -> stop at the step, time or energy budget -> final checkpoint, update.npz, report (report.py).
"""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from .. import bundle as B, lr_range
from ..checkpoints import CheckpointStore
from ..data import Dataset, load_dataset, split
from ..fsutil import UserError, atomic_path
from ..gates import GatedTrainer
from ..options import AdaptOptions
from ..profiles import load_profile
from ..trainer import Trainer, TrainState
from . import faults, planner, recovery, report, resume
from .schedule import batch_indices, lr_at, planned_steps
from .state import RunState


class Session:
    """The run's fixed context (bundle, profile, data, run folder) and its live parts: the trainer,
    the meters and `state`, the RunState every checkpoint records."""

    def __init__(self, bundle_dir, opts: AdaptOptions, log: Optional[Callable[[str], None]] = None):
        self.opts = opts
        self.log = log or (lambda m: None if opts.quiet else print(f"\r[adapt] {m}", file=sys.stderr, flush=True))
        if opts.from_run:
            self.log("resuming with the run's settings: " + " ".join(
                resume.flag_name(k) if v is True else f"{resume.flag_name(k)} {v}" for k, v in opts.from_run.items()))
        self.dir = Path(bundle_dir)
        self.manifest = B.load_bundle(self.dir)
        self.profile = load_profile(opts.profile)
        if opts.power_mode:
            self.profile.mode_watts(opts.power_mode)          # validates the mode name
        self.budget_mb = float(opts.memory_budget_mb or self.profile.budget_mb)
        self.energy_budget = opts.energy_budget_j if opts.energy_budget_j is not None \
            else self.profile.energy_budget_j
        train = load_dataset(opts.data, self.manifest, self.dir, skip_bad=opts.skip_bad)
        if opts.eval_data:
            self.eval_ds = load_dataset(opts.eval_data, self.manifest, self.dir, skip_bad=opts.skip_bad)
            self.eval_source = str(opts.eval_data)
        else:
            train, self.eval_ds = split(train, 0.1, opts.seed)
            self.eval_source = f"holdout 10% of {opts.data}"
        if len(train) == 0:
            raise UserError(f"{opts.data}: no training records left")
        self.full_train = train
        self.train_ds, self.positions = train, np.arange(len(train))    # full_train less state.excluded
        self.store = CheckpointStore(opts.run_dir or self.dir / "run", keep=opts.keep)
        self.controls = planner.Controls(opts.control_file or self.store.dir / "control.json", self.log)
        self.model_bytes = int(self.manifest.files[B.WEIGHTS]["bytes"])     # the frozen weights
        self.state = RunState()
        self.planned: dict = {}                  # the micro-batch plan as this run started (for the report)
        self.trainer: Optional[Trainer] = None
        self.meters: Optional[report.Meters] = None
        self.resume_info: Optional[dict] = None
        self.stop_message: Optional[str] = None
        self.saved_at: Optional[int] = None      # step of the newest checkpoint this run wrote
        self.lr_choice: Optional[dict] = None    # how the learning rate was chosen (no --lr: trials)
        self.head_start: Optional[str] = "checkpoint"    # where the new head started (TrainState.fresh)

    # -- the run -----------------------------------------------------------------
    def run(self) -> dict:
        self.store.lock()                   # one writer per run folder; removes temp files of a killed run
        try:
            with self.controls.listening():
                return self._run()
        finally:
            self.store.unlock()

    def _run(self) -> dict:
        opts = self.opts
        path, self.state, self.resume_info = resume.start(self.store, opts, self.log)
        self._open(path)
        st = self.state
        flags = resume.run_flags(opts, len(self.full_train))
        resume.check_flags(st.flags, flags, opts, self.resume_info, self.log)
        st.flags, st.seed = flags, opts.seed
        self.meters = report.Meters(self.profile, opts.power_mode, st.energy_j, st.seconds)
        effective = max(1, min(opts.batch_size, len(self.train_ds)))
        st.plan = st.plan or (planner.forced(opts.micro_batch, effective) if opts.micro_batch else planner.measure(
            self.trainer, self.train_ds, self.meters.memory, effective, self.budget_mb, self.log))
        self.planned = dict(st.plan)
        effective = int(st.plan["effective_batch"])           # a resumed run keeps its plan
        total = planned_steps(opts, len(self.train_ds), effective)
        if opts.lr is None and self.manifest.method.get("lr") is None and st.step == 0:
            opts.lr = self._choose_lr(effective, total)
            st.flags = resume.run_flags(opts, len(self.full_train))    # --resume takes the chosen rate
        eval_batch = max(st.micro_batch, 16)
        if st.accuracy_before is None:
            st.accuracy_before = accuracy(self.trainer, self.eval_ds, eval_batch)
            self.log(f"accuracy before adaptation: {st.accuracy_before:.4f} on {len(self.eval_ds)} examples "
                     f"({self.eval_source})")
        if st.excluded:
            self._drop(())                  # the records the interrupted run dropped
        stop, run_steps = self._loop(total, effective, eval_batch)
        ckpt = self.store.path(st.step) if self.saved_at == st.step else self._save()   # unchanged: not rewritten
        update_path = write_update(TrainState(self.trainer.trained_params()), self.manifest,
                                   self.store.dir / "update.npz")
        acc_after = accuracy(self.trainer, self.eval_ds, eval_batch)
        peak = self.meters.memory.stop()
        self.log(f"stopped ({stop}) at step {st.step}; accuracy {st.accuracy_before:.4f} -> {acc_after:.4f}; "
                 f"checkpoint {ckpt}")
        return report.final(self, stop, run_steps, total, acc_after, peak, ckpt, update_path, effective)

    def _loop(self, total: Optional[int], effective: int, eval_batch: int) -> Tuple[str, int]:
        """Steps until a budget stops the run; returns why it stopped and the steps this process ran."""
        opts, st, meters = self.opts, self.state, self.meters
        base_lr = float(opts.lr or self.manifest.method.get("lr") or 1e-3)
        progress = report.Progress(total, opts.quiet)
        stop, last_step_j, run_steps = None, 0.0, 0
        meters.start_clock()
        meters.memory.reset()
        while stop is None:
            if total is not None and st.step >= total:
                stop = "steps"
                break
            if opts.max_seconds and meters.seconds_this_run() >= opts.max_seconds:
                stop = "max_seconds"
                break
            if self.energy_budget is not None and meters.energy_j() + last_step_j > self.energy_budget:
                stop = "energy_budget"
                break
            budget = self.controls.budget(self.budget_mb)
            if budget != self.budget_mb:
                self.budget_mb = budget
                meters.memory.reset()
            if self.controls.halve_requested():
                self._step_down("SIGUSR1 received")
            e0 = meters.power.energy_j
            idx = batch_indices(st.step, len(self.train_ds), effective, opts.seed)
            loss = self._train_step(idx)
            why = recovery.diverged(loss, st.losses)
            if why:
                self.trainer.reset_grad()
                bad = recovery.culprits(self.trainer, self.train_ds, idx) if not math.isfinite(loss) else []
                stop = None if self._rollback(why, bad) else "diverged"
                continue
            self.trainer.lr = st.lr_scale * lr_at(st.step, total or 10 ** 9, base_lr, opts.schedule, opts.warmup)
            self.trainer.optimizer_step()
            if not self.trainer.state.finite():
                stop = None if self._rollback("update has NaN/Inf") else "diverged"
                continue
            st.losses.append(round(loss, 6))
            st.step += 1
            run_steps += 1
            meters.power.tick()
            last_step_j = meters.power.energy_j - e0
            peak = meters.memory.peak_mb()
            if peak > self.budget_mb:
                self._step_down(f"peak RSS {peak:.0f} MB over the {self.budget_mb:.0f} MB budget")
            progress(st.step, loss, run_steps / max(meters.seconds_this_run(), 1e-9), peak, self.budget_mb,
                     meters.energy_j(), not meters.power.measured)
            if opts.eval_every and st.step % opts.eval_every == 0:
                st.evals.append([st.step, round(accuracy(self.trainer, self.eval_ds, eval_batch), 6)])
            if opts.checkpoint_every and st.step % opts.checkpoint_every == 0:
                self._save()
        meters.power.tick()
        progress(st.step, st.losses[-1] if st.losses else float("nan"),
                 run_steps / max(meters.seconds_this_run(), 1e-9), meters.memory.peak_mb(), self.budget_mb,
                 meters.energy_j(), not meters.power.measured, final=True)
        return stop, run_steps

    # -- its parts ---------------------------------------------------------------
    def _choose_lr(self, effective: int, total: Optional[int]) -> float:
        """No --lr and none in the bundle: short copies of the planned run (`total` steps) at the
        candidate rates from the start state, judged on a held-out slice of the training data
        (runtime/lr_range.py)."""
        n, micro = len(self.train_ds), self.state.micro_batch
        order = np.random.default_rng([self.opts.seed, 1]).permutation(n)
        held, rest = order[: max(1, min(128, n // 10))], order[max(1, min(128, n // 10)):]
        if len(rest) == 0:
            return 1e-3

        def step_batches(step: int):
            idx = rest[batch_indices(step, len(rest), effective, self.opts.seed)]
            return [self.train_ds.batch(idx[i:i + micro]) for i in range(0, len(idx), micro)]
        held_out = [self.train_ds.batch(held[i:i + micro]) for i in range(0, len(held), micro)]
        steps = lr_range.trial_steps(total)
        warmup = lr_range.trial_warmup(steps, total, self.opts.warmup)
        lr, table = lr_range.pick_lr(self.trainer, step_batches, held_out, steps, schedule=self.opts.schedule,
                                     warmup=warmup, log=self.log)
        self.trainer.close_eval()
        self.lr_choice = {"chosen_by": "trial", "trials": table, "trial_steps": steps,
                          "held_out_examples": int(len(held))}
        self.log(f"learning rate {lr:g}, chosen by {steps}-step trials ({self.opts.schedule}, {warmup} warm-up) "
                 f"walking {', '.join(f'{c:g}' for c in lr_range.CANDIDATES)} (held-out training loss)")
        return lr

    def _open(self, ckpt_path: Optional[Path]) -> None:
        """Load the trainable state of a checkpoint (None: `start_state()`); the onnxruntime session is
        created once and kept."""
        mix = self.opts.mix                                   # --init gates: the state is gates + head
        if ckpt_path is not None:
            state = TrainState.from_file(ckpt_path, mix.names if mix else self.manifest.trainable_names)
        else:
            state = self.start_state()
        if self.trainer is None:
            make = Trainer if mix is None else functools.partial(GatedTrainer, mix=mix)
            self.trainer = make(self.dir, self.manifest, state, device=self.opts.device, threads=self.opts.threads,
                                   providers=self.profile.execution_providers)
        else:
            self.trainer.state = state
            self.trainer.reset_grad()

    def start_state(self) -> TrainState:
        """The state a run starts from when there is no checkpoint to resume: --init's start carried
        over from a stored task, else the bundle's initial state with a new head at zero. (A fleet
        round starts from the global state instead: fleet/client.py.)"""
        if self.opts.initial is not None:
            self.head_start = "--init"
            return TrainState({k: np.array(v, dtype=np.float32) for k, v in self.opts.initial.items()})
        self.head_start = "zero" if self.manifest.head else None
        return TrainState.fresh(self.dir, self.manifest)

    def _save(self) -> Path:
        """A checkpoint of now: the trainable state and the RunState, energy and seconds brought up to date."""
        self.state.energy_j, self.state.seconds = self.meters.energy_j(), self.meters.seconds()
        path = self.store.save(self.trainer.state, self.state.to_record(), self.state.step)
        self.saved_at = self.state.step
        return path

    def _train_step(self, idx: np.ndarray) -> float:
        """Forward and backward over the micro-batches of `idx`, gradients accumulated; the mean loss.
        A failed allocation steps the micro-batch down and tries the step again."""
        step = self.state.step
        while True:
            try:
                if faults.fires(faults.ALLOC_FAIL_AT_STEP, step):
                    raise MemoryError("test-only fault hook TASKEDGE_FAULT_ALLOC_FAIL_AT_STEP")
                if faults.fires(faults.NAN_AT_STEP, step):
                    return float("nan")
                micro, loss_sum = self.state.micro_batch, 0.0
                for j in range(0, len(idx), micro):
                    part = idx[j:j + micro]
                    loss_sum += self.trainer.train_step(self.train_ds.batch(part))[0] * len(part)
                return loss_sum / len(idx)
            except Exception as e:
                if not planner.is_alloc_failure(e):
                    raise
                self.trainer.reset_grad()
                if not self._step_down(f"allocation failed at step {step} ({str(e)[:80]})"):
                    raise UserError(f"allocation failed even at micro-batch 1: {e}") from None

    def _step_down(self, why: str) -> bool:
        if not planner.step_down(self.state, why, self.log):
            return False
        self.meters.memory.reset()
        return True

    def _drop(self, positions: Sequence[int]) -> None:
        """Exclude records (positions in full_train) for the rest of the run."""
        self.state.excluded = sorted(set(self.state.excluded) | set(int(p) for p in positions))
        self.train_ds, self.positions = recovery.without(self.full_train, self.state.excluded, self.opts.data)

    def _rollback(self, why: str, culprits: Sequence[int] = ()) -> bool:
        """recovery.rollback, with --skip-bad's exclusion of the culprits; False: the run stops."""
        named = [self.train_ds.describe(i) for i in culprits[:5]]
        dropped = len(culprits) if self.opts.skip_bad else 0
        if dropped:
            self._drop([int(self.positions[i]) for i in culprits])
        path, self.stop_message = recovery.rollback(self.state, why, named, dropped, self.store, self.log)
        self._open(path)                        # never keep (or checkpoint) a diverged state
        self.saved_at = None
        return self.stop_message is None


def accuracy(trainer: Trainer, ds: Dataset, batch: int) -> float:
    """Share of correct predictions; a causal LM's: share of exactly matched answers (runtime/lm.py)."""
    from ..lm import is_causal_lm, metrics
    manifest = getattr(trainer, "manifest", None)          # the bench's peers are no Trainer and have none
    if manifest is not None and is_causal_lm(manifest):
        parts = [ds.batch(idx) for idx in ds.batches(batch)]
        result = metrics((trainer.eval_step(b)[1], b[-1]) for b in parts)
        trainer.close_eval()
        return result["accuracy"]
    correct = 0
    for idx in ds.batches(batch):
        logits = trainer.eval_step(ds.batch(idx))[1]
        correct += int((logits.argmax(-1) == ds.labels[idx]).sum())
    trainer.close_eval()                  # the eval session's memory is not held during training
    return correct / max(1, len(ds))


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


def adapt(bundle_dir, opts: AdaptOptions, log: Optional[Callable[[str], None]] = None) -> dict:
    return Session(bundle_dir, opts, log).run()
