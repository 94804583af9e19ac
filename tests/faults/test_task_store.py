"""Power loss during `taskedge task add`: SIGKILL at random moments (and once inside the swap of an
old task for its replacement); the store always opens with the old task or the new one, complete,
and nothing half-written is left once it has been opened."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import time

import pytest

from taskedge.runtime import bundle as B
from taskedge.runtime.store import TaskStore

from .conftest import cli_cmd, kill, run


@pytest.fixture(scope="module")
def two_versions(mlp_bundle, mlp_onnx, mlp_data, tmp_path_factory):
    """The task `t` as installed (the MLP bundle) and a replacement pack for it (another export)."""
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    d = tmp_path_factory.mktemp("taskstore")
    export_bundle(ExportConfig(model=str(mlp_onnx), out=str(d / "new"), calib=str(mlp_data / "test.npz"),
                               budget=0.1, num_classes=4, seed=5), log=lambda m: None)
    assert run("task", "export", d / "new", "-o", d / "new.tar", "--name", "t").returncode == 0
    return d / "new.tar"


def _state(store) -> str:
    """'old' or 'new' (the task `t` opens, complete), after the store recovered what the kill left."""
    st = TaskStore(store)                        # opening recovers: rolls a half-done swap back or forward
    leftovers = [p.name for p in (store / "tasks").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    m = B.load_bundle(st.task_dir("t"))          # every file present and matching its sha256
    assert st.record("t")["base"] == B.base_id(m)
    return {3: "old", 4: "new"}[m.num_classes]


def _kills(tmp_path, mlp_bundle, pack, kills, record):
    from taskedge.tools import taskpack
    seed = tmp_path / "seed"
    taskpack.add(str(mlp_bundle), TaskStore(seed), "t")
    t0 = time.monotonic()                        # how long one add takes here: kills land inside it
    assert run("task", "add", pack, "--replace", "--store", shutil.copytree(seed, tmp_path / "timing")).returncode == 0
    took = time.monotonic() - t0
    rng, seen = random.Random(12), []
    for i in range(kills):
        store = shutil.copytree(seed, tmp_path / f"s{i}")
        env = dict(os.environ, TASKEDGE_FAULT_DELAY_TASK="30") if i == 0 else os.environ
        p = subprocess.Popen(cli_cmd("task", "add", pack, "--replace", "--store", store), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i == 0:                               # inside the swap: old moved aside, new not yet published
            deadline = time.monotonic() + 120
            while not (store / "tasks" / ".t.old").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            time.sleep(rng.uniform(0.5, 1.0) * took)
        kill(p)
        seen.append(_state(store))
        taskpack.add(str(pack), TaskStore(store), replace=True)      # and the add can be redone
        assert _state(store) == "new"
    assert seen[0] == "old"
    record(f"SIGKILL during `task add --replace` ({kills} kills, one inside the swap)", "old or new task, complete",
           f"old {seen.count('old')} / new {seen.count('new')}, never half", "none")


def test_kill_during_task_add_leaves_old_or_new(tmp_path, mlp_bundle, two_versions, record):
    _kills(tmp_path, mlp_bundle, two_versions, 3, record)


@pytest.mark.slow
def test_kill_during_task_add_many(tmp_path, mlp_bundle, two_versions, record):
    _kills(tmp_path, mlp_bundle, two_versions, 20, record)
