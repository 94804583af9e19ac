"""The bench's orchestration: build everything, run each variant's worker in its own fresh
subprocess, interleave the timing-only rounds, profile missed time/memory targets, and assemble
the report (`run_bench`, what `taskedge bench` calls)."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import report as R
from .build import prepare
from .targets import compare, evaluate_targets, primary_variant, time_ratio
from .variants import FULL, LR, MODELS, QUICK, SCHEDULE, THREADS, TIMED_ENGINES, VARIANTS


def stderr_log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_worker(name: str, spec_path: Path, timeout: float = 1800, profile_steps: int = 0,
               timing_steps: int = 0) -> dict:
    """One variant's worker (worker.py) in a fresh Python; its JSON result. profile_steps /
    timing_steps: an ORT-profiler run / a timing-only run instead of the training run."""
    sp = spec_path
    if profile_steps or timing_steps:
        spec = json.loads(spec_path.read_text())
        spec["profile_steps"] = profile_steps
        spec["timing_steps"] = timing_steps
        sp = spec_path.with_name("spec-profile.json" if profile_steps else "spec-timing.json")
        sp.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    r = subprocess.run([sys.executable, "-m", __package__, "--worker", name, "--spec", str(sp)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"worker {name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_variants(spec: dict, spec_path: Path, cfg: dict, log) -> dict:
    """Each variant's training run, then (rounds - 1) timing-only rounds of the ORT and inference
    variants, interleaved (forward, backward, ...); their step time becomes the median over rounds."""
    res = {}
    for name in spec["run"]:
        t = time.perf_counter()
        r = res[name] = run_worker(name, spec_path)
        acc = "" if r["accuracy"] is None else f", acc {r['accuracy']:.4f}"
        log(f"{name}: {r['step_ms_median']:.1f} ms/step, peak {r['peak_rss_mb']:.0f} MB{acc} "
            f"({time.perf_counter() - t:.0f}s)")
    timed = [n for n in spec["run"] if VARIANTS[n][0] in TIMED_ENGINES]
    for rnd in range(1, cfg["rounds"]):     # more timing rounds, variants interleaved (noisy hosts)
        order = timed if rnd % 2 else timed[::-1]
        log(f"timing round {rnd + 1}/{cfg['rounds']}: {len(order)} variants x {cfg['timing_steps']} steps")
        for name in order:
            res[name].setdefault("step_ms_rounds", [res[name]["step_ms_median"]])
            res[name]["step_ms_rounds"].append(
                run_worker(name, spec_path, timing_steps=cfg["timing_steps"])["step_ms_median"])
    for name in timed:
        if "step_ms_rounds" in res[name]:
            res[name]["step_ms_first_run"] = res[name]["step_ms_median"]
            res[name]["step_ms_median"] = round(statistics.median(res[name]["step_ms_rounds"]), 2)
    return res


def run_bench(model: str = "text", quick: bool = False, steps: int = None, seed: int = 0, out: str = "bench",
              variants=None, workdir: str = None, keep: bool = False, profile: bool = True, plot: bool = True,
              log=stderr_log, cfg_override: dict = None) -> dict:
    cfg = dict(QUICK if quick else FULL)
    if steps:
        cfg["steps"] = steps
    cfg.update(cfg_override or {})
    if cfg["steps"] <= cfg["skip"]:
        from taskedge.runtime.fsutil import UserError
        raise UserError(f"--steps {cfg['steps']}: the first {cfg['skip']} steps are warm-up and not timed; "
                        f"give --steps {cfg['skip'] + 1} or more")
    variants = list(variants or VARIANTS)
    if model == "vision":
        cfg.setdefault("n_test", None)
    t0 = time.perf_counter()
    load0 = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="taskedge-bench-"))
    try:
        log(f"{MODELS[model]['title']}: preparing base ONNX, bundles and baselines in {tmp}")
        spec = prepare(model, cfg, tmp, seed, variants, log)
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        res = run_variants(spec, spec_path, cfg, log)
        model_bytes = 4 * int(spec["num_weights"] or 0)
        primary = primary_variant(res)
        ratio = time_ratio(res)
        targets = evaluate_targets(res, model_bytes, primary, ratio, model)
        compare(res, model_bytes, ratio)
        profiles = {}
        if profile and any(t["met"] is False and t["target"].startswith(("time", "mem")) for t in targets):
            for name in [primary, "ort-full"]:
                if name in res:
                    log(f"profiling {name} (ORT profiler, 5 steps)")
                    profiles[name] = run_worker(name, spec_path, profile_steps=5)["profile"]
        report = {"model": model, "title": MODELS[model]["title"], "quick": quick, "seed": seed,
                  "execution_provider": "CPUExecutionProvider", "threads": THREADS, "batch": cfg["batch"],
                  "steps": cfg["steps"], "measured_steps": cfg["steps"] - cfg["skip"],
                  "rounds": cfg["rounds"], "timing_steps": cfg["timing_steps"], "warmup_lr_steps": cfg["warmup"],
                  "schedule": SCHEDULE,
                  "max_len": 48 if model == "text" else None, "n_train": spec["n_train"], "n_test": spec["n_test"],
                  "num_weights": spec["num_weights"], "model_bytes": model_bytes, "lr": dict(LR),
                  "primary": primary, "variants": res, "skipped": spec["skipped"], "targets": targets,
                  "profiles": profiles,
                  "machine": R.machine(load0),
                  "wall_seconds": round(time.perf_counter() - t0, 1)}
        if out:
            R.write(report, out, plot, log)
        return report
    finally:
        if not keep and not workdir:
            shutil.rmtree(tmp, ignore_errors=True)
