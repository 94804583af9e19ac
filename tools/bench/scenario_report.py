"""The CNN scenario bench's outputs: bench-cnn.json, bench-cnn.md (one table per model and
scenario, the learning-rate sweeps, the accuracy-memory Pareto front) and bench-cnn.png (accuracy
against peak memory and against FLOPs per update, one panel pair per model and scenario)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .report import _fmt_bytes


def pareto(rows: dict, cost: str = "peak_rss_mb") -> list:
    """Names on the accuracy-vs-`cost` Pareto front (no other row is as cheap and more accurate,
    or cheaper and as accurate)."""
    front = []
    for n, r in rows.items():
        dominated = any(o["accuracy"] >= r["accuracy"] and o[cost] <= r[cost]
                        and (o["accuracy"] > r["accuracy"] or o[cost] < r[cost]) for m, o in rows.items() if m != n)
        if not dominated:
            front.append(n)
    return front


def taskedge_gap(rows: dict, name: str = "taskedge") -> str:
    """On the accuracy-memory front, or how far off: the accuracy missing to the best row that
    needs no more memory, and the memory to shed to get under the cheapest row at least as accurate."""
    if name not in rows:
        return "not run"
    if name in pareto(rows):
        return "on the front"
    te = rows[name]
    better = [r for n, r in rows.items() if n != name and r["peak_rss_mb"] <= te["peak_rss_mb"]
              and r["accuracy"] >= te["accuracy"]]
    acc = max(r["accuracy"] for r in better) - te["accuracy"]
    mem = te["peak_rss_mb"] - min(r["peak_rss_mb"] for r in better)
    return f"off the front by {100 * acc:.1f} accuracy points at its memory, or {mem:.0f} MB at its accuracy"


def table(run: dict) -> str:
    head = ["variant", "lr (swept)", "accuracy", "step ms", "peak MB", "trainable", "update", "GFLOP/step",
            "x fwd", "front"]
    front = set(pareto(run["variants"]))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in run["variants"].items():
        f = r["flops"]
        lines.append("| " + " | ".join([
            n, f"{r['lr']:g}", f"{r['accuracy']:.3f}", f"{r['step_ms']:.1f}", f"{r['peak_rss_mb']:.0f}",
            f"{r['trainable_params']:,}", _fmt_bytes(r["update_bytes"]), f"{f['step'] / 1e9:.3f}",
            f"{f['step'] / f['forward']:.2f}", "yes" if n in front else ""]) + " |")
    return "\n".join(lines)


def timing(run: dict) -> str:
    cells = []
    for n, r in run["variants"].items():
        t = r.get("time", {})
        extra = f" (+{t['build_s'] + t['count_s']:.0f})" if "build_s" in t else ""
        cells.append(f"{n} {t.get('worker_wall_s', 0):.0f} / {t.get('worker_cpu_s', 0):.0f}{extra}")
    return ", ".join(cells)


def sweeps(run: dict) -> str:
    out = []
    for n, r in run["variants"].items():
        cells = ", ".join(f"{s['lr']:g}: val {s['val']:.3f} / test {s['test']:.3f}" for s in r["sweep"])
        out.append(f"- `{n}`: {cells}")
    return "\n".join(out)


def format_md(rep: dict) -> str:
    out = ["# TaskEdge CNN bench: distribution shift and unseen classes", "",
           *(["**Partial: the run is still going (this file is rewritten after every variant).**", ""]
             if rep.get("partial") else []),
           f"{'quick' if rep['quick'] else 'full'} run, seed {rep['seed']}, {rep['steps']} steps of batch "
           f"{rep['batch']} per learning rate (constant after {rep['warmup']} warm-up steps; step time = median "
           f"after the first {rep['skip']}), {rep['threads']} threads, CPU. Every variant ran in its own fresh "
           f"process on plain onnxruntime: peers as step graphs built like a bundle's (cnn_peers.py), TaskEdge "
           f"as its bundle under the runtime's Trainer. Peak MB = max RSS of that fresh process while it trains "
           f"at the first rate of its sweep (psutil, 5 ms; every rate holds the same tensors; val and test run "
           f"after training at the training batch and are not counted). Learning rate: the best val accuracy of the grid (below; extended once by the next 1-3-10 rate when the best sits on its edge); accuracy = test. Peers' "
           f"new/fitted head trains at {rep['head_lr']:g}; TaskEdge uses one rate for delta and head (as "
           f"`taskedge adapt`). FLOPs: Conv/ConvTranspose/MatMul/Gemm nodes of the step graph and Muls read only "
           f"by ReduceSums (written-out multiply-accumulates), 2 per multiply-accumulate, forward + backward + loss at this batch (x fwd = over the forward graph); "
           f"GaLore adds its projections. Load average {rep['loadavg'][0]} -> {rep['loadavg'][1]} on "
           f"{rep['cpus']} shared cores; wall {rep['wall_seconds']:.0f} s, workers' CPU "
           f"{rep.get('worker_cpu_seconds', 0):.0f} s (torch's OpenMP passive, numpy's BLAS on one thread).", ""]
    for run in rep["runs"]:
        out += [f"## {run['title']}: {run['scenario']}", "",
                f"{run['classes']} classes, {run['head']}; train {run['n_train']} / val {run['n_val']} / "
                f"test {run['n_test']}. TaskEdge (default budget): {taskedge_gap(run['variants'])}.", "",
                table(run), ""]
        out += ["Time, worker wall / CPU s (build + FLOP count s): " + timing(run), ""]
        out += [f"Failed: `{n}` ({why})" for n, why in run.get("failed", {}).items()]
        out += ["", "Sweeps (lr: val / test accuracy):", "", sweeps(run), ""]
    return "\n".join(out)


def write(rep: dict, out, log=lambda m: None) -> None:
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    (o / "bench-cnn.json").write_text(json.dumps(rep, indent=1))
    (o / "bench-cnn.md").write_text(format_md(rep))
    try:
        write_png(rep, o / "bench-cnn.png")
    except ImportError as e:
        log(f"no bench-cnn.png ({e}); pip install matplotlib")


def write_png(rep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = rep["runs"]
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 4 * len(runs)), squeeze=False)
    colors = {"taskedge": "#1f77b4", "full": "#d62728", "probe": "#7f7f7f", "lora": "#ff7f0e", "dora": "#2ca02c",
              "galore": "#9467bd"}
    for row, run in zip(axes, runs):
        front = set(pareto(run["variants"]))
        for ax, key, label in ((row[0], "peak_rss_mb", "peak RSS (MB)"), (row[1], "flops", "GFLOP per update")):
            for n, r in run["variants"].items():
                x = r["flops"]["step"] / 1e9 if key == "flops" else r[key]
                ax.scatter(x, r["accuracy"], color=colors.get(r["family"], "k"), s=60 if n in front else 25,
                           edgecolors="k" if n in front else "none")
                ax.annotate(n, (x, r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{run['model']} / {run['scenario']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)
