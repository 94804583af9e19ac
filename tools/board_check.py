"""Fixtures for the board-side test suite (tests/board), made on the host.

    python -m taskedge.tools.board_check OUT [--steps 50]

exports bundles with ORT's own training artifacts beside them (`ExportConfig.ort_reference`), and runs ORT-training's path on them for
`--steps` steps with exactly the schedule, data order and batch `taskedge adapt` uses: the loss
curve the board's standard-ONNX step graph must reproduce. Writes OUT/board.json.

The tasks: the text (MiniLM) and vision (MobileNetV2) demos, and three models small enough for
an aarch64 emulator (a digits MLP, conv net and transformer block, `SMALL`).
tests/board then runs in a venv that holds only plain onnxruntime, numpy and psutil (.ci/board.sh,
and .ci/arm64.sh on an emulated aarch64 board).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

TASKS = {
    "text": dict(factory="taskedge.tools.demo_models:minilm_sentiment", data="text", classes=2, budget=0.001,
                 lr=0.01, batch=16, n_train=400, n_test=200),
    "vision": dict(factory="taskedge.tools.demo_models:mobilenet_v2_digits", data="imagenet", classes=10,
                   budget=0.01, lr=0.003, batch=16, n_test=200),
    **{kind: dict(factory=f"taskedge.tools.demo_models:digits_{kind}", data="shift", classes=5, budget=0.05,
                  lr=0.01, batch=16, n_test=200) for kind in ("mlp", "cnn", "transformer")},
}
SMALL = ("mlp", "cnn", "transformer")
SEED, WARMUP, SCHEDULE = 0, 10, "cosine"


def _log(msg: str) -> None:
    print(f"[board-check] {msg}", file=sys.stderr, flush=True)


def reference_losses(folder: Path, train: dict, names: list, steps: int, batch: int, lr: float,
                     nudge: float = 0.0) -> list:
    """ORT-training (tools/ort_training.py) on its own artifacts, with adapt's start (the new head at
    zero: runtime TrainState.fresh), schedule and data order. `nudge`: add it to the head's weights
    first (1e-7 is about one float32 ulp of 1): how far the reference itself moves from a
    rounding-sized change tells how chaotic the run is."""
    import taskedge.runtime.ort  # noqa: F401  (onnxruntime without the torch probe, before tools.ort_training)
    from taskedge.export.head import HEAD_BIAS, HEAD_WEIGHT
    from taskedge.runtime.adapt import batch_indices, lr_at
    from taskedge.tools.ort_training import open_artifacts

    ck, trainer = open_artifacts(folder)
    for name, value in ((HEAD_WEIGHT, nudge), (HEAD_BIAS, 0.0)):
        ck.set(name, np.full_like(ck.get(name), value, dtype=np.float32))
    losses = []
    n = len(train["labels"])
    for step in range(steps):
        idx = batch_indices(step, n, batch, SEED)
        losses.append(float(trainer.train_step([train[k][idx] for k in names + ["labels"]])[0]))
        trainer.lr = lr_at(step, steps, lr, SCHEDULE, WARMUP)
        trainer.optimizer_step()
    return losses


def prepare(out: Path, steps: int, tasks=tuple(TASKS)) -> dict:
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    from taskedge.tools import demo_data as D

    out.mkdir(parents=True, exist_ok=True)
    info = {"steps": steps, "seed": SEED, "warmup": WARMUP, "schedule": SCHEDULE, "tasks": {}}
    for task in tasks:
        cfg = TASKS[task]
        t0 = time.perf_counter()
        d = D.text_sentiment(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=SEED) if cfg["data"] == "text" \
            else D.vision_digits(cfg["data"], seed=SEED)
        if cfg.get("n_test"):
            d["test"] = {k: a[: cfg["n_test"]] for k, a in d["test"].items()}
        folder = out / task
        folder.mkdir(exist_ok=True)
        D.write_npz(folder / "train.npz", d["train"])
        D.write_npz(folder / "test.npz", d["test"])
        man = export_bundle(ExportConfig(model=cfg["factory"], out=str(folder / "bundle"),
                                         calib=str(folder / "train.npz"), budget=cfg["budget"],
                                         num_classes=cfg["classes"], seed=SEED,
                                         ort_reference=str(folder / "ort_reference")), log=lambda m: None)
        names = [s.name for s in man.inputs]
        losses = reference_losses(folder / "ort_reference", d["train"], names, steps, cfg["batch"], cfg["lr"])
        nudged = reference_losses(folder / "ort_reference", d["train"], names, steps, cfg["batch"], cfg["lr"], 1e-7)
        info["tasks"][task] = {"lr": cfg["lr"], "batch": cfg["batch"], "reference_losses": losses,
                               "reference_ulp_sensitivity": float(np.abs(np.subtract(losses, nudged)).max()),
                               "weights_bytes": man.files["weights.bin"]["bytes"]}
        _log(f"{task}: bundle + ORT-training reference ({steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
             f"a 1-ulp nudge of the head moves it by {info['tasks'][task]['reference_ulp_sensitivity']:.2e}) "
             f"in {time.perf_counter() - t0:.0f}s")
    (out / "board.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m taskedge.tools.board_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for the bundles, data and board.json")
    p.add_argument("--steps", type=int, default=50, help="steps of the reference loss curve (default 50)")
    p.add_argument("--task", action="append", choices=sorted(TASKS), help="only these tasks (default: all)")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps {a.steps}: must be >= 1")
    prepare(Path(a.out), a.steps, tuple(a.task or TASKS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
