"""Cases 2-3 — torn/corrupted files are detected and named; divergence rolls back, lowers the
learning rate, goes on, and stops with a clear report after 3 tries."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from taskedge.runtime import bundle as B

from .conftest import (adapt_args, adapt_ok, committed_checkpoints_load, flip_byte, load_update, one_line_error,
                       run, same_update, temp_files, truncate)

# constant schedule: the lr of a step does not depend on --steps, so a 20-step run resumed to 30 steps
# must equal a 30-step run bit for bit
COMMON = ("--checkpoint-every", "5", "--seed", "1", "--lr", "0.01", "--schedule", "constant", "--warmup", "0")


@pytest.fixture(scope="module")
def ref30(mlp_bundle, mlp_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref30") / "run"
    adapt_ok(mlp_bundle, mlp_data / "train.npz", d, "--steps", "30", *COMMON)
    return load_update(d)


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped", "record-torn", "both-newest-bad"])
def test_corrupted_checkpoint_falls_back(mlp_bundle, mlp_data, tmp_path, ref30, record, damage):
    data, d = mlp_data / "train.npz", tmp_path / "run"
    adapt_ok(mlp_bundle, data, d, "--steps", "20", *COMMON)           # leaves ckpt 15 and 20
    bad = [d / "ckpt-00000020"]
    if damage == "truncated":
        truncate(bad[0])
    elif damage == "bit-flipped":
        flip_byte(bad[0])
    elif damage == "record-torn":
        truncate(d / "ckpt-00000020.json", 0.3)
    else:
        truncate(bad[0]), flip_byte(d / "ckpt-00000015")
    rep, err = adapt_ok(mlp_bundle, data, d, "--steps", "30", *COMMON, "--resume")
    skipped = " ".join(rep["resume"]["skipped_bad_checkpoints"])
    named = "ckpt-00000020" in skipped and (damage != "both-newest-bad" or "ckpt-00000015" in skipped)
    want_from = None if damage == "both-newest-bad" else str(d / "ckpt-00000015")
    identical = same_update(load_update(d), ref30)
    steps = committed_checkpoints_load(d)
    record(f"checkpoint {damage}", "detected, named, fall back to newest good, keep last 2",
           f"named={named}; resumed from {rep['resume']['from'] and rep['resume']['from'].split('/')[-1]}; "
           f"kept {sorted(steps)}; final {'bit-identical' if identical else 'DIFFERENT'}",
           "none" if identical else "UPDATE DIFFERS")
    assert named, skipped
    assert rep["resume"]["from"] == want_from and rep["resume"]["skipped_bad_checkpoints"]
    assert identical and sorted(steps) == [25, 30] and not temp_files(d)


@pytest.mark.parametrize("name", [B.STEP_MODEL, B.WEIGHTS, B.INITIAL_STATE, B.ALLOCATION, B.MANIFEST])
@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_corrupted_bundle_file_is_named(mlp_bundle, mlp_data, tmp_path, record, name, damage):
    b = tmp_path / "b"
    shutil.copytree(mlp_bundle, b)
    if name == B.MANIFEST and damage == "bit-flipped":
        # a flip that keeps valid JSON: only the manifest's self-checksum can see it
        text, n = re.subn(r'"num_classes":\s*3\b', '"num_classes": 7', (b / name).read_text())
        assert n == 1, "the fixture's manifest no longer names num_classes 3"
        (b / name).write_text(text)
    else:
        (truncate if damage == "truncated" else flip_byte)(b / name)
    r = run(*adapt_args(b, mlp_data / "train.npz", tmp_path / "run", "--steps", "3"))
    line = one_line_error(r, name)
    record(f"bundle {name} {damage}", "exit 2, file named", _short(line))


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_corrupted_data_shard_is_named(mlp_bundle, mlp_data, tmp_path, record, damage):
    f = tmp_path / "train.npz"
    shutil.copy(mlp_data / "train.npz", f)
    (truncate if damage == "truncated" else flip_byte)(f)
    r = run(*adapt_args(mlp_bundle, f, tmp_path / "run", "--steps", "3"))
    line = one_line_error(r, "train.npz")
    record(f"data shard {damage}", "exit 2, file named", _short(line))


def test_random_manifest_flips_all_detected(mlp_bundle, tmp_path, record):
    from taskedge.runtime.bundle import BundleError, load_bundle
    b = tmp_path / "b"
    shutil.copytree(mlp_bundle, b)
    raw = (b / B.MANIFEST).read_bytes()
    rng = np.random.default_rng(0)
    missed = []
    for pos in rng.integers(0, len(raw), 40):
        bad = bytearray(raw)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        (b / B.MANIFEST).write_bytes(bytes(bad))
        try:
            load_bundle(b)
            missed.append(int(pos))
        except BundleError as e:
            assert "manifest" in str(e), e
    record("manifest: 40 random single-bit flips", "all detected (JSON, schema or self-checksum)",
           f"{40 - len(missed)}/40 detected")
    assert not missed, f"bit flips at bytes {missed} loaded without an error"


def _short(line):
    msg = line.split("error: ")[-1]
    return msg.replace(msg.split(":")[0], msg.split(":")[0].split("/")[-1], 1)[:90]


# -- divergence ------------------------------------------------------------------------------

def test_transient_nan_rolls_back_lowers_lr_and_goes_on(mlp_bundle, mlp_data, tmp_path, record):
    rep, err = adapt_ok(mlp_bundle, mlp_data / "train.npz", tmp_path / "run", "--steps", "30", *COMMON,
                        env={"TASKEDGE_FAULT_NAN_AT_STEP": "12"})
    dv = rep["divergences"]
    record("divergence: one NaN loss at step 12", "roll back to ckpt 10, lr x0.5, finish",
           f"stop={rep['stop_reason']} steps={rep['steps']} rollbacks={len(dv)} lr_scale={rep['lr_scale']}")
    assert rep["stop_reason"] == "steps" and rep["steps"] == 30
    assert len(dv) == 1 and dv[0]["step"] == 12 and rep["lr_scale"] == 0.5
    assert all(np.isfinite(v).all() for v in load_update(tmp_path / "run").values())


def test_lr_1e6_diverges_3_times_then_stops_at_last_good_state(mlp_bundle, mlp_data, tmp_path, record):
    d = tmp_path / "run"
    adapt_ok(mlp_bundle, mlp_data / "train.npz", d, "--steps", "20", *COMMON)
    good = load_update(d)
    rep, err = adapt_ok(mlp_bundle, mlp_data / "train.npz", d, "--steps", "40", "--checkpoint-every", "5",
                        "--seed", "1", "--lr", "1e6", "--schedule", "constant", "--warmup", "0", "--resume")
    kept = same_update(load_update(d), good)
    record("divergence: --lr 1e6", "3 rollbacks, then stop with a report at the last good state",
           f"stop={rep['stop_reason']} rollbacks={len(rep['divergences']) - 1} step={rep['steps']}; "
           f"update {'= ckpt 20' if kept else 'CHANGED'}", "none" if kept else "GOOD STATE LOST")
    assert rep["stop_reason"] == "diverged" and len(rep["divergences"]) == 4 and rep["steps"] == 20
    assert "lower --lr" in rep["stop_message"] and "diverged 4 times" in rep["stop_message"]
    assert kept and committed_checkpoints_load(d)


def test_inf_in_update_rolls_back(mlp_bundle, mlp_data, tmp_path, monkeypatch, record):
    """In-process: the optimizer step leaves an Inf in the update once (finite loss)."""
    from taskedge.runtime import adapt as A
    from taskedge.runtime.train.session import Session
    from taskedge.runtime.trainer import Trainer
    orig, fired, sessions = Trainer.optimizer_step, [], []

    def bad_step(self):
        orig(self)
        if not fired and sessions and sessions[0].state.step == 7:
            fired.append(1)
            n = sessions[0].manifest.trainable_names[0]
            self.state.params[n].flat[0] = np.inf
    monkeypatch.setattr(Trainer, "optimizer_step", bad_step)
    orig_run = Session.run

    def run_(self):
        sessions.append(self)
        return orig_run(self)
    monkeypatch.setattr(Session, "run", run_)
    rep = A.adapt(mlp_bundle, A.AdaptOptions(data=str(mlp_data / "train.npz"), steps=15, checkpoint_every=5,
                                             lr=0.01, run_dir=str(tmp_path / "run"), quiet=True))
    dv = rep["divergences"]
    record("divergence: Inf in the update at step 7", "roll back to ckpt 5, lr x0.5, finish",
           f"stop={rep['stop_reason']} rollbacks={len(dv)} ({dv[0]['why'] if dv else '-'})")
    assert fired and len(dv) == 1 and "update" in dv[0]["why"] and rep["steps"] == 15
    assert rep["stop_reason"] == "steps" and rep["lr_scale"] == 0.5


@pytest.fixture(scope="module")
def overflow_data(mlp_data, tmp_path_factory):
    with np.load(mlp_data / "train.npz") as z:
        x, y = z["x"].copy(), z["labels"].copy()
    x[7] = 3e38                                    # finite in float32, overflows in the first layer
    f = tmp_path_factory.mktemp("ovf") / "overflow.npz"
    np.savez(f, x=x, labels=y)
    return f


def test_overflowing_record_is_named_after_3_tries(mlp_bundle, overflow_data, tmp_path, record):
    rep, err = adapt_ok(mlp_bundle, overflow_data, tmp_path / "run", "--steps", "20", *COMMON)
    record("divergence: finite record that overflows", "3 rollbacks, stop, report names the record",
           f"stop={rep['stop_reason']}; names {rep['stop_message'].split('non-finite on their own: ')[-1].split('/')[-1][:40]}")
    assert rep["stop_reason"] == "diverged" and "overflow.npz: record 7" in rep["stop_message"]


def test_overflowing_record_skipped_with_skip_bad(mlp_bundle, overflow_data, tmp_path, record):
    rep, err = adapt_ok(mlp_bundle, overflow_data, tmp_path / "run", "--steps", "20", *COMMON, "--skip-bad")
    record("divergence: overflowing record + --skip-bad", "record dropped and counted, run finishes",
           f"stop={rep['stop_reason']} steps={rep['steps']} excluded={rep['excluded_records']}")
    assert rep["stop_reason"] == "steps" and rep["steps"] == 20 and rep["excluded_records"] == 1
    # resuming replays the same exclusion
    rep2, _ = adapt_ok(mlp_bundle, overflow_data, tmp_path / "run", "--steps", "25", *COMMON, "--skip-bad",
                       "--resume")
    assert rep2["excluded_records"] == 1 and rep2["steps"] == 25
