"""The learning-rate trial used when `adapt` gets no --lr: it picks the rate whose short trial
ends with the lowest held-out loss, never a diverging one, and leaves the trainer as it was."""
from __future__ import annotations

import numpy as np

from conftest import open_trainer
from taskedge.runtime.lr_range import pick_lr


def test_pick_lr_prefers_the_best_trial_and_restores_the_state(mlp_bundle, mlp_data):
    z = np.load(mlp_data / "train.npz")
    x, y = z["x"], z["labels"]
    trainer = open_trainer(mlp_bundle)
    before = {k: a.copy() for k, a in trainer.state.params.items()}
    held_out = [[x[:64], y[:64]]]
    batches = lambda s: [[x[64 + 32 * (s % 10):][:32], y[64 + 32 * (s % 10):][:32]]]   # noqa: E731
    lr, table = pick_lr(trainer, batches, held_out, steps=8, candidates=(1e-4, 1e-2, 1e6))
    trials = {row["lr"]: row["held_out_loss"] for row in table[1:]}
    assert table[0]["lr"] is None and np.isfinite(table[0]["held_out_loss"])        # the starting loss
    assert trials[1e6] > trials[1e-2] or not np.isfinite(trials[1e6])               # lr 1e6 wrecks the model
    assert lr == min(trials, key=trials.get) == 1e-2, trials
    assert trials[1e-2] < table[0]["held_out_loss"]
    assert all(np.array_equal(before[k], trainer.state.params[k]) for k in before)  # trials leave no trace
    assert trainer.state.updates == 0


def test_adapt_without_lr_runs_the_trials_and_resume_keeps_the_pick(tmp_path, mlp_onnx, mlp_data):
    import json
    from conftest import run_cli
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    export_bundle(ExportConfig(model=str(mlp_onnx), out=str(tmp_path / "b"), calib=str(mlp_data / "train.npz"),
                               budget=0.05, num_classes=3), log=lambda m: None)      # no --lr stored
    r = run_cli("adapt", tmp_path / "b", "--data", mlp_data / "train.npz", "--steps", 6, "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    lr = json.loads(r.stdout)["lr"]
    assert lr["chosen_by"] == "trial" and lr["peak"] in (1e-3, 3e-3, 1e-2, 3e-2)
    assert [t["lr"] for t in lr["trials"]] == [None, 1e-3, 3e-3, 1e-2, 3e-2]
    best = min(lr["trials"][1:], key=lambda t: t["held_out_loss"])
    assert best["lr"] == lr["peak"]
    r = run_cli("adapt", tmp_path / "b", "--resume", "--steps", 8, "--quiet", "--json")
    again = json.loads(r.stdout)["lr"]
    assert r.returncode == 0 and again == {"peak": lr["peak"], "chosen_by": "the interrupted run"}
