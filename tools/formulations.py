"""Measure the update formulations side by side (the numbers behind updates.DEFAULT_FORMULATION).

    python -m taskedge.tools.formulations [--model mlp|minilm|cnn] [--batch 64] [--steps 20]

Exports the same model once per formulation and times step-graph steps on plain onnxruntime (forward,
backward, AdamW) in one process, interleaved round-robin so machine noise hits all alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (label, formulation, sparse backward); "scatter-dense" is scatter with ORT's own weight gradient
FORMS = [("gather", "gather", True), ("gather_rows", "gather_rows", True),
         ("gather_elements", "gather_elements", True), ("scatter-dense", "scatter", False),
         ("scatter", "scatter", True)]


def _mlp(tmp: Path, batch: int):
    import torch
    torch.manual_seed(0)
    layers = []
    for _ in range(8):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(1024, 10))
    path = tmp / "mlp.onnx"
    torch.onnx.export(net, (torch.randn(2, 1024),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * 4, 1024)).astype(np.float32)
    np.savez(tmp / "d.npz", x=x, labels=rng.integers(0, 10, len(x)))
    return str(path), {"x": x}, ["Gemm"], 0.001


def _minilm(tmp: Path, batch: int):
    from taskedge.tools import demo_data
    d = demo_data.text_sentiment(n_train=batch * 4, n_test=10, seed=0)
    demo_data.write_npz(tmp / "d.npz", d["train"])
    return "taskedge.tools.demo_models:minilm_sentiment", d["train"], ["MatMul"], 0.001


def measure(model: str, batch: int, steps: int) -> list:
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    from taskedge.runtime import bundle as B
    from taskedge.runtime.trainer import Trainer, TrainState

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        src, arrays, ops, budget = {"mlp": _mlp, "minilm": _minilm}[model](tmp, batch)
        trainers = {}
        for label, form, sparse in FORMS:
            out = tmp / label
            export_bundle(ExportConfig(model=src, out=str(out), calib=str(tmp / "d.npz"), budget=budget,
                                       num_classes=2 if model == "minilm" else 10, dense_backward=not sparse,
                                       formulation={op: form for op in ops}), log=lambda m: None)
            man = B.load_bundle(out)
            trainers[label] = Trainer(out, man, TrainState.initial(out, man))
        names = [n for n in arrays if n != "labels"]
        feed = [arrays[n][:batch] for n in names] + [np.zeros(batch, np.int64)]
        times = {label: [] for label in trainers}
        for i in range(steps + 3):
            for label, tr in trainers.items():
                t0 = time.perf_counter()
                tr.train_step(feed)
                tr.optimizer_step()
                if i >= 3:
                    times[label].append(time.perf_counter() - t0)
        return [{"formulation": f, "median_ms": round(1000 * statistics.median(v), 2)} for f, v in times.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mlp", "minilm"], default="mlp")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = measure(a.model, a.batch, a.steps)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        base = rows[-1]["median_ms"]
        print(f"{a.model}, batch {a.batch}, median of {a.steps} step-graph steps on plain onnxruntime "
              "(fwd+bwd+AdamW):")
        for r in rows:
            print(f"  {r['formulation']:16s} {r['median_ms']:8.2f} ms  ({r['median_ms'] / base:.2f}x scatter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
