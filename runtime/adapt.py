"""The on-device adaptation loop: plan the batch under the memory budget, run sparse
updates with ORT's training API while metering energy and memory, checkpoint, resume."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from . import bundle as B
from .checkpoints import CheckpointStore
from .data import Dataset, load_dataset, split
from .fsutil import UserError, atomic_path
from .ort_train import Checkpoint, Trainer
from .profiles import DeviceProfile, load_profile
from .telemetry import MemorySampler, make_power_meter, rss_mb


@dataclass
class AdaptOptions:
    data: str
    profile: str = "host-cpu"
    eval_data: Optional[str] = None
    power_mode: Optional[str] = None
    memory_budget_mb: Optional[float] = None
    energy_budget_j: Optional[float] = None
    max_seconds: Optional[float] = None
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 32              # effective batch (micro-batch x accumulation)
    micro_batch: Optional[int] = None  # force the micro-batch (skips planning)
    lr: Optional[float] = None
    schedule: str = "cosine"          # cosine | linear | constant
    warmup: int = 10
    eval_every: int = 0
    checkpoint_every: int = 50
    keep: int = 2
    resume: bool = False
    fresh: bool = False
    run_dir: Optional[str] = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    quiet: bool = False


def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t)


def batch_indices(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """The examples of global step `step`: a per-epoch permutation, fixed by (seed, epoch).
    A resumed run therefore sees exactly the data an uninterrupted one would."""
    per_epoch = max(1, math.ceil(n / batch))
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[pos * batch:(pos + 1) * batch]


def accuracy(trainer: Trainer, ds: Dataset, batch: int) -> float:
    correct = 0
    for idx in ds.batches(batch):
        logits = trainer.eval_step(ds.batch(idx))[1]
        correct += int((logits.argmax(-1) == ds.labels[idx]).sum())
    return correct / max(1, len(ds))


class Progress:
    def __init__(self, total: Optional[int], quiet: bool):
        self.total, self.quiet, self.last = total, quiet, 0.0

    def __call__(self, step, loss, rate, mem, energy, est, force=False):
        now = time.monotonic()
        if self.quiet or (not force and now - self.last < 0.5):
            return
        self.last = now
        total = f"/{self.total}" if self.total else ""
        frac = (step / self.total) if self.total else 0
        bar = ("#" * int(20 * frac)).ljust(20) if self.total else ""
        end = "\n" if force else "\r"
        print(f"[adapt] {bar} step {step}{total}  loss {loss:.4f}  {rate:.2f} step/s  "
              f"mem {mem:.0f} MB  energy {energy:.1f} J{' (est)' if est else ''}   ", end=end, file=sys.stderr,
              flush=True)


def plan_batch(trainer: Trainer, ds: Dataset, effective: int, budget_mb: float, sampler: MemorySampler,
               log: Callable[[str], None]) -> Dict[str, object]:
    """Measure the peak RSS of a train step at micro-batch 1 and 4 (gradients are reset
    afterwards, so the probe changes nothing) and pick the largest micro-batch that fits."""
    def peak_of(b: int) -> float:
        sampler.reset()
        trainer.train_step(ds.batch(np.arange(min(b, len(ds)))))
        trainer.module.lazy_reset_grad()
        return sampler.peak_mb()

    peak_of(1)                                   # warm-up: first run allocates kernels/caches
    p1 = peak_of(1)
    probe = min(4, effective, len(ds))
    pk = peak_of(probe) if probe > 1 else p1
    slope = max(0.0, (pk - p1) / max(1, probe - 1))
    if p1 > budget_mb:
        raise UserError(f"even micro-batch 1 needs ~{p1:.0f} MB peak RSS, above the memory budget "
                        f"{budget_mb:.0f} MB; raise --memory-budget-mb, pick a larger profile, or export "
                        "with a layer cut-off / smaller model")
    micro = 1
    for b in (2, 4, 8, 16, 32, 64, 128, 256):
        if b > effective or effective % b:
            continue
        if p1 + (b - 1) * slope <= 0.9 * budget_mb:
            micro = b
    plan = {"micro_batch": micro, "accumulation": effective // micro, "effective_batch": effective,
            "peak_mb_at_1": round(p1, 1), "mb_per_sample": round(slope, 2),
            "predicted_peak_mb": round(p1 + (micro - 1) * slope, 1)}
    log(f"memory plan: micro-batch {micro} x {plan['accumulation']} accumulation "
        f"(predicted peak {plan['predicted_peak_mb']} MB of {budget_mb:.0f} MB budget)")
    return plan


def adapt(bundle_dir, opts: AdaptOptions, log: Callable[[str], None] = None) -> dict:
    log = log or (lambda m: None if opts.quiet else print(f"[adapt] {m}", file=sys.stderr, flush=True))
    bundle_dir = Path(bundle_dir)
    manifest = B.load_bundle(bundle_dir)
    profile: DeviceProfile = load_profile(opts.profile)
    budget_mb = float(opts.memory_budget_mb or profile.budget_mb)
    energy_budget = opts.energy_budget_j if opts.energy_budget_j is not None else profile.energy_budget_j
    train_ds = load_dataset(opts.data, manifest, bundle_dir)
    if opts.eval_data:
        eval_ds, eval_source = load_dataset(opts.eval_data, manifest, bundle_dir), opts.eval_data
    else:
        train_ds, eval_ds = split(train_ds, 0.1, opts.seed)
        eval_source = f"holdout 10% of {opts.data}"
    effective = max(1, min(opts.batch_size, len(train_ds)))

    store = CheckpointStore(opts.run_dir or bundle_dir / "run", keep=opts.keep)
    state: dict = {}
    ckpt_path = bundle_dir / B.CHECKPOINT
    if opts.resume:
        found = store.latest(warn=log)
        if found is None:
            log(f"no checkpoint in {store.dir}; starting from the bundle")
        else:
            ckpt_path, state = found
            log(f"resuming from {ckpt_path.name} (step {state['step']})")
    elif store.steps():
        if not opts.fresh:
            raise UserError(f"{store.dir} already holds checkpoints; pass --resume to continue them "
                            "or --fresh to start over")
        store.clear()

    checkpoint = Checkpoint(ckpt_path)
    trainer = Trainer(bundle_dir / B.TRAINING_MODEL, bundle_dir / B.EVAL_MODEL, bundle_dir / B.OPTIMIZER_MODEL,
                      checkpoint, device=opts.device, threads=opts.threads)
    sampler = MemorySampler(interval_ms=5)
    sampler.start()
    meter = make_power_meter(profile)
    meter.start()

    steps_per_epoch = math.ceil(len(train_ds) / effective)
    total = opts.steps or (int(math.ceil(opts.epochs * steps_per_epoch)) if opts.epochs else None)
    if total is None and not opts.max_seconds and energy_budget is None:
        total = steps_per_epoch
    base_lr = float(opts.lr or manifest.method.get("lr", 1e-3))
    plan = state.get("plan")
    if plan is None:
        if opts.micro_batch:
            plan = {"micro_batch": opts.micro_batch, "accumulation": max(1, effective // opts.micro_batch),
                    "effective_batch": effective, "forced": True}
        else:
            plan = plan_batch(trainer, train_ds, effective, budget_mb, sampler, log)
    micro, accum = int(plan["micro_batch"]), int(plan["accumulation"])
    effective = int(plan["effective_batch"])

    eval_batch = max(micro, 16)
    acc_before = state.get("accuracy_before")
    if acc_before is None:
        acc_before = accuracy(trainer, eval_ds, eval_batch)
        log(f"accuracy before adaptation: {acc_before:.4f} on {len(eval_ds)} examples ({eval_source})")

    step = int(state.get("step", 0))
    energy_prev = float(state.get("energy_j", 0.0))
    seconds_prev = float(state.get("seconds", 0.0))
    losses: List[float] = list(state.get("losses", []))
    evals: List[list] = list(state.get("evals", []))
    stepdowns: List[dict] = list(state.get("stepdowns", []))
    progress = Progress(total, opts.quiet)
    stop_reason, t0, last_step_j, run_steps = None, time.monotonic(), 0.0, 0

    def snapshot() -> dict:
        return {"step": step, "plan": {**plan, "micro_batch": micro, "accumulation": accum},
                "energy_j": energy_prev + meter.energy_j, "seconds": seconds_prev + time.monotonic() - t0,
                "losses": losses, "evals": evals, "accuracy_before": acc_before, "stepdowns": stepdowns,
                "seed": opts.seed, "effective_batch": effective}

    sampler.reset()
    while True:
        if total is not None and step >= total:
            stop_reason = "steps"
            break
        if opts.max_seconds and time.monotonic() - t0 >= opts.max_seconds:
            stop_reason = "max_seconds"
            break
        used = energy_prev + meter.energy_j
        if energy_budget is not None and used + last_step_j > energy_budget:
            stop_reason = "energy_budget"
            break
        idx = batch_indices(step, len(train_ds), effective, opts.seed)
        e_before = meter.energy_j
        loss_sum = 0.0
        for j in range(0, len(idx), micro):
            part = idx[j:j + micro]
            loss_sum += float(trainer.train_step(train_ds.batch(part))[0]) * len(part)
        trainer.lr = lr_at(step, total or 10 ** 9, base_lr, opts.schedule, opts.warmup)
        trainer.optimizer_step()
        loss = loss_sum / len(idx)
        losses.append(round(loss, 6))
        step += 1
        run_steps += 1
        meter.tick()
        last_step_j = meter.energy_j - e_before
        peak = sampler.peak_mb()
        if peak > budget_mb and micro > 1:
            micro, accum = micro // 2, accum * 2
            stepdowns.append({"step": step, "peak_mb": round(peak, 1), "micro_batch": micro})
            log(f"peak RSS {peak:.0f} MB over the {budget_mb:.0f} MB budget: micro-batch -> {micro} x {accum}")
            sampler.reset()
        elapsed = time.monotonic() - t0
        progress(step, loss, run_steps / max(elapsed, 1e-9), peak, energy_prev + meter.energy_j,
                 not meter.measured)
        if not math.isfinite(loss):
            stop_reason = "diverged"
            break
        if opts.eval_every and step % opts.eval_every == 0:
            evals.append([step, round(accuracy(trainer, eval_ds, eval_batch), 6)])
        if opts.checkpoint_every and step % opts.checkpoint_every == 0:
            store.save(checkpoint, snapshot(), step)
    meter.tick()
    progress(step, losses[-1] if losses else float("nan"), run_steps / max(time.monotonic() - t0, 1e-9),
             sampler.peak_mb(), energy_prev + meter.energy_j, not meter.measured, force=True)
    final = snapshot()
    ckpt = store.save(checkpoint, final, step)
    update_path = write_update(checkpoint, manifest, store.dir / "update.npz")
    acc_after = accuracy(trainer, eval_ds, eval_batch)
    sampler.stop()
    log(f"stopped ({stop_reason}) at step {step}; accuracy {acc_before:.4f} -> {acc_after:.4f}; "
        f"checkpoint {ckpt}")
    curve = losses
    return {
        "bundle": str(bundle_dir), "profile": profile.name, "stop_reason": stop_reason,
        "steps": step, "steps_this_run": run_steps, "effective_batch": effective,
        "loss": {"first": curve[0] if curve else None, "last": curve[-1] if curve else None,
                 "min": min(curve) if curve else None,
                 "first10_mean": float(np.mean(curve[:10])) if curve else None,
                 "last10_mean": float(np.mean(curve[-10:])) if curve else None,
                 "curve": curve[:: max(1, len(curve) // 50)]},
        "accuracy": {"before": acc_before, "after": acc_after, "eval_examples": len(eval_ds),
                     "eval_source": eval_source, "periodic": evals},
        "memory": {"budget_mb": budget_mb, "peak_rss_mb": round(sampler.peak_mb(), 1), "measured": True,
                   "source": "psutil RSS sampled every 5 ms", "plan": plan, "stepdowns": stepdowns,
                   "final_micro_batch": micro},
        "energy": {"joules": round(energy_prev + meter.energy_j, 2), "budget_j": energy_budget,
                   "measured": bool(meter.measured), "source": meter.source},
        "time": {"seconds": round(seconds_prev + time.monotonic() - t0, 2),
                 "seconds_this_run": round(time.monotonic() - t0, 2),
                 "steps_per_second": round(run_steps / max(time.monotonic() - t0, 1e-9), 3)},
        "trainable": {"update": manifest.update_params, "head": manifest.head_params,
                      "share_of_weights": manifest.update_share},
        "checkpoint": str(ckpt), "update": str(update_path),
        "update_bytes": update_path.stat().st_size,
    }


def write_update(checkpoint: Checkpoint, manifest: B.Manifest, path: Path) -> Path:
    """The trained tensors only (deltas / LoRA factors / head): what `merge` folds into the base model."""
    arrays = {name: checkpoint.get(name) for name in manifest.trainable_names}
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path
