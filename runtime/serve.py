"""Hot-swap inference: many tasks over one base, without reloading the base.

    rt = Runtime(store="~/taskedge/store")          # or Runtime(BASE_ID, store=...)
    logits = rt.predict("sentiment", {"input_ids": ids, "attention_mask": mask})
    logits = rt.predict("tweets", ...)              # swaps: writes tweets' delta, restores sentiment's

The base weights are mapped once, copy-on-write (a write copies only the pages it touches; the
files on disk never change), and handed to onnxruntime as the sessions' initializers, with weight
prepacking off so a session reads them where they are. Selecting a task writes its sparse delta
into the mapped weights -- `w[i, idx] += delta`, the very float32 sum `merge` computes, so the
outputs equal the task's merged model -- after writing the previous task's saved original values
back (exact: no subtraction). Its head is copied into the session's head buffers. One session per
distinct inference graph (tasks with the same head shape share one); a swap is a few hundred
kilobytes of writes, not a model load.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import bundle as B
from .fsutil import UserError
from .merge import dense_delta
from .store import TaskStore, verify_own
from .trainer import READ_IN_PLACE, TrainState, map_weights, open_session


@dataclass
class Task:
    name: str
    manifest: B.Manifest
    graph: str                                    # sha256 of its inference graph: the session it runs in
    deltas: Dict[str, tuple]                      # weight name -> (layer, row index, col index, float32 delta)
    head: Dict[str, np.ndarray]                   # head tensors (or other task-file initializers of the graph)
    state: str                                    # where the trained values came from


def trained_params(folder: Path, manifest: B.Manifest) -> tuple:
    """(params, source): the task state file, else the newest checkpoint of run/, else the initial state."""
    from .checkpoints import CheckpointStore
    if (folder / B.TASK_STATE).is_file():
        return B.read_task_state(folder / B.TASK_STATE, manifest, B.allocation_digest(folder, manifest)), \
            B.TASK_STATE
    found = CheckpointStore(folder / "run").latest(warn=lambda m: None)
    if found:
        return TrainState.from_file(found[0], manifest.trainable_names).params, str(found[0].name)
    return TrainState.initial(folder, manifest).params, "initial (untrained)"


class Runtime:
    def __init__(self, base: Optional[str] = None, store=None, threads: int = 0,
                 providers: Optional[List[str]] = None):
        self.store = store if isinstance(store, TaskStore) else TaskStore(store)
        bases = self.store.bases()
        if base is None and len(bases) == 1:
            base = bases[0]
        if base not in bases:
            raise UserError(f"base {base!r} is not in {self.store.root} (bases: {', '.join(bases) or 'none'}); "
                            "add a task with its bundle first (`taskedge task add BUNDLE`)")
        self.base, self.threads, self.providers = base, threads, providers
        self.weights: Dict[str, np.ndarray] = {}          # base tensors over one copy-on-write map
        self.sessions: Dict[str, tuple] = {}              # graph sha -> (session, {name: head buffer})
        self.tasks: Dict[str, Task] = {}
        self.active: Optional[str] = None
        self._saved: Dict[str, np.ndarray] = {}           # weight -> the base values under the active delta
        self.last_swap_ms = 0.0

    # -- loading ------------------------------------------------------------------------
    def load(self, name: str) -> Task:
        if name in self.tasks:
            return self.tasks[name]
        folder = self.store.task_dir(name)
        manifest = B.read_manifest(folder)
        verify_own(folder, manifest, f"re-add the task: `taskedge task add PACK --name {name} --replace`")
        if B.base_id(manifest) != self.base:
            raise UserError(f"task {name!r} runs on base {B.base_id(manifest)[:12]}, this runtime serves "
                            f"{self.base[:12]}; open a Runtime for that base")
        params, source = trained_params(folder, manifest)
        entries = {e.name: e for e in manifest.weights}
        graph_entries = [e for e in manifest.weights if e.base]
        for layer in manifest.layers:
            if not entries[layer.weight].share:
                raise UserError(f"task {name!r}: weight {layer.weight!r} has uses onnxruntime may rewrite, so it "
                                "cannot be swapped in place; serve this task's merged model (`taskedge merge --task`)")
        self._map_base(folder, [e for e in graph_entries if e.file == B.WEIGHTS])
        with np.load(folder / B.ALLOCATION, allow_pickle=False) as z:
            alloc = {k: z[k].astype(np.int64) for k in z.files}
        deltas = {}
        for layer in manifest.layers:
            idx = alloc[layer.weight]
            rows = np.broadcast_to(np.arange(layer.rows)[:, None], idx.shape)
            deltas[layer.weight] = (layer, rows, idx, dense_delta(layer, params, idx).astype(np.float32))
        own = [e for e in graph_entries if e.file != B.WEIGHTS]
        if any(not e.share for e in own):
            raise UserError(f"task {name!r}: its head cannot be shared with onnxruntime; serve its merged model")
        head = {e.name: np.ascontiguousarray(params.get(e.name, map_weights(folder, [e])[e.name]), np.float32)
                for e in own}
        graph = hashlib.sha256((folder / B.BASE_MODEL).read_bytes()).hexdigest()
        task = self.tasks[name] = Task(name, manifest, graph, deltas, head, source)
        if graph not in self.sessions:
            self._open(folder, task, [e for e in graph_entries if e.share])
        return task

    def _map_base(self, folder: Path, entries: List[B.WeightEntry]) -> None:
        new = [e for e in entries if e.name not in self.weights]
        if new:
            self.weights.update(map_weights(self.store.bases_dir / self.base, new, mode="c"))

    def _open(self, folder: Path, task: Task, shared: List[B.WeightEntry]) -> None:
        from .ort import onnxruntime as ort
        buffers = {n: a.copy() for n, a in task.head.items()}
        inits = [(e.name, ort.OrtValue.ortvalue_from_numpy(buffers.get(e.name, self.weights.get(e.name))), None)
                 for e in shared]
        sess = open_session(folder / B.BASE_MODEL, self.threads, self.providers, initializers=inits,
                            config=READ_IN_PLACE)     # open_session: the shared arena
        self.sessions[task.graph] = (sess, buffers, inits)      # inits keep the OrtValues alive

    # -- swapping -----------------------------------------------------------------------------
    def select(self, name: str) -> Task:
        task = self.load(name)
        if self.active == name:
            return task
        t0 = time.perf_counter()
        for weight, orig in self._saved.items():               # the previous task's delta out (exact)
            layer, rows, idx, _ = self.tasks[self.active].deltas[weight]
            layer.rows_view(self.weights[weight])[rows, idx] = orig
        self._saved = {}
        for weight, (layer, rows, idx, delta) in task.deltas.items():
            view = layer.rows_view(self.weights[weight])
            self._saved[weight] = view[rows, idx].copy()
            view[rows, idx] += delta
        _, buffers, _ = self.sessions[task.graph]
        for n, a in task.head.items():
            buffers[n][...] = a
        self.active = name
        self.last_swap_ms = (time.perf_counter() - t0) * 1e3
        return task

    def predict(self, name: str, inputs: Dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
        task = self.select(name)
        sess = self.sessions[task.graph][0]
        specs = task.manifest.inputs
        missing = [s.name for s in specs if s.name not in inputs]
        if missing:
            raise UserError(f"task {name!r} needs input {missing[0]!r} (inputs: {[s.name for s in specs]})")
        feeds = {s.name: np.ascontiguousarray(inputs[s.name], dtype=s.dtype) for s in specs}
        n = len(next(iter(feeds.values())))
        outs = [sess.run([task.manifest.logits], {k: v[i:i + batch] for k, v in feeds.items()})[0]
                for i in range(0, n, batch)]
        return np.concatenate(outs) if outs else np.zeros((0, task.manifest.num_classes), np.float32)


# ------------------------------------------------------------------------------------------------
# `taskedge predict --task A [--task B ...] FILE`
# ------------------------------------------------------------------------------------------------

def read_inputs(path, manifest: B.Manifest, folder: Path) -> tuple:
    """(inputs, labels or None): an .npz with the model's input arrays (labels optional), or any
    data file `adapt` reads (those need labels)."""
    from .data import load_dataset
    p = Path(path)
    if p.suffix == ".npz" and p.is_file():
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:                                  # zipfile.BadZipFile, ValueError, OSError
            raise UserError(f"{p}: not a readable .npz ({type(e).__name__}: {e})") from None
        missing = [s.name for s in manifest.inputs if s.name not in arrays]
        if missing:
            raise UserError(f"{p}: no array {missing[0]!r}; the file needs {[s.name for s in manifest.inputs]}")
        sizes = {len(arrays[s.name]) if arrays[s.name].ndim else -1 for s in manifest.inputs}
        if len(sizes) != 1 or -1 in sizes:
            raise UserError(f"{p}: the input arrays differ in length (or are scalars); one row per example")
        labels = arrays.get(B.LABELS_INPUT)
        return {s.name: arrays[s.name] for s in manifest.inputs}, labels
    ds = load_dataset(path, manifest, folder)
    return ds.inputs, ds.labels


def cmd_predict(a) -> int:
    import json
    from .fsutil import atomic_path
    rt = Runtime(a.base, store=a.store)
    results, logits = [], {}
    for name in a.task:
        task = rt.load(name)
        inputs, labels = read_inputs(a.data, task.manifest, rt.store.task_dir(name))
        t0 = time.perf_counter()
        y = rt.predict(name, inputs, batch=a.batch_size)
        row = {"task": name, "examples": int(len(y)), "swap_ms": round(rt.last_swap_ms, 3),
               "predict_s": round(time.perf_counter() - t0, 3), "state": task.state,
               "predicted": np.bincount(y.argmax(-1), minlength=y.shape[-1]).tolist() if len(y) else []}
        if labels is not None and len(labels) == len(y):
            row["accuracy"] = float((y.argmax(-1) == np.asarray(labels)).mean())
        results.append(row)
        logits[f"{len(results) - 1}:{name}"] = y
    if a.out:
        with atomic_path(a.out, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **logits)
    if a.json:
        print(json.dumps({"base": rt.base, "results": results, "out": a.out}, indent=2))
    else:
        for r in results:
            acc = f"  accuracy {r['accuracy']:.4f}" if "accuracy" in r else ""
            print(f"{r['task']}: {r['examples']} examples, swap {r['swap_ms']} ms, predict {r['predict_s']} s"
                  f"{acc}  (trained state: {r['state']})")
    return 0


def register(sub) -> None:
    from .flags import Check, _checked
    p = sub.add_parser("predict", help="board: logits of stored tasks on one base, swapping tasks without a reload",
                       description="Run FILE through each --task in turn (repeat --task to swap: A, B, A) in one "
                                   "process: the base is loaded once, a task's sparse delta is written into it in "
                                   "place and its head selected. Outputs equal `taskedge merge --task`'s model.")
    p.add_argument("data", metavar="FILE", help=".npz with the model's input arrays (labels optional), or any data "
                                                "file `adapt` takes")
    p.add_argument("--task", action="append", required=True, help="stored task name (repeatable, in order)")
    p.add_argument("--base", help="base id (default: the store's only base)")
    p.add_argument("--store", help="task store folder (default $TASKEDGE_STORE, else ~/taskedge/store)")
    size = Check(lambda v: 1 <= v <= 65536, "must be an integer in 1..65536")
    p.add_argument("--batch-size", type=_checked(int, size), default=64, help="examples per run (default 64)")
    p.add_argument("-o", "--out", help="write the logits to this .npz (keys 'N:TASK', in order)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(fn=cmd_predict)
