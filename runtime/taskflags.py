"""`--task NAME` for adapt, eval and merge: the stored task's folder is the bundle (runtime/store.py).

    taskedge adapt --task sentiment --data train.npz     trains in STORE/tasks/sentiment/run, then writes
                                                         the task state (state.npz) and records
                                                         "last trained" and the accuracy in task.json
    taskedge adapt --task new --init nearest ...         starts from the nearest stored task (runtime/compose.py)
    taskedge eval --task sentiment --data test.npz       the task state by default; records the accuracy
    taskedge merge --task sentiment --out m.onnx
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Tuple

from . import bundle as B
from .checkpoints import CheckpointStore
from .fsutil import UserError, atomic_write_bytes, fsync_dir
from .store import TaskStore, now


def add(parser: argparse.ArgumentParser) -> None:
    """BUNDLE becomes optional; --task NAME and --store DIR name a stored task instead."""
    for action in parser._actions:                       # the positional added before, made optional
        if action.dest == "bundle":
            action.nargs = "?"
            action.help = "bundle folder (or --task NAME)"
    parser.add_argument("--task", help="a task in the store instead of BUNDLE (see `taskedge tasks`)")
    parser.add_argument("--store", help="task store folder (default $TASKEDGE_STORE, else ~/taskedge/store)")


def resolve(a) -> Tuple[str, Optional[str]]:
    """(bundle folder, default update file) for the command's BUNDLE or --task."""
    task, bundle = getattr(a, "task", None), getattr(a, "bundle", None)
    if task and bundle:
        raise UserError(f"give the bundle folder {bundle!r} or --task {task}, not both")
    for name in ("init", "keep_run"):
        if getattr(a, name, None) and not task:
            raise UserError(f"--{name.replace('_', '-')} works on a stored task: give --task NAME (see `taskedge tasks`)")
    if not task:
        if not bundle:
            raise UserError("give the bundle folder, or --task NAME for a task in the store (see `taskedge tasks`)")
        return bundle, getattr(a, "update", None)
    folder = TaskStore(getattr(a, "store", None)).task_dir(task)
    if getattr(a, "resume", False):
        check_resume(a, folder)
    update = getattr(a, "update", None)
    if update is None and not getattr(a, "run_dir", None) and (folder / B.TASK_STATE).is_file() \
            and not (getattr(a, "resume", False)):
        update = str(folder / B.TASK_STATE)
    return str(folder), update


def check_resume(a, folder: Path) -> None:
    """--resume on a task whose finished run was pruned (after_adapt): say how to continue instead."""
    if getattr(a, "init", None):
        raise UserError(f"--init {a.init} starts a new run and --resume continues one: give one of them")
    run = Path(getattr(a, "run_dir", None) or folder / "run")
    if (folder / B.TASK_STATE).is_file() and not CheckpointStore(run).steps():
        raise UserError(f"task {a.task!r}: its last run finished and its checkpoints were removed once its state was "
                        f"written ({B.TASK_STATE}); continue from that state with `taskedge adapt --task {a.task} "
                        f"--init {a.task} --data ...` (new optimizer moments), or give --keep-run to adapt to keep "
                        "a run's checkpoints for an exact --resume")


def start_state(a, opts) -> Optional[dict]:
    """--init: the run's starting tensors go into `opts.initial`; returns the report's "init" entry."""
    spec = opts.init                                  # given, or a resumed run's own
    task = getattr(a, "task", None)
    if task and not spec and not getattr(a, "resume", False) and not getattr(a, "fresh", False) \
            and (TaskStore(getattr(a, "store", None)).task_dir(task) / B.TASK_STATE).is_file():
        raise UserError(f"task {task!r} is trained already ({B.TASK_STATE}); --init {task} continues from its state, "
                        "--fresh starts over from the bundle's initial state (and replaces it)")
    if not spec:
        return None
    from .compose import initial
    opts.initial, info, opts.mix = initial(TaskStore(getattr(a, "store", None)), a.task, spec)
    return info


def prune_run(run: Path) -> List[str]:
    """A finished run whose result is the task state: its checkpoints and update.npz go (the commit
    records first, as CheckpointStore does); the lock file and control.json stay."""
    store = CheckpointStore(run)
    gone = [p.name for s in store.steps() for p in (store.path(s), store.record_path(store.path(s)))]
    store.clear()
    update = run / "update.npz"
    if update.is_file():
        update.unlink()
        gone.append(update.name)
    fsync_dir(run)
    return gone


def after_adapt(a, report: dict, init: Optional[dict] = None) -> None:
    """The run's update becomes the task's state; task.json records when and how well it trained. Then,
    unless --keep-run or --run-dir, the finished run's checkpoints and update.npz are removed: the state
    (fsynced, renamed into place) holds the trained tensors, and a board keeping ten tasks keeps ten
    states, not ten runs. While a run trains, its checkpoints (keep 2) are what a power cut falls back on."""
    if init is not None:
        report["init"] = init
    task = getattr(a, "task", None)
    if not task or not report.get("update"):
        return
    store = TaskStore(getattr(a, "store", None))
    folder = store.task_dir(task)
    manifest = B.read_manifest(folder)
    from .merge import load_update
    params = load_update(folder, manifest, report["update"])
    atomic_write_bytes(folder / B.TASK_STATE,
                       B.task_state_bytes(params, manifest, B.allocation_digest(folder, manifest)))
    acc = report.get("accuracy", {})
    run = str(Path(report["update"]).parent)
    prune = not (getattr(a, "keep_run", False) or getattr(a, "run_dir", None))
    store.update_record(task, trained={"at": now(), "steps": report.get("steps"), "run": run,
                                       "checkpoints": "removed" if prune else "kept",
                                       "init": (init or {}).get("from", "zero")},
                        accuracy={"value": acc.get("after"), "data": acc.get("data") or "adapt's held-out data",
                                  "at": now()})
    if prune:
        report["removed_from_run"] = prune_run(Path(run))
        report["update"] = str(folder / B.TASK_STATE)


def after_eval(a, res: dict) -> None:
    task = getattr(a, "task", None)
    if task and not getattr(a, "model", None):
        TaskStore(getattr(a, "store", None)).update_record(
            task, accuracy={"value": res["accuracy"], "data": str(res.get("data")), "at": now()})
