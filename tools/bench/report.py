"""The bench's outputs: bench.json, the Markdown report (bench.md, also what `taskedge bench`
prints) and the step-time / peak-memory bar chart (bench.png)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def write(report: dict, out, plot: bool = True, log=lambda m: None) -> None:
    """bench.json, bench.md and (with matplotlib) bench.png in folder `out`."""
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    (o / "bench.json").write_text(json.dumps(report, indent=2))
    (o / "bench.md").write_text(format_md(report))
    if plot:
        try:
            write_png(report, o / "bench.png")
        except ImportError as e:
            log(f"no bench.png ({e}); pip install matplotlib")


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def format_table(r: dict) -> str:
    head = ["variant", "step ms", "x full", "x infer", "peak MB", "x full", "x infer", "trainable",
            "optim state", "update", "% model", "accuracy", "loss 5 first->last"]
    rows = []
    for name, v in r["variants"].items():
        acc = "-" if v["accuracy"] is None else f"{v['accuracy']:.4f}"
        loss = "-" if v["loss_first5_mean"] is None else f"{v['loss_first5_mean']:.3f}->{v['loss_last5_mean']:.3f}"
        f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        rows.append([name, f"{v['step_ms_median']:.1f}", f(v["x_ort_full_time"]), f(v["x_infer_time"]),
                     f"{v['peak_rss_mb']:.0f}", f(v["x_ort_full_mem"]), f(v["x_infer_mem"]),
                     f"{v['trainable_params']:,}", _fmt_bytes(v["optimizer_state_bytes"]),
                     _fmt_bytes(v["update_bytes"]),
                     "-" if v["update_share_of_model_bytes"] is None else f"{100 * v['update_share_of_model_bytes']:.3f}",
                     acc, loss])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(x) + " |" for x in rows]
    return "\n".join(lines)


def format_targets(r: dict) -> str:
    lines = []
    for t in r["targets"]:
        mark = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        val = t["value"]
        if t["target"].startswith("acc"):
            vs = "-" if val is None else f"{100 * val:+.2f} points"
        elif t["target"] in ("update_share", "ckpt_share"):
            vs = "-" if val is None else f"{100 * val:.4f} %"
        else:
            vs = "-" if val is None else f"{val:.3f}x"
        lines.append(f"- **{mark}** {t['text']}: {vs}")
    return "\n".join(lines)


def format_md(r: dict) -> str:
    out = [f"# TaskEdge bench: {r['title']}", "",
           f"{'quick' if r['quick'] else 'full'} run, seed {r['seed']}, {r['execution_provider']}, {r['threads']} threads "
           f"(ORT intra-op and torch), batch {r['batch']}" + (f" x {r['max_len']} tokens" if r.get("max_len") else "")
           + f", {r['steps']} steps per variant (median step time over the last {r['measured_steps']}; "
           f"first {r['steps'] - r['measured_steps']} skipped), train {r['n_train']} / held-out test {r['n_test']}. "
           + (f"Step time of ORT and inference variants = median over {r['rounds']} rounds (that run + "
              f"{r['rounds'] - 1} timing-only run(s) of {r['timing_steps']} steps each, variants interleaved); "
              "their time ratios (x full, x infer, targets) = median over the timing-only rounds of the ratio "
              "within a round; torch variants: that run only. " if r.get("rounds", 1) > 1 else "")
           + 
           f"Each variant ran in its own fresh subprocess; peak memory = max RSS of that worker (psutil, 5 ms) "
           f"from start through training (imports + model + steps). Model: {r['num_weights']:,} weights "
           f"({_fmt_bytes(r['model_bytes'])} fp32). Machine: {r['machine']['cpus']} cores, load average "
           f"{r['machine']['loadavg_start'][0]} at start / {r['machine']['loadavg_end'][0]} at end (shared host: "
           f"other jobs ran concurrently, so absolute times are noisy).", "",
           f"Learning rates ({r.get('schedule', 'constant')} after {r['warmup_lr_steps']} linear warm-up steps, "
           f"AdamW eps 1e-6, no weight "
           f"decay): TaskEdge {r['lr']['taskedge']:g} (delta and head), LoRA {r['lr']['lora']:g}, full FT "
           f"{r['lr']['full']:g}; new head {r['lr']['head']:g} in every variant"
           + "".join(f"; {n} {v['lr']:g} (tuned)" for n, v in r["variants"].items()
                     if v.get("lr") and v["lr"] != r["lr"].get(v["family"])) + ".", "",
           "Optimizer state = 2 x trainable x 4 B (AdamW). Update = the trained tensors as .npz (TaskEdge: + "
           "allocation.npz; full FT: every trainable weight; LoRA: A, B + head).", "",
           format_table(r), ""]
    if r.get("skipped"):
        out += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in r["skipped"].items()), ""]
    out += [f"## Targets (primary TaskEdge variant: `{r['primary']}`)", "", format_targets(r), ""]
    if r.get("profiles"):
        out += ["## Profile (ORT profiler, kernel time per op type, ms per step)", ""]
        for name, rows in r["profiles"].items():
            out += [f"### {name}", "", "| op | ms/step | share |", "|---|---|---|"]
            out += [f"| {x['op']} | {x['ms_per_step']:.1f} | {100 * x['share']:.1f} % |" for x in rows]
            out.append("")
    out += ["Variants: " + ", ".join(f"`{k}`" for k in r["variants"]) + ". ORT full FT trains every float "
            "initializer with > 1 element (all weights, biases, LayerNorms, embeddings) + head; LoRA r=8 (alpha "
            "16) is on every MatMul/Gemm weight op (the layers TaskEdge adapts); torch LoRA = peft "
            "`inject_adapter_in_model` on the same nn.Linear layers; torch TaskEdge = "
            "`W + scatter_add(delta)` parametrisation at the bundle's allocation indices.", "",
            f"Wall time {r['wall_seconds']:.0f} s.", ""]
    return "\n".join(out)


def write_png(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["variants"])
    colors = ["#999999" if n == "infer" else "#d62728" if r["variants"][n]["family"] == "full" else
              "#ff7f0e" if r["variants"][n]["family"] == "lora" else "#1f77b4" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "step_ms_median", "median step time (ms)"),
                           (axes[1], "peak_rss_mb", "peak RSS of the worker (MB)")):
        vals = [r["variants"][n][key] for n in names]
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(label)
        for i, val in enumerate(vals):
            ax.text(i, val, f"{val:.0f}", ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"{r['title']}: batch {r['batch']}, {r['threads']} CPU threads")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def machine(load_start: list) -> dict:
    """The host a bench ran on: CPUs, Python, load average at start and end (these hosts are noisy)."""
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
