"""`--task NAME` for adapt, eval and merge: the stored task's folder is the bundle (runtime/store.py).

    taskedge adapt --task sentiment --data train.npz     trains in STORE/tasks/sentiment/run, then writes
                                                         the task state (state.npz) and records
                                                         "last trained" and the accuracy in task.json
    taskedge eval --task sentiment --data test.npz       the task state by default; records the accuracy
    taskedge merge --task sentiment --out m.onnx
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Tuple

from . import bundle as B
from .fsutil import UserError, atomic_write_bytes
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
    if not task:
        if not bundle:
            raise UserError("give the bundle folder, or --task NAME for a task in the store (see `taskedge tasks`)")
        return bundle, getattr(a, "update", None)
    folder = TaskStore(getattr(a, "store", None)).task_dir(task)
    update = getattr(a, "update", None)
    if update is None and not getattr(a, "run_dir", None) and (folder / B.TASK_STATE).is_file() \
            and not (getattr(a, "resume", False)):
        update = str(folder / B.TASK_STATE)
    return str(folder), update


def after_adapt(a, report: dict) -> None:
    """The run's update becomes the task's state; task.json records when and how well it trained."""
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
    store.update_record(task, trained={"at": now(), "steps": report.get("steps"), "run": run},
                        accuracy={"value": acc.get("after"), "data": acc.get("data") or "adapt's held-out data",
                                  "at": now()})


def after_eval(a, res: dict) -> None:
    task = getattr(a, "task", None)
    if task and not getattr(a, "model", None):
        TaskStore(getattr(a, "store", None)).update_record(
            task, accuracy={"value": res["accuracy"], "data": str(res.get("data")), "at": now()})
