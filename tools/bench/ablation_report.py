"""The selection ablation's outputs (tools/bench/ablation.py): ablation.json, the Markdown report
(ablation.md, also what `taskedge bench --selection-ablation` prints) and the accuracy plot
(ablation.png: every seed as a dot, mean +- std as a bar, per task and rule)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from taskedge.runtime.fsutil import atomic_path, atomic_write_text


def write(report: dict, out, plot: bool = True, log=lambda m: None) -> None:
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    atomic_write_text(o / "ablation.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(o / "ablation.md", format_md(report))
    if plot:
        try:
            write_png(report, o / "ablation.png")
        except ImportError as e:
            log(f"no ablation.png ({e}); pip install matplotlib")


def _pts(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}"


def accuracy_table(t: dict) -> str:
    lines = ["| rule | accuracy, mean ± std | min – max | vs taskedge, same seed (points) | lr (trials) |",
             "|---|---|---|---|---|"]
    for sel in t["summary"]:
        s = t["summary"][sel]
        vs = "—" if sel == "taskedge" or s["vs_taskedge_mean"] is None else \
            f"{_pts(s['vs_taskedge_mean'])} ± {100 * s['vs_taskedge_std']:.1f}"
        lines.append(f"| {sel} | {s['mean']:.4f} ± {s['std']:.4f} | {s['min']:.4f} – {s['max']:.4f} | {vs} | "
                     f"{t['lr'][sel]['lr']:g} |")
    return "\n".join(lines)


def jaccard_table(t: dict) -> str:
    selections = list(t["jaccard"])
    lines = ["| Jaccard | " + " | ".join(selections) + " |", "|---|" + "---|" * len(selections)]
    for a in selections:
        lines.append(f"| {a} | " + " | ".join("-" if t["jaccard"][a][b] is None else f"{t['jaccard'][a][b]:.3f}"
                                               for b in selections) + " |")
    return "\n".join(lines)


def overview(r: dict) -> str:
    """One line per task: each rule's mean accuracy (the README's table)."""
    sels = r["selections"]
    cell = lambda s: "—" if s is None else f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    lines = ["| task | " + " | ".join(sels) + " |", "|---|" + "---:|" * len(sels)]
    for name, t in r["tasks"].items():
        lines.append(f"| {name} | " + " | ".join(cell(t["summary"].get(s)) for s in sels) + " |")
    return "\n".join(lines)


def format_md(r: dict) -> str:
    sels = r["selections"]
    m = r["machine"]
    out = [f"# Selection ablation: which entries to train, at the same budget",
           "",
           f"{'quick' if r['quick'] else 'full'} run: {len(r['tasks'])} tasks x {len([x for x in sels if x != 'head-only'])} "
           f"rules x {r['seeds']} seeds; "
           f"each run = export with `--selection RULE --seed S`, then `adapt` (the board's step graph on plain "
           f"onnxruntime, cosine schedule, 10 warm-up steps), accuracy on the task's held-out test set. Seed S sets "
           f"the new head's init, the data order and the random rule's picks; the data split is fixed per task. "
           f"`head-only` is the reference: the new head alone trains (the linear probe; none on a task that keeps "
           f"its own head). "
           + (f"Learning rate: {r['fixed_lr']:g} for every run (--lr). " if r.get("fixed_lr") else
              "Learning rate: adapt's own trials (runtime/lr_range.py, judged on held-out training data) "
              "at seed 0, per task and rule, kept for the other seeds. ")
           + f"Machine: {m['cpus']} cores, load average "
           f"{m['loadavg_start'][0]} at start / {m['loadavg_end'][0]} at end of this call; the runs took "
           f"{sum(t['compute_seconds'] for t in r['tasks'].values()) / 60:.0f} min of export + adapt (this call: "
           f"{r['wall_seconds'] / 60:.1f} min; runs recorded in --workdir are reused).",
           "", "Mean ± sample std of held-out accuracy over the seeds:", "", overview(r), ""]
    for name, t in r["tasks"].items():
        tk = t["task"]
        out += [f"## {name}: {t['title']}", "",
                f"budget {100 * tk['budget']:g} % of {t['num_weights']:,} weights: k = {t['k']} per neuron, "
                f"{t['update_params']:,} trained entries + {t['head_params']:,} head; {tk['steps']} steps x batch "
                f"{tk['batch']}; train {t['n_train']} / test {t['n_test']}.", "",
                f"Accuracy before adapting: {np.mean([x['accuracy_before'] for rs in t['runs'].values() for x in rs]):.4f}"
                " (mean over the runs).", "",
                accuracy_table(t), "",
                "Overlap of the trained entries (Jaccard, same seed, mean over seeds):", "",
                jaccard_table(t), ""]
    return "\n".join(out)


def write_png(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(r["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4), squeeze=False)
    colors = {"taskedge": "#1f77b4", "magnitude": "#ff7f0e", "activation": "#2ca02c", "gradient": "#9467bd",
              "random": "#7f7f7f", "head-only": "#d62728"}
    for ax, name in zip(axes[0], tasks):
        t = r["tasks"][name]
        sels = list(t["summary"])
        for i, sel in enumerate(sels):
            s = t["summary"][sel]
            ax.errorbar(i + 0.12, s["mean"], yerr=s["std"], fmt="s", color=colors.get(sel, "#333333"), capsize=4)
            accs = [x["accuracy"] for x in t["runs"][sel]]
            ax.scatter([i - 0.12] * len(accs), accs, color=colors.get(sel, "#333333"), s=14, alpha=0.7)
        lo = min(x["accuracy"] for rs in t["runs"].values() for x in rs)
        hi = max(x["accuracy"] for rs in t["runs"].values() for x in rs)
        pad = max(0.01, 0.3 * (hi - lo))
        ax.set_ylim(lo - pad, min(1.0, hi + pad))
        ax.set_xticks(range(len(sels)))
        ax.set_xticklabels(sels, rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("held-out accuracy")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Selection ablation: same budget, steps and lr trials; {r['seeds']} seeds (dots), "
                 "mean ± std (squares)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
