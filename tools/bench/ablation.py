"""`taskedge bench --selection-ablation` (issue 19): is TaskEdge's task-aware choice worth it?

Every `--selection` rule (taskedge |W|*||X||, magnitude |W|, activation ||X||, random, gradient =
GPS's sum |dL/dW|) picks the same number of entries per neuron (same budget, same k, same
N:M handling) on the same task; each pick is then trained the way the board trains it
(`runtime.adapt`: the bundle's step graph on plain onnxruntime, the runtime's data order, cosine
schedule with 10 warm-up steps) for the same steps and batch, and scored on the same held-out test set.

Per task the data split is fixed (seed 0), so calibration data are the same for every run. The
run seed s (0 .. --seeds - 1) sets the new head's init, the random rule's picks (and, through the
head, the gradient rule's), and the data order. Learning rate: the runtime's own trials
(runtime/lr_range.py: the planned run squeezed into trials of a quarter of its steps, walking
1e-3 .. 1e-1 from 1e-2, judged on held-out *training* data; the README's table was measured with
the earlier 12-step constant-rate trials of 1e-3 .. 3e-2), run once per task and rule at seed 0 and
used for its other seeds; recorded per rule.

Reported per task and rule: held-out accuracy mean, sample std and min..max over the seeds; the
paired difference to taskedge at the same seed; the overlap (Jaccard) of the trained entry sets
between rules at the same seed (mean over seeds). Files: ablation.md, ablation.json, ablation.png.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

SELECTIONS = ("taskedge", "magnitude", "activation", "gradient", "random")
PROBE = "head-only"          # the reference on tasks with a new head: only the head trains (the linear probe)
RULES = SELECTIONS + (PROBE,)
# onnxruntime intra-op threads of every run: on this shared 2-core host under load (average 12), a
# MiniLM step took 0.77-1.2 s with 1 thread, 1.8 s with 2 and 2.6 s with ORT's default (its spinning
# workers fight the other jobs); accuracy does not depend on it, the wall time does
THREADS = 1


@dataclass(frozen=True)
class Task:
    title: str
    factory: str
    data: tuple                  # ("text", n_train, n_test) or ("digits", demo_data.vision_digits task)
    classes: Optional[int]       # a new head with this many classes; None: the model's own head trains nothing
    budget: float
    steps: int
    batch: int


TASKS = {
    "text": Task("all-MiniLM-L6-v2 -> Rotten Tomatoes sentiment (new 2-class head)",
                 "taskedge.tools.demo_models:minilm_sentiment", ("text", 2000, 500), 2, 0.001, 100, 16),
    "vision": Task("ImageNet MobileNetV2 -> handwritten digits, 64x64 (new 10-class head)",
                   "taskedge.tools.demo_models:mobilenet_v2_digits", ("digits", "imagenet"), 10, 0.01, 100, 32),
    "digits-shift": Task("digits CNN pretrained on clean 0-4 -> unseen 0-4 rotated, noisy, low-contrast "
                         "(its own head, frozen: only the selected entries train)",
                         "taskedge.tools.demo_models:digits_cnn", ("digits", "shift"), None, 0.05, 150, 32),
}
TASKS["digits-new"] = Task("one-block digits transformer pretrained on 0-4 -> digits 5-9 (new 5-class head)",
                          "taskedge.tools.demo_models:digits_transformer", ("digits", "new-classes"), 5, 0.1, 150, 32)
# --quick: the small digits fixtures only, 40 steps (a few minutes on this host; tests/test_ablation.py runs one)
QUICK_TASKS = {name: replace(TASKS[name], steps=40) for name in ("digits-shift", "digits-new")}


def task_table(quick: bool) -> Dict[str, Task]:
    return QUICK_TASKS if quick else TASKS


# ----------------------------------------------------------------------------- one task
def prepare_task(task: Task, work: Path) -> dict:
    """The task's train/test .npz (split fixed by seed 0) and its base ONNX graph; kept when present."""
    import onnx
    from taskedge.export.ingest import ingest
    from taskedge.runtime.fsutil import atomic_path
    from taskedge.tools import demo_data as D
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "test.npz").is_file():
        d = D.text_sentiment(n_train=task.data[1], n_test=task.data[2], seed=0) if task.data[0] == "text" \
            else D.vision_digits(task.data[1], seed=0)
        D.write_npz(work / "train.npz", d["train"])
        D.write_npz(work / "test.npz", d["test"])
    if not (work / "base.onnx").is_file():
        with atomic_path(work / "base.onnx", suffix=".onnx") as tmp:
            onnx.save(ingest(task.factory).model, str(tmp))
    return {part: int(len(np.load(work / f"{part}.npz")["labels"])) for part in ("train", "test")}


