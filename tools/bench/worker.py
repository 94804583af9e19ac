"""One variant in its own fresh process (`python -m taskedge.tools.bench --worker NAME --spec
spec.json`): open the variant's engine, time its steps on the runtime's data order and learning-rate
schedule, then measure held-out accuracy (the runtime's accuracy loop), the update's size and the
worker's peak memory; prints the result as one JSON line."""
from __future__ import annotations

import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .variants import EVAL_BATCH, LR, SCHEDULE, slug

# engine kind (variants.VARIANTS) -> (module, class); imported only in the worker that runs it
ENGINES = {"ort": ("ort_engines", "OrtTrainingEngine"), "step": ("ort_engines", "StepEngine"),
           "infer": ("ort_engines", "InferEngine"), "torch": ("torch_engine", "TorchEngine")}


def load_npz(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_npz(path: Path, arrays: dict) -> int:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path.stat().st_size


def engine_class(kind: str):
    module, cls = ENGINES[kind]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def run_variant(name: str, spec: dict, v: dict) -> dict:
    """The training run (or, when the spec asks, timing-only steps or an ORT profile) of one variant."""
    cls = engine_class(v["engine"])
    cls.setup(spec, v)
    from taskedge.runtime import bundle as B
    from taskedge.runtime.adapt import accuracy, batch_indices, lr_at
    from taskedge.runtime.data import Dataset
    from taskedge.runtime.telemetry import MemorySampler

    sampler = MemorySampler(interval_ms=5).start()
    rss_import = sampler.peak_mb()
    train = load_npz(spec["train"])         # the test set is read after training: not in the training peak
    prof_steps, timing = int(spec.get("profile_steps") or 0), int(spec.get("timing_steps") or 0)
    prefix = Path(spec["workdir"]) / f"profile-{slug(name)}"
    engine = cls(spec, v, str(prefix) if prof_steps else None)
    data = Dataset({n: train[n] for n in engine.input_names}, train["labels"], spec["train"])
    probe = sorted(engine.trainable, key=engine.size)[:4]           # small tensors to watch for change
    before = {n: engine.get(n) for n in probe}
    steps = prof_steps + spec["skip"] if prof_steps else (timing + spec["skip"] if timing else spec["steps"])
    times, losses = [], []
    for step in range(steps):
        batch = data.batch(batch_indices(step, len(data), spec["batch"], spec["seed"]))
        lrs = [lr_at(step, steps, base, SCHEDULE, spec["warmup"]) for base in engine.lrs]
        t0 = time.perf_counter()
        loss = engine.step(batch, lrs)
        times.append(time.perf_counter() - t0)
        if loss is not None:
            losses.append(loss)
    peak = sampler.peak_mb()
    if timing:
        sampler.stop()
        return {"variant": name, "step_ms_median": round(1000 * statistics.median(times[spec["skip"]:]), 2)}
    if prof_steps:
        engine.close()
        import gc
        gc.collect()
        files = sorted(prefix.parent.glob(prefix.name + "*.json"), key=lambda p: p.stat().st_mtime)
        sampler.stop()
        return {"variant": name, "profile": profile_summary(files[-1], steps) if files else [],
                "profile_note": f"{steps} steps ({spec['skip']} warm-up included)",
                "torch_imported": "torch" in sys.modules}
    if not cls.trains:
        sampler.stop()
        return result(name, v, spec, times, [], peak, rss_import, 0, 0, None, None)
    test = load_npz(spec["test"])
    acc = accuracy(engine, Dataset({n: test[n] for n in engine.input_names}, test["labels"], spec["test"]),
                   EVAL_BATCH)
    changed = float(sum(np.abs(engine.get(x) - before[x]).sum() for x in probe))
    update_bytes = save_npz(Path(spec["workdir"]) / f"update-{slug(name)}.npz", engine.update())
    if v["family"] == "taskedge":      # the allocation ships with the delta
        update_bytes += (Path(v.get("bundle") or v["artifacts"]) / B.ALLOCATION).stat().st_size
    sampler.stop()
    return {**result(name, v, spec, times, losses, peak, rss_import, engine.n_trainable, update_bytes, acc, changed),
            **engine.extra()}


def result(name, v, spec, times, losses, peak, rss_import, n_trainable, update_bytes, acc, changed) -> dict:
    """The worker's result record (one row of the report)."""
    measured = times[spec["skip"]:]
    return {"variant": name, "engine": v["engine"], "family": v["family"], "options": v["options"],
            "lr": v.get("lr"), "head_lr": LR["head"] if v["family"] != "infer" else None,
            "step_ms_median": round(1000 * statistics.median(measured), 2),
            "step_ms_min": round(1000 * min(measured), 2), "measured_steps": len(measured),
            "warmup_steps_skipped": spec["skip"], "peak_rss_mb": round(peak, 1),
            "rss_after_imports_mb": round(rss_import, 1), "trainable_params": int(n_trainable),
            "optimizer_state_bytes": int(2 * n_trainable * 4), "update_bytes": int(update_bytes),
            "accuracy": acc, "loss_first": losses[0] if losses else None,
            "loss_first5_mean": float(np.mean(losses[:5])) if losses else None,
            "loss_last5_mean": float(np.mean(losses[-5:])) if losses else None,
            "param_change": changed, "steps": len(times), "torch_imported": "torch" in sys.modules}


def profile_summary(path: Path, steps: int, top: int = 16) -> list:
    """Aggregate ORT profiler kernel time per op type (ms per step)."""
    events = json.loads(path.read_text())
    agg = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            agg[op] = agg.get(op, 0.0) + e.get("dur", 0) / 1000.0
    total = sum(agg.values())
    rows = sorted(agg.items(), key=lambda kv: -kv[1])[:top]
    return [{"op": k, "ms_per_step": round(v / max(1, steps), 2), "share": round(v / max(total, 1e-9), 3)}
            for k, v in rows]


def worker_main(name: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    print(json.dumps(run_variant(name, spec, spec["variants"][name])), flush=True)
    return 0
