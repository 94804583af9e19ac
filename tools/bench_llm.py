"""Causal-LM bench: TaskEdge 0.1 % (step graph on plain onnxruntime) vs LoRA r=8 and full
fine-tuning on ORT-training's own API and on PyTorch (+ peft), the same model, batches and schedule.

    python -m taskedge.tools.bench_llm BUNDLE HF_FOLDER --train T.jsonl --test E.jsonl --domain D.jsonl \\
        [--steps 60] [--batch 4] [--engines taskedge,ort-lora-r8,...] [--work DIR] [--json]

Every engine runs in a fresh process (peak RSS is that process's `ru_maxrss`): `--steps` optimizer
steps over the same batches (runtime/train/schedule.py: the seed's permutation, warm-up then cosine
to 0 at the engine's own lr), then exact match and perplexity of the answers on --test and the
perplexity of the --domain texts (tools/llm_data.py). Step time is the median step after the first;
the peak is the process's at the end of training (fits: against it), then after the evaluation.
The ORT-training artifacts are built first, each in its own process, into --work (kept: a rerun
reuses them). HF_FOLDER is the float32 checkpoint the bundle was exported from (for a GGUF:
export/causal_lm.py `save_folder`). Budgets: the Orin Nano 8 GB / 4 GB profiles' memory shares.
A row that cannot run says why (the process's exit and last error line)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from taskedge.runtime.flags import POSITIVE, Parser, arg_type, at_least

from .bench_llm_engines import ORT_KINDS, build, make

ENGINES = ("taskedge", "ort-lora-r8", "ort-full", "torch-lora-r8", "torch-full")
LRS = {"taskedge": 1e-3, "ort-lora-r8": 1e-3, "torch-lora-r8": 1e-3, "ort-full": 5e-5, "torch-full": 5e-5}
PROFILES = ("jetson-orin-nano-8gb", "jetson-orin-nano-4gb")


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _data(bundle: Path, paths: Dict[str, str]):
    from taskedge.runtime import bundle as B, lm
    man = B.load_bundle(bundle, verify=False)
    enc = lm.Encoder(bundle / B.TOKENIZER, man.preprocessing)
    return {k: lm.load_jsonl(Path(p), enc) for k, p in paths.items()}


def _metrics(engine, ds, batch: int = 8) -> dict:
    from taskedge.runtime.lm import metrics
    chunks = (ds.batch(np.arange(s, min(s + batch, len(ds.labels)))) for s in range(0, len(ds.labels), batch))
    return metrics((engine.answer_logits(b), b[-1]) for b in chunks)


def worker(a) -> dict:
    from taskedge.runtime.train.schedule import batch_indices, lr_at
    data = _data(Path(a.bundle), {"train": a.train, "test": a.test, "domain": a.domain})
    eng = make(a.worker, Path(a.bundle), a.folder, Path(a.work), a.threads)
    if a.base_eval:                  # its own process: an eval session before training would raise the train peak
        return {"base": _evaluate(eng, data)}
    lr, times, losses = a.lr or LRS[a.worker], [], []
    for step in range(a.steps):
        b = data["train"].batch(batch_indices(step, len(data["train"].labels), a.batch, a.seed))
        t = time.perf_counter()
        losses.append(eng.step(b, lr_at(step, a.steps, lr, "cosine", a.warmup)))
        times.append(time.perf_counter() - t)
        print(f"[{a.worker}] step {step + 1}/{a.steps} loss {losses[-1]:.3f} {times[-1]:.1f}s", file=sys.stderr, flush=True)
    return {"engine": a.worker, "lr": lr, "steps": a.steps, "trainable": int(eng.trainable),
            "update_bytes": int(eng.update_bytes), "step_ms": round(1e3 * float(np.median(times[1:] or times)), 1),
            "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
            "train_peak_rss_mb": _peak_mb(), **_evaluate(eng, data), "peak_rss_mb": _peak_mb()}


def _evaluate(eng, data) -> dict:
    test, dom = _metrics(eng, data["test"]), _metrics(eng, data["domain"])
    return {"exact_match": test["accuracy"], "answer_perplexity": test["perplexity"], "domain_perplexity": dom["perplexity"]}


def _child(a, *extra: str) -> dict:
    """This module in a fresh process; its JSON line, or the reason it failed."""
    cmd = [sys.executable, "-m", "taskedge.tools.bench_llm", a.bundle, a.folder, "--train", a.train, "--test", a.test,
           "--domain", a.domain, "--work", a.work, "--steps", str(a.steps), "--batch", str(a.batch),
           "--threads", str(a.threads), "--seed", str(a.seed), "--warmup", str(a.warmup),
           *(["--lr", str(a.lr)] if a.lr else []), *extra]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode == 0:
        return json.loads(r.stdout.strip().splitlines()[-1])
    last = next((ln for ln in reversed(r.stderr.strip().splitlines()) if ln.strip()), "")
    return {"error": f"exit {r.returncode}: {last[:300]}"}


def run(a) -> dict:
    from taskedge.runtime.profiles import load_profile
    budgets = {n: load_profile(n).budget_mb for n in PROFILES}
    rows: List[dict] = []
    for engine in a.engines:
        if engine in ORT_KINDS and not (Path(a.work) / engine / "bench.json").is_file():
            print(f"[bench-llm] building ORT-training artifacts for {engine}", file=sys.stderr, flush=True)
            built = _child(a, "--build", engine)
            if "error" in built:
                rows.append({"engine": engine, "error": f"artifacts: {built['error']}"})
                continue
        print(f"[bench-llm] {engine}: {a.steps} steps", file=sys.stderr, flush=True)
        row = {"engine": engine, **_child(a, "--worker", engine)}
        if engine == "taskedge":
            row.update(_child(a, "--worker", engine, "--base-eval"))
        if engine in ORT_KINDS:
            row["build"] = json.loads((Path(a.work) / engine / "bench.json").read_text())
        row.update({f"fits_{k}": row.get("train_peak_rss_mb", float("inf")) <= v for k, v in budgets.items()})
        rows.append(row)
    return {"rows": rows, "budgets_mb": budgets, "load_average": os.getloadavg(), "steps": a.steps, "batch": a.batch}


def format_table(res: dict) -> str:
    b = res["budgets_mb"]
    lines = [f"{res['steps']} steps x batch {res['batch']}; load average {', '.join(f'{x:.1f}' for x in res['load_average'])}",
             f"{'engine':14s} {'lr':>7s} {'trainable':>12s} {'update B':>12s} {'step ms':>8s} {'peak MB':>8s} {'+eval':>6s} "
             f"{'exact':>6s} {'ans ppl':>8s} {'dom ppl':>9s}  fits 8 GB ({b[PROFILES[0]]:.0f}) / 4 GB ({b[PROFILES[1]]:.0f})"]
    base = next((r["base"] for r in res["rows"] if "base" in r), None)
    if base:
        lines.append(f"{'(base)':14s} {'':>7s} {'':>12s} {'':>12s} {'':>8s} {'':>8s} {'':>6s} {base['exact_match']:6.3f} "
                     f"{base['answer_perplexity']:8.2f} {base['domain_perplexity']:9.2f}")
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"{r['engine']:14s} cannot run: {r['error']}")
            continue
        lines.append(f"{r['engine']:14s} {r['lr']:7.0e} {r['trainable']:12,d} {r['update_bytes']:12,d} {r['step_ms']:8.0f} "
                     f"{r['train_peak_rss_mb']:8.0f} {r['peak_rss_mb']:6.0f} {r['exact_match']:6.3f} {r['answer_perplexity']:8.2f} "
                     f"{r['domain_perplexity']:9.2f}  {'yes' if r[f'fits_{PROFILES[0]}'] else 'no'} / "
                     f"{'yes' if r[f'fits_{PROFILES[1]}'] else 'no'}")
    return "\n".join(lines)


def _engines(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise ValueError(f"unknown engine {bad[0] if bad else text!r}: use a comma list of {', '.join(ENGINES)}")
    return names


def parser() -> Parser:
    p = Parser(prog="bench_llm", description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a causal-LM bundle (taskedge export hf:FOLDER [--gguf FILE])")
    p.add_argument("folder", help="the float32 HF checkpoint folder the bundle was exported from (PyTorch rows)")
    for name, what in (("train", "training"), ("test", "held-out task"), ("domain", "held-out domain-text")):
        p.add_argument(f"--{name}", required=True, help=f"{what} prompt/answer .jsonl (tools/llm_data.py)")
    p.add_argument("--work", default="bench-llm-work", help="folder for the ORT-training artifacts (default %(default)s)")
    p.add_argument("--engines", type=arg_type(_engines), default=list(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--steps", type=arg_type(int, at_least(1)), default=60, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch", type=arg_type(int, at_least(1)), default=4, help="examples per step (default %(default)s)")
    p.add_argument("--warmup", type=arg_type(int, at_least(0)), default=3, help="warm-up steps (default %(default)s)")
    p.add_argument("--threads", type=arg_type(int, at_least(1)), default=2, help="compute threads (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="batch order (default %(default)s)")
    p.add_argument("--lr", type=arg_type(float, POSITIVE), help=f"one lr for every engine (default per engine: {LRS})")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--worker", choices=ENGINES, help=__import__("argparse").SUPPRESS)
    p.add_argument("--build", choices=list(ORT_KINDS), help=__import__("argparse").SUPPRESS)
    p.add_argument("--base-eval", action="store_true", help=__import__("argparse").SUPPRESS)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    for f in (a.bundle, a.folder):
        if not Path(f).is_dir():
            print(f"bench_llm: error: {f} is not a folder (give the bundle, then the HF checkpoint folder)", file=sys.stderr)
            return 2
    if a.build:
        info = {**build(Path(a.bundle), ORT_KINDS[a.build], Path(a.work) / a.build), "peak_rss_mb": _peak_mb()}
        (Path(a.work) / a.build / "bench.json").write_text(json.dumps(info))
        print(json.dumps(info))
        return 0
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    res = run(a)
    print(json.dumps(res, indent=2) if a.json else format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
