"""`taskedge adapt`'s options: the AdaptOptions dataclass (its fields are the flags, see
runtime/flags.py) and `options()`, which fills the flags a `--resume` did not give from the
interrupted run's record. Imports nothing heavy, so `taskedge --help` stays fast on a board."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from .flags import POSITIVE, at_least, flag
from .fsutil import UserError


@dataclass
class AdaptOptions:
    """`taskedge adapt`'s flags (runtime/flags.py builds the parser from these fields)."""
    data: Optional[str] = flag(None, ".npz (inputs + labels), .jsonl text, or an image folder "
                                     "(required, except with --resume: the run's)")
    eval_data: Optional[str] = flag(None, "held-out data for accuracy (default: 10 % of --data)")
    profile: str = flag("host-cpu", "device profile name or .toml (see `taskedge profiles`)")
    power_mode: Optional[str] = flag(None, "nvpmodel mode of the profile (default: its default)")
    memory_budget_mb: Optional[float] = flag(None, "peak RSS budget (default: the profile's share)", check=POSITIVE)
    energy_budget_j: Optional[float] = flag(None, "stop cleanly at this much energy (joules, cumulative)", check=POSITIVE)
    max_seconds: Optional[float] = flag(None, "stop after this many seconds", check=POSITIVE)
    steps: Optional[int] = flag(None, "optimizer steps to run in total (default: one epoch, at least 100 steps)",
                                check=at_least(1))
    epochs: Optional[float] = flag(None, "epochs over --data (if --steps is not given)", check=POSITIVE)
    batch_size: int = flag(32, "effective batch size (micro-batch x accumulation)", check=at_least(1))
    micro_batch: Optional[int] = flag(None, "force the micro-batch instead of planning it", check=at_least(1))
    lr: Optional[float] = flag(None, "peak learning rate (default: the bundle's, else picked by short trials of the "
                                     "planned run on held-out training data)", check=POSITIVE)
    schedule: str = flag("cosine", "lr schedule", choices=["cosine", "linear", "constant"])
    warmup: int = flag(10, "warm-up steps", check=at_least(0))
    eval_every: int = flag(0, "evaluate every N steps (0: at the start and the end)", check=at_least(0))
    checkpoint_every: int = flag(50, "checkpoint every N steps", check=at_least(1))
    keep: int = flag(2, "checkpoints to keep", check=at_least(1))
    resume: bool = flag(False, "continue from the newest good checkpoint, with the run's recorded data, eval data, "
                               "batch size, seed, profile and schedule for every flag not given (other data is "
                               "refused)")
    fresh: bool = flag(False, "discard existing checkpoints and start over")
    run_dir: Optional[str] = flag(None, "checkpoints and update.npz go here (default BUNDLE/run)")
    control_file: Optional[str] = flag(None, 'JSON file re-read every step, e.g. {"memory_budget_mb": 900} '
                                             "(default RUN_DIR/control.json)")
    skip_bad: bool = flag(False, "skip (and count) bad records instead of stopping at the first one")
    seed: int = flag(0, "data order seed", check=at_least(0))
    device: str = flag("cpu", "cpu, or cuda[:N] with NVIDIA's onnxruntime-gpu (JetPack) installed")
    threads: int = flag(0, "ORT intra-op threads (0: ORT's choice)", check=at_least(0))
    quiet: bool = flag(False, "no progress output")
    init: Optional[str] = flag(None, "with --task, a new run starts from: zero (the bundle's initial state), a stored "
                                     "task's NAME, nearest, or nearest:A,B (its delta carried over where the "
                                     "allocations share entries; the head starts fresh; runtime/compose.py), or "
                                     "gates / gates:A,B (train only a gate per stored task and layer mixing their "
                                     "deltas; export with --union-of them; runtime/gates.py)", metavar="SPEC")
    keep_run: bool = flag(False, "with --task: keep the run's checkpoints and update.npz once the task state is "
                                 "written (default: removed then, state.npz is the result; keep them for an "
                                 "exact --resume later)")
    from_run: Optional[dict] = None     # settings --resume took from the interrupted run (see `options`)
    initial: Optional[dict] = None      # trainable tensors a new run starts from (--init; None: the bundle's)
    mix: Optional[object] = None        # --init gates: the stored deltas the gates mix (runtime/gates.py Mix)


# The settings a run records in its checkpoints (train/resume.py: run_flags); `--resume` takes these for every
# flag not given. A resumed run must keep SAME_ON_RESUME (else it silently trains on other data or in another
# order); the others may change (extend --steps, lower --lr, add --skip-bad, another profile).
SAME_ON_RESUME = ("data", "eval_data", "batch_size", "seed")
RECORDED = SAME_ON_RESUME + ("profile", "power_mode", "steps", "epochs", "lr", "schedule", "warmup", "skip_bad",
                             "init")


def options(bundle_dir, given: dict) -> AdaptOptions:
    """AdaptOptions from the flags the user gave (absent or None: not given). With --resume, each
    recorded setting of the interrupted run (its newest good checkpoint) fills a flag not given;
    the rest take AdaptOptions' defaults. A given flag that contradicts the run is judged later
    (train/resume.py: check_flags)."""
    given = {k: v for k, v in given.items() if v is not None and k in AdaptOptions.__dataclass_fields__}
    run_dir = given.get("run_dir") or Path(bundle_dir) / "run"
    taken: Dict[str, object] = {}
    if given.get("resume"):
        from .checkpoints import CheckpointStore
        from .train.state import RunState
        found = CheckpointStore(run_dir).latest(warn=lambda m: None)
        saved = (RunState.from_record(found[1]).flags or {}) if found else {}
        taken = {k: saved[k] for k in RECORDED
                 if k not in given and saved.get(k) is not None and saved.get(k) is not False}
    if "data" not in given and "data" not in taken:
        raise UserError(f"--resume found no checkpoint recording --data in {run_dir}; give --data (the training set)"
                        if given.get("resume") else "--data is required: the training set (.npz, .jsonl or an "
                        "image folder); only --resume takes it from the interrupted run's checkpoint")
    return AdaptOptions(**{**given, **taken}, from_run=taken or None)