def export(task: Task, work: Path, selection: str, seed: int) -> tuple:
    """The bundle of one rule at one seed (no learning rate stored: adapt's trials pick it)."""
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    out = work / f"{selection}-s{seed}"
    rule = {"head_only": True} if selection == PROBE else {"selection": selection}
    man = export_bundle(ExportConfig(model=str(work / "base.onnx"), out=str(out), calib=str(work / "train.npz"),
                                     budget=task.budget, num_classes=task.classes, seed=seed, **rule),
                        log=lambda m: None)
    return out, man


def adapt_run(task: Task, work: Path, bundle: Path, seed: int, lr: Optional[float]) -> dict:
    """`taskedge adapt` on the bundle, in this process, as the board runs it; lr None: its trials pick."""
    from taskedge.runtime.adapt import adapt, options
    flags = dict(data=str(work / "train.npz"), eval_data=str(work / "test.npz"), steps=task.steps,
                 batch_size=task.batch, micro_batch=task.batch, lr=lr, seed=seed, fresh=True, quiet=True, threads=THREADS,
                 checkpoint_every=task.steps, run_dir=str(bundle / "run"))
    return adapt(bundle, options(bundle, flags), log=lambda m: None)


def trained_entries(bundle: Path, man) -> Dict[str, np.ndarray]:
    """{weight: sorted flat ids row * cols + col} of the entries the bundle trains."""
    from taskedge.runtime import bundle as B
    out = {}
    with np.load(bundle / B.ALLOCATION) as alloc:
        for la in man.layers:
            idx = alloc[la.weight].astype(np.int64)
            rows = np.arange(idx.shape[0]) if la.trained_rows is None else np.asarray(la.trained_rows, np.int64)
            out[la.weight] = np.unique(rows[:, None] * (1 << 32) + idx[rows])
    return out


def jaccard(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> float:
    """|A n B| / |A u B| over all layers' trained entries."""
    inter = sum(len(np.intersect1d(a[w], b[w], assume_unique=True)) for w in a if w in b)
    union = sum(map(len, a.values())) + sum(map(len, b.values())) - inter
    return inter / union if union else 1.0


def run_one(task: Task, work: Path, sel: str, seed: int, lr: Optional[float], keep: bool) -> tuple:
    """One rule at one seed: export, adapt, the trained entries. Returns (record, entries)."""
    t0 = time.perf_counter()
    bundle, man = export(task, work, sel, seed)
    t1 = time.perf_counter()
    rep = adapt_run(task, work, bundle, seed, lr)
    entries = trained_entries(bundle, man)
    if not keep:
        shutil.rmtree(bundle, ignore_errors=True)
    rec = {"task": asdict(task), "selection": sel, "seed": seed, "accuracy": rep["accuracy"]["after"],
           "accuracy_before": rep["accuracy"]["before"], "lr": rep["lr"]["peak"], "lr_trials": rep["lr"].get("trials"),
           "lr_scale": rep["lr_scale"], "k": man.method["k"], "update_params": man.update_params,
           "head_params": man.head_params, "num_weights": man.num_weights, "share_of_weights": man.update_share,
           "loss_first10": rep["loss"]["first10_mean"], "loss_last10": rep["loss"]["last10_mean"],
           "export_seconds": round(t1 - t0, 1), "adapt_seconds": round(time.perf_counter() - t1, 1)}
    return rec, entries


def run_task(name: str, task: Task, seeds: List[int], selections, work: Path, keep: bool, progress,
             fixed_lr: Optional[float] = None) -> dict:
    """Every rule x seed on one task; each finished run is recorded in work/runs (a record made with the
    same task settings is reused, so an interrupted ablation resumes and rules can run in parallel).
    fixed_lr: every run at this rate instead of adapt's trials (recorded in work/runs-lrRATE)."""
    from taskedge.runtime.fsutil import atomic_path, atomic_write_json
    sizes = prepare_task(task, work)
    done = work / ("runs" if fixed_lr is None else f"runs-lr{fixed_lr:g}")
    done.mkdir(exist_ok=True)
    runs: Dict[str, List[dict]] = {}
    picks: Dict[int, Dict[str, dict]] = {seed: {} for seed in seeds}
    for sel in selections:
        runs[sel] = []
        for seed in seeds:
            path = done / f"{sel}-s{seed}.json"
            rec = json.loads(path.read_text()) if path.is_file() else None
            if rec is None or rec["task"] != json.loads(json.dumps(asdict(task))):     # tuples come back as lists
                lr = fixed_lr or (None if seed == 0 else runs[sel][0]["lr"])    # seed 0's trials pick the rule's lr
                rec, entries = run_one(task, work, sel, seed, lr, keep)
                with atomic_path(done / f"{sel}-s{seed}.npz", suffix=".npz") as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, **entries)
                atomic_write_json(path, rec)
                progress(name, sel, seed, rec, True)
            else:
                progress(name, sel, seed, rec, False)
            with np.load(done / f"{sel}-s{seed}.npz") as z:
                picks[seed][sel] = {k: z[k] for k in z.files}
            runs[sel].append(rec)
    rules = [s for s in selections if s != PROBE]
    first = runs[(rules or selections)[0]][0]
    lr = {sel: {"lr": rs[0]["lr"], "trials": rs[0]["lr_trials"], "picked_at_seed": None if fixed_lr else rs[0]["seed"]}
          for sel, rs in runs.items()}
    return {"title": task.title, "task": asdict(task), "n_train": sizes["train"], "n_test": sizes["test"],
            **{k: first[k] for k in ("k", "update_params", "head_params", "num_weights", "share_of_weights")},
            "lr": lr, "runs": runs, "summary": summarize(runs), "jaccard": overlaps(picks, rules),
            "compute_seconds": round(sum(r["export_seconds"] + r["adapt_seconds"] for rs in runs.values() for r in rs))}


