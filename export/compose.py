"""`taskedge export ... --union-of TASK ...`: a task whose allocation holds every entry of the given
tasks' allocations (issue 12, step 6), so that on the board `adapt --task NEW --init gates` can mix
their trained deltas in weight space, W + sum_t g[t, layer] * delta_t, with only the gates (and the new
head) trainable (runtime/gates.py).

Tasks exported from one base select different entries (each calibrates on its own data), so their
deltas live at different indices. Per layer and output neuron the new allocation is the union of the
given tasks' selected inputs, topped up to the layer's widest union with this task's own best-scored
inputs (|W|*||X|| on its calibration data), so every neuron of a layer has the same k. A TASK is a
bundle folder, a stored task's folder or a task pack (.tar from `taskedge task export`); all must be
on the base being exported (checked once the bundle's base is known).
"""
from __future__ import annotations

import json
import tarfile
import io
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from taskedge.runtime import bundle as B
from taskedge.runtime.fsutil import UserError, one_line


def _read(source: str) -> Tuple[dict, bytes]:
    """(manifest dict, allocation.npz bytes) of a bundle/task folder or a task pack."""
    path = Path(source)
    try:
        if path.is_dir():
            return json.loads((path / B.MANIFEST).read_text(encoding="utf-8")), (path / B.ALLOCATION).read_bytes()
        with tarfile.open(path, "r:*") as tar:
            return (json.loads(tar.extractfile(tar.getmember(B.MANIFEST)).read().decode("utf-8")),
                    tar.extractfile(tar.getmember(B.ALLOCATION)).read())
    except (OSError, KeyError, ValueError, AttributeError, tarfile.TarError) as e:
        raise UserError(f"--union-of {source}: not a readable bundle, task folder or task pack ({one_line(e)}); "
                        "give the task's bundle folder or its pack from `taskedge task export`") from None


def read_allocations(sources: List[str]) -> Tuple[Dict[str, List[np.ndarray]], List[dict]]:
    """({weight: [the tasks' [rows, k] indices]}, [{task, base}]) of the --union-of tasks."""
    per_weight: Dict[str, List[np.ndarray]] = {}
    info = []
    for src in sources:
        raw, alloc = _read(src)
        try:
            manifest = B.Manifest.from_dict(raw)
            with np.load(io.BytesIO(alloc), allow_pickle=False) as z:
                arrays = {k: z[k].astype(np.int64) for k in z.files}
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise UserError(f"--union-of {src}: its manifest or allocation is damaged ({one_line(e)}); "
                            "re-export that task") from None
        for la in manifest.layers:
            if len(la.params) != 1 or la.trained_rows is not None:
                raise UserError(f"--union-of {src}: layer {la.weight} is a sparse-LoRA or below-one-per-neuron "
                                "update; gates mix plain per-entry deltas (export that task without --lora-rank, "
                                "at a budget of at least one input per neuron)")
            per_weight.setdefault(la.weight, []).append(arrays[la.weight])
        info.append({"task": str(src), "base": B.base_id(manifest), "model": manifest.model_name})
    return per_weight, info


def union_indices(scores: np.ndarray, donors: List[np.ndarray]) -> np.ndarray:
    """[rows, k] sorted indices: per row every donor's indices, then this task's best-scored others up to
    k = the widest union of any row."""
    rows, cols = scores.shape
    chosen = np.zeros((rows, cols), bool)
    for idx in donors:
        if idx.shape[0] != rows or idx.max(initial=0) >= cols:
            raise UserError(f"--union-of: a task's allocation has shape {list(idx.shape)} for a layer of {rows} x "
                            f"{cols}; it was exported from another model")
        chosen[np.arange(rows)[:, None], idx] = True
    k = int(chosen.sum(1).max())
    key = np.where(chosen, np.inf, scores.astype(np.float64))
    idx = np.argsort(-key, axis=1, kind="stable")[:, :k]
    return np.sort(idx, axis=1).astype(np.int64)


def check_base(info: List[dict], base: str) -> None:
    for d in info:
        if d["base"] != base:
            raise UserError(f"--union-of {d['task']}: exported from another base ({d['base'][:12]}, {d['model']}) "
                            f"than this export's ({base[:12]}); its delta means nothing for these weights")
