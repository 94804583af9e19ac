"""`taskedge bench --scenarios shift,new-classes`: the CNN study of "From LLMs to Edge" (arXiv
2507.23536) on this runtime. For each CNN (scenarios.CNNS) and scenario (scenarios.py): the data,
the base ONNX, every variant's step graph (cnn_peers.py) or TaskEdge bundle (the exporter at its
default budget and at 1 %), FLOPs counted from each step graph (flops.py), then one fresh worker
process per variant (cnn_worker.py) sweeping its learning rates. Report: scenario_report.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .variants import THREADS

# name -> (engine, family, rank or budget, learning-rate grid); the sweep picks by val accuracy
CNN_VARIANTS = {
    "probe": ("peer", "probe", 0, [3e-3, 1e-2, 3e-2]),
    "full": ("peer", "full", 0, [1e-4, 3e-4, 1e-3]),
    # the rank rows: two rates where the full grid's run of 2026-11-25 put them (LoRA's scale is 2 at every
    # rank; r1 took 3e-3-1e-2, r16 1e-3-3e-3), not extended; three-rate grids extend past an edge best
    # (cnn_worker.beyond_edge)
    "lora-r1": ("peer", "lora", 1, [3e-3, 1e-2]),
    "lora-r4": ("peer", "lora", 4, [1e-3, 3e-3, 1e-2]),
    "lora-r16": ("peer", "lora", 16, [1e-3, 3e-3]),
    "dora-r4": ("peer", "dora", 4, [1e-3, 3e-3, 1e-2]),
    "galore-r4": ("peer", "galore", 4, [1e-3, 3e-3, 1e-2]),
    "taskedge": ("bundle", "taskedge", None, [3e-3, 1e-2, 3e-2]),      # the exporter's default budget
    "taskedge-1%": ("bundle", "taskedge", 0.01, [3e-3, 1e-2, 3e-2]),
    # not in the default run: TaskEdge with its head at the peers' head rate (HEAD_LR), not adapt's one rate
    "taskedge+head": ("bundle", "taskedge", None, [3e-3, 1e-2, 3e-2]),
    # PyTorch rows (cnn_torch.py) at the rate the sweep picked for the same method's step graph
    "torch-probe": ("torch", "probe", 0, "probe"),
    "torch-full": ("torch", "full", 0, "full"),
    "torch-lora-r4": ("torch", "lora", 4, "lora-r4"),
    "torch-dora-r4": ("torch", "dora", 4, "dora-r4"),
    "torch-galore-r4": ("torch", "galore", 4, "galore-r4"),
    "torch-taskedge": ("torch", "taskedge", 0, "taskedge"),
}
EXTRA_VARIANTS = OWN_HEAD_RATE = ("taskedge+head",)
DEFAULT_VARIANTS = [k for k in CNN_VARIANTS if k not in EXTRA_VARIANTS]
QUICK_VARIANTS = ["probe", "full", "lora-r4", "dora-r4", "galore-r4", "taskedge"]
HEAD_LR = 1e-2
# each worker's threads. OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep at barriers instead of
# spinning (O-Net's torch full-FT step at load 8 on 2 cores: 73-74 ms vs 192-1121 ms spinning);
# OPENBLAS_NUM_THREADS=1: numpy's BLAS (GaLore's SVDs and projections) on one thread (MobileNetV2's
# 52 SVDs at load 9: 0.35 s vs 34-46 s on two). onnxruntime's pool is set by `threads`.
WORKER_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "OMP_WAIT_POLICY": "PASSIVE",
              "OPENBLAS_NUM_THREADS": "1"}
FULL = dict(steps=40, batch=16, warmup=5, skip=3, models=["mobilenet_v2", "onet"], limit=None)
QUICK = dict(steps=8, batch=16, warmup=2, skip=2, models=["onet"], limit=64)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _features(base_path: Path, pixels: np.ndarray) -> np.ndarray:
    from taskedge.runtime.ort import onnxruntime as ort
    sess = ort.InferenceSession(str(base_path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"pixels": pixels[i:i + 100]})[0] for i in range(0, len(pixels), 100)])


def _artifacts(name: str, base_path: Path, base, classes: int, seed: int, folder: Path, head_init, calib: Path):
    """Build one variant: a peer folder or a TaskEdge bundle; returns (engine, info, step file, state file)."""
    engine, family, param, _ = CNN_VARIANTS[name]
    if engine == "peer":
        from .cnn_peers import build_peer
        info = build_peer(base, family, param, classes, seed, folder, head_init)
        return info, folder / "step.onnx", folder / "eval.onnx", folder / "init.npz"
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    cfg = dict(model=str(base_path), out=str(folder), calib=str(calib), num_classes=classes, seed=seed)
    if param is not None:
        cfg["budget"] = param
    man = export_bundle(ExportConfig(**cfg), log=lambda s: None)
    info = {"family": "taskedge", "budget": man.method["budget"], "trainable_params": man.update_params + man.head_params,
            "head_params": man.head_params, "num_weights": man.num_weights, "k": man.method["k"],
            "neuron_share": man.method.get("neuron_share")}
    from taskedge.runtime import bundle as B
    return info, folder / B.STEP_MODEL, folder / B.EVAL_MODEL, folder / B.INITIAL_STATE


def _count(step: Path, evl: Path, state: Path, batch: dict) -> dict:
    import onnx
    from .flops import graph_flops
    from .worker import load_npz
    from taskedge.runtime import bundle as B
    from taskedge.runtime.live import LiveWeights
    params = load_npz(state)
    feeds = {"pixels": batch["pixels"], "labels": batch["labels"], **params}
    if (step.parent / B.MANIFEST).is_file():                  # a bundle: its live layers' W' (runtime/live.py)
        feeds.update(LiveWeights(step.parent, B.read_manifest(step.parent)).sync(params))
    s, e = graph_flops(onnx.load(str(step)), feeds), graph_flops(onnx.load(str(evl)), feeds)
    return {"step": s["total"], "forward": e["total"], "by_op": s}


def _worker(job_path: Path) -> dict:
    """Run one variant's worker; its JSON line plus its wall and CPU seconds (startup included)."""
    env = {**os.environ, **WORKER_ENV}
    t, c = time.perf_counter(), _children_cpu()
    r = subprocess.run([sys.executable, "-m", __package__, "--cnn-worker", str(job_path)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=3600, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"cnn worker {job_path.stem} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["time"] = {"worker_wall_s": round(time.perf_counter() - t, 1), "worker_cpu_s": round(_children_cpu() - c, 1)}
    return out


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_scenario(model: str, scenario: str, cfg: dict, variants: list, work: Path, seed: int, log,
                 on_row=lambda run: None) -> dict:
    from taskedge.export.ingest import ingest
    from taskedge.tools import demo_data as D
    import onnx

    from .scenarios import CLASSES, CNNS, prefit_head, scenario_data

    net, classes = CNNS[model], CLASSES[scenario]
    w = work / f"{model}-{scenario}"
    w.mkdir(parents=True, exist_ok=True)
    data = scenario_data(scenario, model, net["size"], seed, cfg["limit"])
    for part in ("train", "val", "test"):
        D.write_npz(w / f"{part}.npz", data[part])
    base = ingest(net["factory"]).model
    onnx.save(base, str(w / "base.onnx"))
    head_init, head_note = None, "new head (export.head.add_head's init)"
    if "prefit" in data:
        h = prefit_head(_features(w / "base.onnx", data["prefit"]["pixels"]), data["prefit"]["labels"], classes)
        head_init = {"weight": h["weight"], "bias": h["bias"]}
        np.savez(w / "head_init.npz", **head_init)
        head_note = f"head fitted on clean digits (train accuracy {h['train_accuracy']:.3f})"
    else:               # the torch rows' copy of add_head's init (the graphs make their own)
        from taskedge.export.baselines import head_arrays
        new = head_arrays(base, classes, seed)
        np.savez(w / "head_init.npz", weight=new["taskedge_head.weight"], bias=new["taskedge_head.bias"])
    batch = {"pixels": data["train"]["pixels"][:cfg["batch"]], "labels": data["train"]["labels"][:cfg["batch"]]}
    rows, failed = {}, {}
    for name in variants:
        engine, family, param, lrs = CNN_VARIANTS[name]
        t = time.perf_counter()
        if engine == "torch":           # the rate its step-graph twin picked (else that grid's middle)
            twin = lrs
            lrs = [rows[twin]["lr"]] if twin in rows else [CNN_VARIANTS[twin][3][1]]
            flops, spent = None, {}
        else:
            info, step, evl, state = _artifacts(name, w / "base.onnx", base, classes, seed, w / name, head_init,
                                                w / "train.npz")
            built = time.perf_counter()
            flops = _count(step, evl, state, batch)
            spent = {"build_s": round(built - t, 1), "count_s": round(time.perf_counter() - built, 1)}
            if family == "galore":      # the optimizer's projections (down and up), per step
                flops["optimizer"] = _galore_flops(state, param, info["head"])
                flops["step"] += flops["optimizer"]
        job = {"name": f"{model}-{scenario}-{name}", "engine": engine, "family": family, "rank": param,
               "artifacts": str(w / name), "train": str(w / "train.npz"), "val": str(w / "val.npz"),
               "test": str(w / "test.npz"), "head_init": str(w / "head_init.npz") if head_init else None,
               "lrs": [lrs[len(lrs) // 2]] if cfg.get("one_lr") else lrs, "head_lr": HEAD_LR, "threads": THREADS,
               "steps": cfg["steps"], "batch": cfg["batch"], "warmup": cfg["warmup"], "skip": cfg["skip"],
               "seed": seed, "workdir": str(w), "factory": net["factory"], "head_npz": str(w / "head_init.npz"),
               "bundle": str(w / "taskedge"), "own_head_lr": name in OWN_HEAD_RATE}
        (w / f"{name}.job.json").write_text(json.dumps(job))
        try:
            r = _worker(w / f"{name}.job.json")
        except (RuntimeError, subprocess.TimeoutExpired) as e:     # one variant's failure ends only that row
            failed[name] = str(e).strip().splitlines()[-1][:300]
            log(f"{model}/{scenario}/{name}: FAILED ({failed[name]})")
            continue
        if engine == "torch":
            flops = r.pop("flops")
            if family == "galore" and "optimizer" in rows.get(twin, {}).get("flops", {}):
                flops["optimizer"] = rows[twin]["flops"]["optimizer"]      # the same matrices, the same code
                flops["step"] += flops["optimizer"]
        r["time"].update(spent)
        rows[name] = {**r, "engine": engine, "family": family, "param": param, "flops": flops}
        on_row(_run_record(model, scenario, classes, head_note, data, rows, failed))
        log(f"{model}/{scenario}/{name}: acc {r['accuracy']:.3f} (lr {r['lr']:g}), {r['step_ms']:.0f} ms/step, "
            f"peak {r['peak_rss_mb']:.0f} MB, {flops['step'] / 1e9:.2f} GFLOP/step ({time.perf_counter() - t:.0f} s, worker "
            f"CPU {r['time']['worker_cpu_s']:.0f} s)")
    return _run_record(model, scenario, classes, head_note, data, rows, failed)


def _run_record(model, scenario, classes, head_note, data, rows, failed) -> dict:
    from .scenarios import CNNS
    return {"model": model, "title": CNNS[model]["title"], "scenario": scenario, "classes": classes,
            "head": head_note, "n_train": len(data["train"]["labels"]), "n_val": len(data["val"]["labels"]),
            "n_test": len(data["test"]["labels"]), "variants": dict(rows), "failed": dict(failed)}


def _galore_flops(state: Path, rank: int, head: list) -> int:
    from .worker import load_npz
    total = 0
    for n, a in load_npz(state).items():
        if a.ndim >= 2 and n not in head:
            rows, cols = a.shape[0], a.size // a.shape[0]
            total += 4 * rows * cols * min(rank, rows, cols)
    return total


def run_scenarios(scenarios, quick: bool = False, steps: int = None, seed: int = 0, out: str = "bench-cnn",
                  variants=None, models=None, workdir: str = None, log=_log) -> dict:
    from . import scenario_report as R
    cfg = dict(QUICK if quick else FULL)
    cfg["one_lr"] = quick
    if steps:
        cfg["steps"] = steps
    variants = list(variants or (QUICK_VARIANTS if quick else DEFAULT_VARIANTS))
    if "torch-taskedge" in variants and "taskedge" not in variants:
        variants.insert(0, "taskedge")          # its allocation comes from the bundle
    t0, cpu0, own0 = time.perf_counter(), _children_cpu(), _own_cpu()
    load0 = round(os.getloadavg()[0], 2)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="taskedge-cnn-bench-"))
    try:
        runs = []

        def report(partial: bool) -> dict:
            rep = {"quick": quick, "partial": partial, "seed": seed, "steps": cfg["steps"], "batch": cfg["batch"],
                   "warmup": cfg["warmup"], "skip": cfg["skip"], "threads": THREADS, "head_lr": HEAD_LR,
                   "grids": {k: v[3] for k, v in CNN_VARIANTS.items() if k in variants}, "runs": runs,
                   "loadavg": [load0, round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
                   "wall_seconds": round(time.perf_counter() - t0, 1),
                   "worker_cpu_seconds": round(_children_cpu() - cpu0, 1), "main_cpu_seconds": round(_own_cpu() - own0, 1)}
            if out:             # rewritten after every variant: a long run can be read while it goes
                R.write(rep, out, log if not partial else (lambda m: None))
            return rep
        def progress(run: dict) -> None:
            runs[-1] = run
            report(True)
        for m in models or cfg["models"]:
            for s in scenarios:
                runs.append(None)
                runs[-1] = run_scenario(m, s, cfg, variants, work, seed, log, on_row=progress)
        return report(False)
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)
