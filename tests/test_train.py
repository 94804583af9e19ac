"""runtime/train/: the schedule is what its docstrings say; RunState IS the checkpoint record (every
field saved and restored, the keys of checkpoints written before RunState existed still load); a
resumed run ends in exactly the state of an uninterrupted one (every field exercised: step-down,
rollback, dropped record, periodic eval)."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import run_cli
from taskedge.runtime.options import AdaptOptions
from taskedge.runtime.train.schedule import batch_indices, lr_at, planned_steps
from taskedge.runtime.train.state import RunState

# one value per field, none of them the default: a field added to RunState must be added here
SAMPLE = {"flags": {"data": "/d/train.npz", "records": 360, "steps": 30}, "step": 15,
          "plan": {"micro_batch": 4, "effective_batch": 32, "accumulation": 8, "forced": True},
          "lr_scale": 0.25, "energy_j": 1.5, "seconds": 0.75, "losses": [1.1, 0.9], "evals": [[5, 0.5]],
          "accuracy_before": 0.3, "stepdowns": [{"step": 3, "why": "SIGUSR1 received", "micro_batch": 4}],
          "divergences": [{"step": 12, "why": "loss is nan", "lr_scale": 0.5}], "excluded": [108], "seed": 7}

# the "state" of a commit record written by the code before RunState (8a5271b, runtime/adapt.py's
# Session.snapshot), losses shortened, paths renamed: checkpoints in the field look like this
OLD_RECORD = json.loads(
    '{"flags": {"data": "/home/user/data/overflow.npz", "eval_data": null, "records": 360, "steps": 15, "epochs": null, '
    '"lr": 0.01, "schedule": "constant", "warmup": 0, "seed": 1, "batch_size": 32, "skip_bad": true, "profile": '
    '"host-cpu", "power_mode": null}, "step": 15, "plan": {"micro_batch": 4, "effective_batch": 32, "accumulation": 4, '
    '"forced": true}, "lr_scale": 1.0, "energy_j": 1.4375745531786015, "seconds": 0.07769794600062596, "losses": '
    '[1.075994, 1.133842, 1.100231], "evals": [[5, 0.525], [10, 0.675], [15, 0.75]], "accuracy_before": 0.275, '
    '"stepdowns": [{"step": 3, "why": "allocation failed at step 3 (test-only fault hook '
    'TASKEDGE_FAULT_ALLOC_FAIL_AT_STEP)", "micro_batch": 4}], "divergences": [{"step": 1, "why": "loss is nan", '
    '"lr_scale": 1.0, "bad_records": ["/home/user/data/overflow.npz: record 7"], "excluded": 1}], "excluded": [108], '
    '"seed": 1}')


def test_schedule_warmup_decay_and_data_order():
    assert [lr_at(s, 100, 1.0, "cosine", 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(52, 100, 1.0, "cosine", 4) == pytest.approx(0.5) and lr_at(100, 100, 1.0, "cosine", 4) < 1e-12
    assert lr_at(52, 100, 1.0, "linear", 4) == pytest.approx(0.5) and lr_at(99, 100, 2.0, "constant", 4) == 2.0
    epoch = [batch_indices(s, 10, 4, seed=3) for s in range(3)]            # 4 + 4 + 2 examples
    assert sorted(np.concatenate(epoch)) == list(range(10)) and len(epoch[2]) == 2
    assert not np.array_equal(np.concatenate(epoch), np.concatenate([batch_indices(s, 10, 4, 3) for s in (3, 4, 5)]))
    assert not np.array_equal(batch_indices(0, 10, 4, seed=3), batch_indices(0, 10, 4, seed=4))
    o = AdaptOptions(data="d")
    assert planned_steps(o, 100, 32) == 100                     # one epoch by default, but at least 100 steps
    assert planned_steps(o, 8000, 32) == 250
    assert planned_steps(AdaptOptions(data="d", epochs=2.5), 100, 32) == 10
    assert planned_steps(AdaptOptions(data="d", steps=7, epochs=2), 100, 32) == 7
    assert planned_steps(AdaptOptions(data="d", max_seconds=60), 100, 32) is None


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_every_run_state_field_round_trips_through_the_record():
    names = [f.name for f in dataclasses.fields(RunState)]
    assert sorted(SAMPLE) == sorted(names), "SAMPLE must give every RunState field a value"
    assert all(SAMPLE[f.name] != _default(f) for f in dataclasses.fields(RunState)), "a SAMPLE value is the default"
    record = json.loads(json.dumps(RunState(**SAMPLE).to_record()))        # as the commit record stores it
    assert sorted(record) == sorted(names)
    back = RunState.from_record(record)
    for name in names:
        assert getattr(back, name) == SAMPLE[name], name


def test_checkpoints_of_the_code_before_run_state_load_unchanged():
    assert RunState.from_record(OLD_RECORD).to_record() == OLD_RECORD       # same keys, nothing lost or added
    st = RunState.from_record({"step": 5, "losses": [1.0] * 5, "future_key": 1})   # older (no flags) / newer
    assert st.step == 5 and st.flags is None and st.plan is None and st.excluded == [] and st.lr_scale == 1.0


def test_resumed_run_ends_in_the_state_of_an_uninterrupted_one(tmp_path, mlp_bundle, mlp_data):
    with np.load(mlp_data / "train.npz") as z:
        x, y = z["x"].copy(), z["labels"].copy()
    x[7] = 3e38                                     # overflows: dropped with --skip-bad (excluded, divergences)
    data = tmp_path / "overflow.npz"
    np.savez(data, x=x, labels=y)
    # an allocation failure at step 3 (stepdowns, plan) and a transient NaN at step 12 (lr_scale)
    env = dict(os.environ, TASKEDGE_FAULT_ALLOC_FAIL_AT_STEP="3", TASKEDGE_FAULT_NAN_AT_STEP="12")
    flags = ("--data", data, "--skip-bad", "--micro-batch", "8", "--batch-size", "32", "--eval-every", "5",
             "--checkpoint-every", "5", "--seed", "1", "--lr", "0.01", "--schedule", "constant", "--warmup", "0",
             "--quiet", "--json")

    def adapt(run, *extra):
        r = run_cli("adapt", mlp_bundle, "--run-dir", tmp_path / run, *flags, *extra, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def record(run, step):
        return json.loads((tmp_path / run / f"ckpt-{step:08d}.json").read_text())["state"]

    adapt("straight", "--steps", "30")
    adapt("resumed", "--steps", "15")
    part = record("resumed", 15)
    rep = adapt("resumed", "--steps", "30", "--resume")
    assert rep["resume"]["from"].endswith("ckpt-00000015") and rep["steps_this_run"] == 15
    want, got = record("straight", 30), record("resumed", 30)
    fields = dataclasses.fields(RunState)
    assert sorted(want) == sorted(got) == sorted(f.name for f in fields)
    untouched = [f.name for f in fields if want[f.name] == _default(f)]
    assert not untouched, f"the scenario leaves {untouched} at the default: it would not see them lost"
    for name in want:
        if name in ("energy_j", "seconds"):     # measured: the resumed run's total counts the first part's
            assert got[name] > part[name] > 0, name
        else:
            assert got[name] == want[name], name
    a, b = np.load(tmp_path / "straight" / "update.npz"), np.load(tmp_path / "resumed" / "update.npz")
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k
