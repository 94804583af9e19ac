"""A new task started from the tasks already stored (issue 12, step 6): `adapt --task NEW --init ...`.

    --init zero            the bundle's initial state (delta 0, the export's new head): the default
    --init NAME            stored task NAME's trained delta, carried over where both allocations
                           select the same weight entry (0 elsewhere); the head starts fresh
    --init nearest         the same from the stored task (same base, trained) that is nearest
    --init nearest:A,B     ... nearest among A and B only
    --init gates[:A,B]     train only a gate per stored task and layer mixing their deltas (runtime/gates.py)

Two tasks exported from one base have different allocations (calibration depends on each task's
data), so a stored delta can only be carried over at the entries the new allocation shares with it.
"Nearest" is the task whose delta keeps the largest share of its squared norm on the new task's
allocation (`kept`): that is what the carried-over start holds of the donor, the overlap follows
the likeness of the two tasks' activation statistics (the calibration that chose both
allocations), and it costs no forward pass on the board (a loss-based choice would need one per
stored task, and with the new task's fresh head the loss cannot tell the deltas apart before the
head is fit). The head does not carry over (the new task's classes are its own), except from the task
itself: `--init NAME` on task NAME continues from its state, head and all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import bundle as B
from .fsutil import UserError
from .merge import dense_delta
from .trainer import TrainState

ZERO, NEAREST, GATES, NAME = "zero", "nearest", "gates", "name"


def load_allocation(folder: Path) -> Dict[str, np.ndarray]:
    with np.load(Path(folder) / B.ALLOCATION, allow_pickle=False) as z:
        return {k: z[k].astype(np.int64) for k in z.files}


def carry(layer: B.LayerAllocation, idx: np.ndarray, donor: B.LayerAllocation, donor_idx: np.ndarray,
          donor_params: Dict[str, np.ndarray]) -> np.ndarray:
    """[rows, k] values of `donor`'s delta at the entries of `idx` (row r, column idx[r, j]) it also
    selects; 0 where it does not."""
    values = dense_delta(donor, donor_params, donor_idx)
    same = idx[:, :, None] == donor_idx[:, None, :]                    # [rows, k, donor k]
    return (same * values[:, None, :]).sum(-1, dtype=np.float32)


def carried_state(folder: Path, manifest: B.Manifest, donor_folder: Path, donor: B.Manifest,
                  donor_params: Dict[str, np.ndarray], head: bool = False) -> Tuple[Dict[str, np.ndarray], float]:
    """(the new task's initial trainable tensors with the donor's delta carried over, and its head too
    when `head` (the donor is this very task: a continued run), the share of the donor delta's squared
    norm kept)."""
    if any(len(la.params) != 1 for la in manifest.layers):
        raise UserError(f"{folder}: --init from a stored task needs a plain delta per layer; this task was exported "
                        "with --lora-rank (export it without, or use --init zero)")
    params = TrainState.initial(folder, manifest).params
    mine, theirs = load_allocation(folder), load_allocation(donor_folder)
    by_weight = {la.weight: la for la in donor.layers}
    kept = total = 0.0
    for la in donor.layers:
        total += float(np.square(dense_delta(la, donor_params, theirs[la.weight])).sum())
    for la in manifest.layers:
        d = by_weight.get(la.weight)
        if d is None or d.rows != la.rows or d.row_axis != la.row_axis:
            continue
        values = carry(la, mine[la.weight], d, theirs[d.weight], donor_params)
        kept += float(np.square(values).sum())
        params[la.params[0]] = values if la.trained_rows is None else values[la.trained_rows]
    if head and manifest.head:
        params.update({n: donor_params[n] for n in manifest.head["params"]})
    return params, (kept / total if total > 0 else 0.0)


def donors(store, task: str, manifest: B.Manifest, among: Optional[List[str]]) -> List[str]:
    """Stored tasks on this task's base with a trained state (the task itself aside)."""
    base = B.base_id(manifest)
    names = among if among is not None else [n for n in store.names() if n != task]
    out = []
    for n in names:
        folder = store.task_dir(n)                      # names a missing task in one line
        if B.base_id(B.read_manifest(folder)) != base:
            if among is not None:
                raise UserError(f"--init: task {n!r} is on another base than {task!r}; its delta means nothing "
                                "for these weights (pick a task of the same model)")
            continue
        if not (folder / B.TASK_STATE).is_file():
            if among is not None:
                raise UserError(f"--init: task {n!r} has not been trained (no {B.TASK_STATE}); "
                                f"train it first: `taskedge adapt --task {n} --data ...`")
            continue
        out.append(n)
    return out


def initial(store, task: str, spec: str) -> Tuple[Optional[Dict[str, np.ndarray]], dict, Optional[object]]:
    """(initial trainable tensors or None for the bundle's own, the report's "init" entry, the gates Mix
    or None) for --init SPEC."""
    if spec == ZERO:
        return None, {"from": ZERO}, None
    folder = store.task_dir(task)
    manifest = B.read_manifest(folder)
    kind, colon, listed = spec.partition(":")
    if kind in (NEAREST, GATES):
        among = [n for n in listed.split(",") if n] if colon else None
        if among == []:
            raise UserError(f"--init {kind}: give the tasks after the colon, e.g. --init {kind}:sentiment,tweets")
        names = donors(store, task, manifest, among)
        if not names:
            raise UserError(f"--init {kind}: no other trained task on {task!r}'s base in {store.root}; "
                            "train one first, or use --init zero")
    else:
        kind, among, names = NAME, [spec], donors(store, task, manifest, [spec])
    cache: Dict[str, tuple] = {}

    def carried(n: str) -> tuple:
        if n not in cache:
            d = store.task_dir(n)
            m = B.read_manifest(d)
            params = B.read_task_state(d / B.TASK_STATE, m, B.allocation_digest(d, m))
            cache[n] = carried_state(folder, manifest, d, m, params, head=n == task)
        return cache[n]
    if kind == GATES:
        from . import gates
        if among is None:                           # every stored task this allocation holds whole
            names = [n for n in names if carried(n)[1] >= gates.CONTAINED]
            if not names:
                raise UserError(f"--init gates: {task!r}'s allocation holds no stored task's delta whole; export "
                                f"it with --union-of the tasks to mix (`taskedge export ... --union-of BUNDLE`)")
        mix, info = gates.build(store, task, names, carried)
        return mix.initial(TrainState.initial(folder, manifest).params), info, mix
    scores = {n: carried(n)[1] for n in names}
    best = max(sorted(scores), key=lambda n: scores[n])
    return carried(best)[0], {"from": best, "kept_share": round(scores[best], 6),
                              "candidates": {n: round(v, 6) for n, v in sorted(scores.items())}}, None
