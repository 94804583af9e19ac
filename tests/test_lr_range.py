"""The learning-rate trials used when `adapt` gets no --lr: each trial is the planned run squeezed into a
quarter of its steps (12 to 30), the walk along the grid moves towards the lower held-out loss and stops
where it rises, never at a diverging rate, and the trials leave the trainer as it was."""
from __future__ import annotations

import numpy as np

from conftest import open_trainer
from taskedge.runtime import lr_range
from taskedge.runtime.lr_range import pick_lr


def _setup(mlp_bundle, mlp_data):
    z = np.load(mlp_data / "train.npz")
    x, y = z["x"], z["labels"]
    held_out = [[x[:64], y[:64]]]
    batches = lambda s: [[x[64 + 32 * (s % 10):][:32], y[64 + 32 * (s % 10):][:32]]]   # noqa: E731
    return open_trainer(mlp_bundle), batches, held_out


def test_the_walk_climbs_to_the_best_rate_and_restores_the_state(mlp_bundle, mlp_data):
    trainer, batches, held_out = _setup(mlp_bundle, mlp_data)
    before = {k: a.copy() for k, a in trainer.state.params.items()}
    lr, table = pick_lr(trainer, batches, held_out, steps=8, candidates=(1e-4, 1e-2, 1e6), start=0)
    trials = {row["lr"]: row["held_out_loss"] for row in table[1:]}
    assert table[0]["lr"] is None and np.isfinite(table[0]["held_out_loss"])        # the starting loss
    assert [row["lr"] for row in table[1:]] == [1e-4, 1e-2, 1e6]                    # up while the loss falls
    assert trials[1e6] > trials[1e-2] or not np.isfinite(trials[1e6])               # lr 1e6 wrecks the model
    assert lr == min(trials, key=trials.get) == 1e-2, trials
    assert trials[1e-2] < table[0]["held_out_loss"]
    assert all(np.array_equal(before[k], trainer.state.params[k]) for k in before)  # trials leave no trace
    assert trainer.state.updates == 0


def test_the_walk_turns_down_and_stops_where_the_loss_rises(mlp_bundle, mlp_data):
    trainer, batches, held_out = _setup(mlp_bundle, mlp_data)
    grid = (1e-7, 1e-6, 1e-2, 1e6)
    lr, table = pick_lr(trainer, batches, held_out, steps=8, candidates=grid, start=2)
    # 1e6 is worse than 1e-2, so the walk goes down; 1e-6 barely moves the model, so it stops there
    assert [row["lr"] for row in table[1:]] == [1e-2, 1e6, 1e-6], table
    assert lr == 1e-2


def test_a_trial_is_the_run_squeezed_the_decay_included(mlp_bundle, mlp_data):
    assert [lr_range.trial_steps(n) for n in (6, 40, 63, 100, 200, 1000, None)] == [12, 12, 16, 25, 30, 30, 30]
    assert [lr_range.trial_warmup(25, n, 10) for n in (100, 200, 6, None)] == [2, 1, 25, 6]
    trainer, batches, held_out = _setup(mlp_bundle, mlp_data)
    # the same rate, with and without the run's decay: the trial follows the schedule it is given
    _, cosine = pick_lr(trainer, batches, held_out, steps=8, candidates=(0.3,), start=0, schedule="cosine")
    _, constant = pick_lr(trainer, batches, held_out, steps=8, candidates=(0.3,), start=0, schedule="constant")
    assert cosine[1]["held_out_loss"] != constant[1]["held_out_loss"]


def test_adapt_without_lr_runs_the_trials_and_resume_keeps_the_pick(tmp_path, mlp_onnx, mlp_data):
    import json
    from conftest import run_cli
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    export_bundle(ExportConfig(model=str(mlp_onnx), out=str(tmp_path / "b"), calib=str(mlp_data / "train.npz"),
                               budget=0.05, num_classes=3), log=lambda m: None)      # no --lr stored
    r = run_cli("adapt", tmp_path / "b", "--data", mlp_data / "train.npz", "--steps", 6, "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    lr = rep["lr"]
    # the new head starts at zero: every logit 0, so the first step's loss is ln 3 whatever the deltas
    assert rep["trainable"]["head_start"] == "zero" and abs(rep["loss"]["first"] - np.log(3)) < 1e-5
    assert lr["chosen_by"] == "trial" and lr["peak"] in lr_range.CANDIDATES and lr["trial_steps"] == 12
    tried = [t["lr"] for t in lr["trials"]]
    assert tried[:3] == [None, lr_range.CANDIDATES[lr_range.START], lr_range.CANDIDATES[lr_range.START + 1]]
    best = min(lr["trials"][1:], key=lambda t: t["held_out_loss"])
    assert best["lr"] == lr["peak"]
    r = run_cli("adapt", tmp_path / "b", "--resume", "--steps", 8, "--quiet", "--json")
    again = json.loads(r.stdout)
    assert r.returncode == 0 and again["lr"] == {"peak": lr["peak"], "chosen_by": "the interrupted run"}
    assert again["trainable"]["head_start"] == "checkpoint"
