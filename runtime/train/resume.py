"""Where a run starts, and whether `--resume` may continue the interrupted run.

`start` picks the newest good checkpoint (--resume), the bundle's initial state (a new run, or
--fresh over old checkpoints), or refuses to overwrite a run folder that holds checkpoints.
Every checkpoint records the run's settings (`run_flags`); a resumed run must see the same data
(options.SAME_ON_RESUME and the record count: else it would silently train on another set or
order) and may change the rest of options.RECORDED (extend --steps, lower --lr, another
profile), which is noted in the log and the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Tuple

from ..checkpoints import CheckpointStore
from ..fsutil import UserError
from ..options import RECORDED, SAME_ON_RESUME, AdaptOptions
from .state import RunState

SAME = SAME_ON_RESUME + ("records",)       # "records": how many training records --data holds


def flag_name(key: str) -> str:
    return "the record count of --data" if key == "records" else "--" + key.replace("_", "-")


def run_flags(opts: AdaptOptions, records: int) -> dict:
    """The run's settings as its checkpoints record them (paths absolute, so --resume works from anywhere)."""
    absolute = {"data": str(Path(opts.data).resolve()),
                "eval_data": str(Path(opts.eval_data).resolve()) if opts.eval_data else None,
                "profile": str(Path(opts.profile).resolve()) if Path(opts.profile).is_file() else opts.profile}
    return {**{k: absolute.get(k, getattr(opts, k)) for k in RECORDED}, "records": records}


def start(store: CheckpointStore, opts: AdaptOptions,
          log: Callable[[str], None]) -> Tuple[Optional[Path], RunState, Optional[dict]]:
    """(checkpoint to load or None for the bundle's initial state, its RunState, the report's
    "resume" entry: None without --resume)."""
    if opts.resume:
        found = store.latest(warn=log)
        info = {"from": None, "skipped_bad_checkpoints": list(store.skipped)}
        if found is not None:
            path, record = found
            state = RunState.from_record(record)
            info["from"] = str(path)
            log(f"resuming from {path.name} (step {state.step})")
            return path, state, info
        log(f"no good checkpoint in {store.dir}; starting from the bundle"
            + (f" ({len(store.skipped)} bad ones skipped)" if store.skipped else ""))
        return None, RunState(), info
    if store.steps():
        if not opts.fresh:
            raise UserError(f"{store.dir} already holds checkpoints; pass --resume to continue them "
                            "or --fresh to start over")
        store.clear()
    return None, RunState(), None


def check_flags(saved: Optional[dict], now: dict, opts: AdaptOptions, info: Optional[dict],
                log: Callable[[str], None]) -> None:
    """Refuse other data than the interrupted run's; note the settings that changed (in `info` too)."""
    if not saved:                       # checkpoints written before the flags were recorded
        return
    changed = {k: f"{saved[k]!r} then, {now[k]!r} now" for k in now if k in saved and saved[k] != now[k]}
    refused = [f"{flag_name(k)}: {v}" for k, v in changed.items() if k in SAME]
    if refused:
        raise UserError("--resume with different data than the interrupted run (" + "; ".join(refused) +
                        "): leave these flags out to continue the run with its own, or pass --fresh to start over")
    allowed = {k: v for k, v in changed.items() if k not in SAME}
    if allowed:
        log("resuming with changed settings (" + "; ".join(f"{flag_name(k)}: {v}" for k, v in allowed.items())
            + "); the schedule follows the new values")
    if info is not None:
        info["changed"] = allowed
        info["taken_from_run"] = dict(opts.from_run or {})

