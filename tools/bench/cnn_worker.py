"""One CNN-bench variant in its own fresh process (`python -m taskedge.tools.bench --cnn-worker
job.json`): for each learning rate of its sweep, a fresh start from the same state, the same
steps on the runtime's data order and schedule (runtime.adapt.batch_indices / lr_at, constant after
warm-up), then val and test accuracy at the training batch. The rate with the best val accuracy
is the variant's; its run gives the step time. Peak memory = max RSS of this fresh process while
it trains at the first rate (every rate holds the same tensors; later rates start on what the
earlier ones left in the allocators: O-Net TaskEdge 141 -> 175 -> 179 MB, kept as
peak_sweep_max_mb). Evaluation is measured apart (at batch 100 it had set every row's peak:
O-Net TaskEdge 139 MB training, 217 MB after val).
Prints one JSON line.

Engines: `peer` = a cnn_peers folder (step.onnx on plain onnxruntime, numpy AdamW with the head at
its own rate, or GaLore), `torch` = cnn_torch.py (the only engine that imports torch), `bundle` = a TaskEdge bundle run by the runtime's Trainer exactly as
on the board (one rate for delta and head), with the scenario's head values when it has them.
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .worker import load_npz, save_npz


class HostOptimizer:
    """The runtime's numpy AdamW (or GaLore for the galore family) over named arrays, updated in
    place; the head (names `head`) at job["head_lr"] unless the head is all that trains (probe)."""

    def __init__(self, params: dict, head, job: dict, lr: float):
        from taskedge.runtime.optim import AdamW
        self.params, head = params, set(head)
        self.lrs = {n: (job["head_lr"] if n in head and job["family"] != "probe" else lr) for n in params}
        if job["family"] == "galore":
            from .galore import GaLoreAdamW
            self.galore = GaLoreAdamW(params, job["rank"], dense=head)
        else:
            self.galore, self.adamw, self.t = None, AdamW(), 0
            self.m = {n: np.zeros_like(a) for n, a in params.items()}
            self.v = {n: np.zeros_like(a) for n, a in params.items()}

    def step(self, grads: dict, scale: float) -> None:
        lrs = {n: lr * scale for n, lr in self.lrs.items()}
        if self.galore is not None:
            return self.galore.step(self.params, grads, lrs)
        self.t += 1
        for rate in sorted(set(lrs.values())):           # one AdamW call per learning rate group
            group = [n for n in self.params if lrs[n] == rate]
            self.adamw.step({n: self.params[n] for n in group}, grads, self.m, self.v, self.t, rate)


class PeerEngine:
    def __init__(self, job: dict, lr: float):
        from taskedge.runtime.trainer import open_session
        folder = Path(job["artifacts"])
        self.info = json.loads((folder / "peer.json").read_text())
        self.session = open_session(folder / "step.onnx", job["threads"])
        self.eval_path, self.threads, self._eval = folder / "eval.onnx", job["threads"], None
        self.opt = HostOptimizer(load_npz(folder / "init.npz"), self.info["head"], job, lr)
        self.params = self.opt.params

    def step(self, batch, scale: float) -> float:
        out = self.session.run(None, {"pixels": batch[0], "labels": batch[1], **self.params})
        self.opt.step(dict(zip(self.info["trainable"], out[2:])), scale)
        return float(out[0])

    def logits(self, pixels, labels):
        from taskedge.runtime.trainer import open_session
        if self._eval is None:
            self._eval = open_session(self.eval_path, self.threads)
        return self._eval.run(None, {"pixels": pixels, "labels": labels, **self.params})[1]

    def update(self) -> dict:
        return dict(self.params)


class BundleEngine:
    def __init__(self, job: dict, lr: float):
        from taskedge.runtime import bundle as B
        from taskedge.runtime.trainer import Trainer, TrainState
        folder = Path(job["artifacts"])
        man = B.load_bundle(folder)
        state = TrainState.initial(folder, man)
        if job.get("head_init"):
            from taskedge.export.head import HEAD_BIAS, HEAD_WEIGHT
            h = load_npz(job["head_init"])
            state.params[HEAD_WEIGHT] = h["weight"].reshape(state.params[HEAD_WEIGHT].shape).copy()
            state.params[HEAD_BIAS] = h["bias"].reshape(state.params[HEAD_BIAS].shape).copy()
        self.trainer = Trainer(folder, man, state, threads=job["threads"])
        self.base_lr, self.folder = lr, folder
        if job.get("own_head_lr"):          # the head at the peers' head rate, the delta at `lr`
            self.trainer._lr_groups = self._two_rates(job["head_lr"])

    def _two_rates(self, head_lr: float):
        from taskedge.export.head import HEAD_BIAS, HEAD_WEIGHT
        params = self.trainer.state.params
        head = {n: a for n, a in params.items() if n in (HEAD_WEIGHT, HEAD_BIAS)}
        delta = {n: a for n, a in params.items() if n not in head}
        return lambda: [(delta, self.trainer.lr), (head, head_lr * self.trainer.lr / self.base_lr)]

    def step(self, batch, scale: float) -> float:
        loss = self.trainer.train_step(batch)[0]
        self.trainer.lr = self.base_lr * scale
        self.trainer.optimizer_step()
        return loss

    def logits(self, pixels, labels):
        return self.trainer.eval_step([pixels, labels])[1]

    def update(self) -> dict:
        return dict(self.trainer.state.params)


def accuracy(engine, data: dict, batch: int = 100) -> float:
    hits = 0
    for i in range(0, len(data["labels"]), batch):
        x, y = data["pixels"][i:i + batch], data["labels"][i:i + batch]
        hits += int((engine.logits(x, y).argmax(-1) == y).sum())
    return hits / len(data["labels"])


def train(job: dict, lr: float, train_set: dict):
    """A fresh engine trained `steps` steps at `lr`; (engine, step seconds, losses)."""
    from taskedge.runtime.train.schedule import batch_indices, lr_at
    if job["engine"] == "torch":
        from .cnn_torch import TorchCNNEngine as cls
    else:
        cls = BundleEngine if job["engine"] == "bundle" else PeerEngine
    engine = cls(job, lr)
    times, losses, n = [], [], len(train_set["labels"])
    for step in range(job["steps"]):
        idx = batch_indices(step, n, job["batch"], job["seed"])
        batch = [train_set["pixels"][idx], train_set["labels"][idx]]
        scale = lr_at(step, job["steps"], 1.0, "constant", job["warmup"])
        t0 = time.perf_counter()
        losses.append(engine.step(batch, scale))
        times.append(time.perf_counter() - t0)
    return engine, times, losses


LADDER = sorted(float(f"{a}e{k}") for k in range(-7, 1) for a in (1, 3))       # 1e-7, 3e-7, ..., 1, 3


def beyond_edge(grid, best: float):
    """The next rate of the 1-3-10 ladder past the grid's edge when the best rate sits on it (the
    sweep is extended once, so a grid that starts too low or too high does not decide), else None."""
    i = min(range(len(LADDER)), key=lambda j: abs(np.log(LADDER[j] / best)))
    if best == max(grid) and i + 1 < len(LADDER):
        return LADDER[i + 1]
    if best == min(grid) and i > 0:
        return LADDER[i - 1]
    return None


def _sweep_point(job: dict, lr: float, data: dict, sampler):
    """Train a fresh engine at `lr`; (engine, its sweep record: val/test accuracy, step time, peaks)."""
    sampler.reset()
    t0 = time.perf_counter()
    engine, times, losses = train(job, lr, data["train"])
    t1, train_peak = time.perf_counter(), sampler.peak_mb()
    finite, size = bool(np.isfinite(losses).all()), job["batch"]
    row = {"lr": lr, "val": accuracy(engine, data["val"], size) if finite else 0.0,
           "test": accuracy(engine, data["test"], size) if finite else 0.0,
           "loss_last5": float(np.mean(losses[-5:])), "step_ms": round(1000 * statistics.median(times[job["skip"]:]), 2),
           "train_s": round(t1 - t0, 2), "eval_s": round(time.perf_counter() - t1, 2),
           "train_peak_mb": round(train_peak, 1), "eval_peak_mb": round(sampler.peak_mb(), 1)}
    return engine, row


def run_job(job: dict) -> dict:
    import taskedge.runtime.ort  # noqa: F401  (onnxruntime without the torch probe)
    from taskedge.runtime.telemetry import MemorySampler
    sampler = MemorySampler(interval_ms=5).start()
    data = {k: load_npz(job[k]) for k in ("train", "val", "test")}
    sweep, best, flops, lrs = [], None, None, list(job["lrs"])
    for lr in lrs:              # grows by one rate when the grid's best is at its edge (beyond_edge)
        engine, row = _sweep_point(job, lr, data, sampler)
        sweep.append(row)
        if best is None or row["val"] > best[0]["val"]:
            upd = Path(job["workdir"]) / f"update-{job['name']}.npz"
            update = engine.update()
            best = (row, save_npz(upd, update), int(sum(a.size for a in update.values())))
            if job["engine"] == "torch":
                flops = engine.flops([data["train"][k][:job["batch"]] for k in ("pixels", "labels")])
        del engine
        gc.collect()
        if len(sweep) == len(job["lrs"]) > 2 and beyond_edge(job["lrs"], best[0]["lr"]):
            lrs.append(beyond_edge(job["lrs"], best[0]["lr"]))
    sampler.stop()
    row, update_bytes, trainable = best
    if job["engine"] == "bundle":            # the allocation ships with the delta
        update_bytes += (Path(job["artifacts"]) / "allocation.npz").stat().st_size
    return {"name": job["name"], "lr": row["lr"], "accuracy": row["test"], "val_accuracy": row["val"],
            "step_ms": row["step_ms"], "trainable_params": trainable, "peak_rss_mb": sweep[0]["train_peak_mb"],
            "peak_sweep_max_mb": max(s["train_peak_mb"] for s in sweep), "update_bytes": int(update_bytes),
            "sweep": sweep, "torch_imported": "torch" in sys.modules, **({"flops": flops} if flops else {})}


def cnn_worker_main(job_path: str) -> int:
    print(json.dumps(run_job(json.loads(Path(job_path).read_text()))), flush=True)
    return 0
