"""Default flags against the linear probe, model by model, budget by budget, seed by seed (issue 21).

    python -m taskedge.tools.defaults_bench --out bench-defaults [--models cnn,mlp,transformer]
        [--budgets 0.001,0.01] [--seeds 0,1,2,3,4] [--threads 2]

Per model: the task's train / test split (fixed, seed 0) and its base ONNX graph, exported once per budget
with `--num-classes` only (the budget's entries, raised to one input per neuron on a small model) and once
with `--head-only` (the probe); each bundle is adapted in this process as the board runs it, with no
--lr, --steps or --epochs (the trials pick the rate, one epoch but at least 100 steps, a zero head),
batch 32, at each --seed (data order and held-out slice). Records go to OUT/defaults.jsonl as they finish
(rewritten whole after each run; a run already there is not run again); OUT/defaults.md is the table:
accuracy and picked rate per seed, the mean, and TaskEdge's worst margin over the probe at the same seed.

Models: mlp, cnn, transformer (tools/demo_models.py, digits 5-9 with a new 5-class head, 627 / 269),
shift (the digits CNN on rotated, noisy digits 0-4 with its own head frozen: no probe), mobilenet
(ImageNet MobileNetV2 -> digits, 10 new classes, 1,257 / 540), minilm (all-MiniLM-L6-v2 -> Rotten
Tomatoes, 2,000 / 1,000). MobileNetV2 and MiniLM take minutes per run on a loaded 2-core host.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from taskedge.runtime.fsutil import atomic_write_text

PROBE = "head-only"
MODELS = {   # factory, demo_data task, new-head classes (None: the model's own head, frozen)
    "mlp": ("taskedge.tools.demo_models:digits_mlp", "new-classes", 5),
    "cnn": ("taskedge.tools.demo_models:digits_cnn", "new-classes", 5),
    "transformer": ("taskedge.tools.demo_models:digits_transformer", "new-classes", 5),
    "shift": ("taskedge.tools.demo_models:digits_cnn", "shift", None),
    "mobilenet": ("taskedge.tools.demo_models:mobilenet_v2_digits", "imagenet", 10),
    "minilm": ("taskedge.tools.demo_models:minilm_sentiment", "text", 2),
}


def prepare(model: str, work: Path) -> Path:
    """The task's train.npz / test.npz and base.onnx in work/model (kept when present)."""
    import onnx
    from taskedge.export.ingest import ingest
    from taskedge.runtime.fsutil import atomic_path
    from taskedge.tools import demo_data as D
    factory, task, _ = MODELS[model]
    d = work / model
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "test.npz").is_file():
        data = D.text_sentiment(n_train=2000, n_test=1000, seed=0) if task == "text" else D.vision_digits(task, seed=0)
        D.write_npz(d / "train.npz", data["train"])
        D.write_npz(d / "test.npz", data["test"])
    if not (d / "base.onnx").is_file():
        with atomic_path(d / "base.onnx", suffix=".onnx") as tmp:
            onnx.save(ingest(factory).model, str(tmp))
    return d


def bundle(d: Path, model: str, budget: str, log) -> Path:
    """The export at `budget` (PROBE: --head-only), default flags otherwise; kept when present."""
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    out = d / f"bundle-{budget}"
    if not (out / "manifest.json").is_file():
        rule = {"head_only": True} if budget == PROBE else {"budget": float(budget)}
        export_bundle(ExportConfig(model=str(d / "base.onnx"), out=str(out), calib=str(d / "train.npz"),
                                   num_classes=MODELS[model][2], **rule), log=lambda m: None)
        log(f"{model}: exported {out.name}")
    return out


def run(d: Path, b: Path, seed: int, threads: int) -> dict:
    """`taskedge adapt` with default flags, in this process; the run folder is removed afterwards."""
    from taskedge.runtime.adapt import adapt, options
    flags = dict(data=str(d / "train.npz"), eval_data=str(d / "test.npz"), seed=seed, fresh=True, quiet=True,
                 threads=threads, run_dir=str(b / f"run-{seed}"))
    try:
        rep = adapt(b, options(b, flags), log=lambda m: None)
    finally:
        shutil.rmtree(b / f"run-{seed}", ignore_errors=True)
    return {"accuracy": rep["accuracy"]["after"], "lr": rep["lr"]["peak"], "steps": rep["steps"],
            "entries": rep["trainable"]["update"], "head": rep["trainable"]["head"],
            "head_start": rep["trainable"]["head_start"], "seconds": rep["time"]["seconds"]}


def table(records: list) -> str:
    """Markdown: per model and budget, each seed's accuracy (rate), the mean, the worst margin over the probe."""
    by = {}
    for r in records:
        by.setdefault((r["model"], r["budget"]), {})[r["seed"]] = r
    lines = ["| model | budget: entries | accuracy per seed (rate) | mean | worst margin over the probe |",
             "|---|---|---|---:|---:|"]
    for (model, budget), runs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] == PROBE, kv[0][1])):
        probe = by.get((model, PROBE), {})
        margins = [runs[s]["accuracy"] - probe[s]["accuracy"] for s in runs if s in probe and budget != PROBE]
        cells = " ".join(f"{runs[s]['accuracy']:.3f} ({runs[s]['lr']:g})" for s in sorted(runs))
        entries = next(iter(runs.values()))["entries"]
        mean = np.mean([r["accuracy"] for r in runs.values()])
        worst = f"{100 * min(margins):+.1f} points" if margins else "—"
        lines.append(f"| {model} | {budget}: {entries:,} | {cells} | {mean:.3f} | {worst} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m taskedge.tools.defaults_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the data, bundles, defaults.jsonl and defaults.md")
    ap.add_argument("--models", default="mlp,cnn,transformer", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--budgets", default="0.001,0.01", help="comma list of export budgets (the probe is added)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma list of adapt seeds")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads of every run")
    a = ap.parse_args(argv)
    models = a.models.split(",")
    try:
        budgets = [f"{float(x):g}" for x in a.budgets.split(",")]
        seeds = [int(x) for x in a.seeds.split(",")]
        ok = all(m in MODELS for m in models) and all(0 < float(x) <= 1 for x in budgets) and \
            all(s >= 0 for s in seeds) and a.threads >= 1
    except ValueError:
        ok = False
    if not ok:
        print(f"defaults_bench: error: bad --models {a.models!r}, --budgets {a.budgets!r}, --seeds {a.seeds!r} or "
              f"--threads {a.threads}: models from {', '.join(MODELS)}, budgets fractions in (0, 1], seeds >= 0, "
              "threads >= 1", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "defaults.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    done = {(r["model"], r["budget"], r["seed"]) for r in records}
    log = lambda m: print(f"[defaults] {m}", file=sys.stderr, flush=True)   # noqa: E731
    for model in models:
        d = prepare(model, out)
        for budget in budgets + ([PROBE] if MODELS[model][2] else []):
            b = bundle(d, model, budget, log)
            for seed in seeds:
                if (model, budget, seed) in done:
                    continue
                rec = {"model": model, "budget": budget, "seed": seed, **run(d, b, seed, a.threads)}
                log(f"{model} {budget} seed {seed}: {rec['accuracy']:.3f} at lr {rec['lr']:g} ({rec['seconds']:.1f} s)")
                records.append(rec)
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out / "defaults.md", table(records))
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
