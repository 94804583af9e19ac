"""Case 1 — power loss: SIGKILL `taskedge adapt` at random moments (and inside checkpoint writes),
`--resume` each time; the final update is bit-identical to an uninterrupted run and no committed
checkpoint is ever unreadable."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import (adapt_args, adapt_ok, checkpoint_files, cli_cmd, committed_checkpoints_load, kill,
                       load_update, same_update, temp_files, wait_for)

STEPS, EVERY, SEED = 1000, 2, 3      # ~2.3 s of MLP steps on the step graph: kills land mid-run
COMMON = ("--steps", STEPS, "--checkpoint-every", EVERY, "--seed", SEED, "--lr", "0.01")


@pytest.fixture(scope="module")
def reference(mlp_bundle, mlp_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    rep, _ = adapt_ok(mlp_bundle, mlp_data / "train.npz", run_dir, *COMMON)
    assert rep["steps"] == STEPS
    return load_update(run_dir)


def _where(run_dir):
    """What the run was doing when it died, judged from the files it left."""
    d = Path(run_dir)
    if temp_files(d):
        return "in a temp write"
    names = set(checkpoint_files(d))
    if any(n + ".json" not in names for n in names if not n.endswith(".json")):
        return "between checkpoint and commit record"
    return "between checkpoints" if any(n.endswith(".json") for n in names) else "before the first checkpoint"


def _in_write(run_dir):
    d = Path(run_dir)
    if not d.is_dir():
        return False
    if any(p.name.startswith(".ckpt-") and p.name.endswith(".tmp") for p in d.iterdir()):
        return True
    names = set(checkpoint_files(d))
    return any(n + ".json" not in names for n in names if not n.endswith(".json"))


def kill_and_resume(bundle, data, run_dir, kills, rng, in_write_every=0, delay="0.03"):
    """Start/kill/resume until `kills` kills happened, then let it finish. Returns (report, where-list)."""
    env = dict(os.environ)
    seen = []
    n = 0
    while True:
        write_kill = bool(in_write_every) and n < kills and n % in_write_every == in_write_every - 1
        e = dict(env, TASKEDGE_FAULT_DELAY_CKPT=delay) if write_kill else env
        p = subprocess.Popen(cli_cmd(*adapt_args(bundle, data, run_dir, *COMMON, "--resume")), env=e,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if n >= kills:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            import json
            return json.loads(out), seen
        if write_kill:
            wait_for(lambda: _in_write(run_dir) or p.poll() is not None, timeout=60, every=0.002)
        else:
            wait_for(lambda: p.poll() is not None, timeout=rng.uniform(0.3, 2.2))
        if p.poll() is not None:       # finished before we got to kill it: start over in a fresh lap
            p.communicate()
            shutil.rmtree(run_dir, ignore_errors=True)
            continue
        kill(p)
        p.stdout.close(), p.stderr.close()
        n += 1
        seen.append(_where(run_dir))
        # invariant after every kill: every committed checkpoint matches its hash and loads
        committed_checkpoints_load(run_dir)


def _check(run_dir, rep, reference, record, kills, seen, label):
    assert rep["steps"] == STEPS
    got = load_update(run_dir)
    identical = same_update(got, reference)
    leftovers = temp_files(run_dir)
    steps = committed_checkpoints_load(run_dir)
    where = ", ".join(f"{seen.count(w)} {w}" for w in sorted(set(seen)))
    record(f"power loss: {kills} x SIGKILL {label}",
           "resume; update bit-identical; committed ckpts load; no temp files",
           f"{'bit-identical' if identical else 'DIFFERENT'}; kills: {where}; temp left {len(leftovers)}; "
           f"ckpts {sorted(steps)}", "none" if identical else "UPDATE DIFFERS")
    assert identical, "update after kills differs from the uninterrupted run"
    assert not leftovers, leftovers
    assert sorted(steps) == [STEPS - EVERY, STEPS]


def test_power_loss_random_kills(mlp_bundle, mlp_data, tmp_path, reference, record):
    rng = random.Random(6)
    run_dir = tmp_path / "run"
    rep, seen = kill_and_resume(mlp_bundle, mlp_data / "train.npz", run_dir, kills=5, rng=rng, in_write_every=3)
    _check(run_dir, rep, reference, record, 5, seen, "(random + 1 in a checkpoint write)")


@pytest.mark.slow
def test_power_loss_30_kills_including_checkpoint_writes(mlp_bundle, mlp_data, tmp_path, reference, record):
    rng = random.Random(30)
    run_dir = tmp_path / "run"
    rep, seen = kill_and_resume(mlp_bundle, mlp_data / "train.npz", run_dir, kills=30, rng=rng, in_write_every=2,
                                delay="0.02")
    _check(run_dir, rep, reference, record, 30, seen, "(half of them inside checkpoint writes)")
    assert any(w in ("in a temp write", "between checkpoint and commit record") for w in seen), seen
