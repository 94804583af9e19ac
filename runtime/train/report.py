"""What a run measures and tells: its meters, the status line while it runs, the final report.

`Meters` are the memory sampler (peak RSS, sampled every 5 ms), the power meter (measured or
estimated joules, runtime/telemetry.py) and the clock, with the energy and seconds of the runs
this one resumes added in. `final` builds the report `taskedge adapt --json` prints.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..telemetry import MemorySampler, make_power_meter

if TYPE_CHECKING:
    from .session import Session


class Meters:
    def __init__(self, profile, power_mode: Optional[str], energy_before: float, seconds_before: float):
        self.memory = MemorySampler(interval_ms=5).start()
        self.power = make_power_meter(profile, power_mode=power_mode).start()
        self.energy_before, self.seconds_before = energy_before, seconds_before
        self.t0 = time.monotonic()

    def start_clock(self) -> None:
        """The run's seconds count from here (after planning and the first accuracy)."""
        self.t0 = time.monotonic()

    def seconds_this_run(self) -> float:
        return time.monotonic() - self.t0

    def energy_j(self) -> float:
        """Joules of this run folder's runs, this one included."""
        return self.energy_before + self.power.energy_j

    def seconds(self) -> float:
        return self.seconds_before + self.seconds_this_run()


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


def final(s: "Session", stop, run_steps, total, acc_after, peak, ckpt, update_path, effective) -> dict:
    """The report of a finished run `s` (runtime/train/session.py)."""
    st, meter = s.state, s.meters.power
    curve, secs = st.losses, s.meters.seconds_this_run()
    m = s.manifest
    return {
        "bundle": str(s.dir), "profile": s.profile.name, "stop_reason": stop,
        "steps": st.step, "steps_this_run": run_steps, "steps_planned": total, "effective_batch": effective,
        "loss": {"first": curve[0] if curve else None, "last": curve[-1] if curve else None,
                 "min": min(curve) if curve else None,
                 "first10_mean": float(np.mean(curve[:10])) if curve else None,
                 "last10_mean": float(np.mean(curve[-10:])) if curve else None,
                 "curve_every": max(1, len(curve) // 20), "curve": curve[:: max(1, len(curve) // 20)]},
        "accuracy": {"before": st.accuracy_before, "after": acc_after, "eval_examples": len(s.eval_ds),
                     "eval_source": s.eval_source, "periodic": st.evals},
        "memory": {"budget_mb": s.budget_mb, "peak_rss_mb": round(peak, 1), "measured": True,
                   "source": "psutil RSS of this process, sampled every 5 ms", "plan": s.planned,
                   "stepdowns": st.stepdowns, "final_micro_batch": st.micro_batch},
        "energy": {"joules": round(s.meters.energy_j(), 3), "budget_j": s.energy_budget,
                   "measured": bool(meter.measured), "source": meter.source,
                   "fallback_reason": getattr(meter, "fallback_reason", None)},
        "time": {"seconds": round(s.meters.seconds_before + secs, 2), "seconds_this_run": round(secs, 2),
                 "steps_per_second": round(run_steps / max(secs, 1e-9), 3)},
        "lr": {"peak": float(s.opts.lr or s.manifest.method.get("lr") or 1e-3),
               **(s.lr_choice or {"chosen_by": "the interrupted run" if "lr" in (s.opts.from_run or {})
                                  else "--lr" if s.opts.lr else "bundle"})},
        "divergences": st.divergences, "lr_scale": st.lr_scale, "stop_message": s.stop_message,
        "resume": s.resume_info, "excluded_records": len(st.excluded),
        "skipped_records": s.train_ds.skipped + s.eval_ds.skipped,
        "trainable": {"update": m.update_params, "head": m.head_params, "share_of_weights": m.update_share,
                      "head_start": s.head_start if m.head else None},
        "checkpoint": str(ckpt), "checkpoint_bytes": ckpt.stat().st_size,
        "checkpoint_write_seconds": (s.store.last_write or {}).get("seconds"),
        "checkpoint_share_of_model": round(ckpt.stat().st_size / max(1, s.model_bytes), 6),
        "update": str(update_path), "update_bytes": update_path.stat().st_size,
        "runtime": {"onnxruntime": s.trainer.ort_version, "providers": s.trainer.providers},
    }