# ----------------------------------------------------------------------------- statistics
def summarize(runs: Dict[str, List[dict]]) -> Dict[str, dict]:
    """Per rule: mean, sample std, min, max of accuracy; the paired difference to taskedge."""
    ref = {r["seed"]: r["accuracy"] for r in runs.get("taskedge", [])}
    out = {}
    for sel, rs in runs.items():
        acc = np.array([r["accuracy"] for r in rs], float)
        diff = np.array([r["accuracy"] - ref[r["seed"]] for r in rs if r["seed"] in ref], float)
        out[sel] = {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    "min": float(acc.min()), "max": float(acc.max()), "seeds": len(acc),
                    "vs_taskedge_mean": float(diff.mean()) if len(diff) else None,
                    "vs_taskedge_std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0}
    return out


def overlaps(picks: Dict[int, Dict[str, dict]], selections=SELECTIONS) -> Dict[str, Dict[str, float]]:
    """Jaccard of the trained entry sets, rule vs rule at the same seed, mean over seeds."""
    out: Dict[str, Dict[str, float]] = {}
    for a in selections:
        out[a] = {}
        for b in selections:
            vals = [jaccard(p[a], p[b]) for p in picks.values() if a in p and b in p]
            out[a][b] = round(float(np.mean(vals)), 4) if vals else None
    return out


# ----------------------------------------------------------------------------- the whole bench
def run_ablation(tasks: Optional[List[str]] = None, seeds: int = 3, quick: bool = False, out: Optional[str] = None,
                 workdir: Optional[str] = None, keep: bool = False, plot: bool = True, steps: Optional[int] = None,
                 selections: Optional[List[str]] = None, lr: Optional[float] = None,
                 log: Callable[[str], None] = lambda m: None) -> dict:
    """The ablation; with `workdir`, finished runs are recorded there and reused by the next call."""
    import os
    from . import ablation_report as R
    from .report import machine
    table = {k: replace(t, steps=steps) if steps else t for k, t in task_table(quick).items()}
    names, sels = list(tasks or table), [s for s in RULES if s in (selections or RULES)]
    rules_of = {n: [s for s in sels if s != PROBE or table[n].classes] for n in names}    # no new head: no probe
    total, count, t_start = sum(map(len, rules_of.values())) * seeds, {"done": 0, "ran": 0}, time.perf_counter()
    load0 = [round(x, 2) for x in os.getloadavg()]

    def progress(task, sel, seed, r, ran: bool):
        count["done"] += 1
        count["ran"] += ran
        el, left = time.perf_counter() - t_start, total - count["done"]
        how = (f"accuracy {r['accuracy']:.4f} (lr {r['lr']:g}; export {r['export_seconds']:.0f} s, adapt "
               f"{r['adapt_seconds']:.0f} s)") if ran else f"accuracy {r['accuracy']:.4f}, recorded in the work folder"
        eta = f", about {el / count['ran'] * left / 60:.0f} min left" if count["ran"] else ""
        log(f"{task}: {sel} seed {seed}: {how} -- run {count['done']}/{total}, {el / 60:.1f} min{eta}")

    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="taskedge-ablation-"))
    try:
        results = {}
        for name in names:
            log(f"{name}: {table[name].title}; {len(rules_of[name])} rules x {seeds} seeds")
            results[name] = run_task(name, table[name], list(range(seeds)), rules_of[name], tmp / name, keep, progress,
                                     lr)
        report = {"quick": quick, "seeds": seeds, "selections": sels, "threads": THREADS, "fixed_lr": lr, "tasks": results,
                  "machine": machine(load0),
                  "wall_seconds": round(time.perf_counter() - t_start, 1)}
        if out:
            R.write(report, out, plot, log)
        return report
    finally:
        if not keep and not workdir:
            shutil.rmtree(tmp, ignore_errors=True)
