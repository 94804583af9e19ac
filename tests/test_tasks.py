"""Many tasks on one base (issue 12): the base stored once, task packs, refusals, hot-swap parity."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import contextlib
import io
import subprocess

from taskedge.runtime.cli import main
from taskedge.runtime import bundle as B
from taskedge.runtime.evaluate import predict_onnx
from taskedge.runtime.fsutil import atomic_write_bytes, sha256_file
from taskedge.runtime.merge import merge
from taskedge.runtime.serve import Runtime
from taskedge.runtime.store import TaskStore


def run_cli(*args):
    """The CLI in this process (cheap): CompletedProcess-like (returncode, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory, mlp_onnx, mlp_data):
    """Another task on the MLP: other classes, seed, budget and calibration data."""
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    out = tmp_path_factory.mktemp("bundles") / "mlp4"
    export_bundle(ExportConfig(model=str(mlp_onnx), out=str(out), calib=str(mlp_data / "test.npz"), budget=0.1,
                               num_classes=4, seed=3), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def packs(tmp_path_factory, mlp_bundle, second_bundle):
    d = tmp_path_factory.mktemp("packs")
    for name, src in (("three", mlp_bundle), ("four", second_bundle)):
        r = run_cli("task", "export", src, "-o", d / f"{name}.tar", "--name", name, "--json")
        assert r.returncode == 0, r.stderr
    return d


def _trained(store: TaskStore, name: str, seed: int) -> None:
    """A trained task state (random, non-zero deltas and head) written as adapt --task would."""
    folder = store.task_dir(name)
    m = B.read_manifest(folder)
    rng = np.random.default_rng(seed)
    with np.load(folder / B.INITIAL_STATE) as z:
        params = {n: z[n] + 0.3 * rng.standard_normal(z[n].shape).astype(np.float32) for n in m.trainable_names}
    atomic_write_bytes(folder / B.TASK_STATE, B.task_state_bytes(params, m, B.allocation_digest(folder, m)))


def test_one_base_two_tasks_stored_once(tmp_path, mlp_bundle, second_bundle, packs):
    a, b = B.read_manifest(mlp_bundle), B.read_manifest(second_bundle)
    assert B.base_id(a) == B.base_id(b)                                   # other task, same base bytes
    assert (mlp_bundle / B.WEIGHTS).read_bytes() == (second_bundle / B.WEIGHTS).read_bytes()
    with __import__("tarfile").open(packs / "four.tar") as tar:
        names = set(tar.getnames())
    assert B.WEIGHTS not in names and {B.MANIFEST, "task.json", B.TASK_WEIGHTS, B.STEP_MODEL} <= names
    store = tmp_path / "store"
    assert run_cli("task", "add", mlp_bundle, "--name", "three", "--store", store).returncode == 0
    r = run_cli("task", "add", packs / "four.tar", "--store", store)
    assert r.returncode == 0, r.stderr
    st = TaskStore(store)
    assert st.names() == ["four", "three"] and st.bases() == [B.base_id(a)]
    w = [os.stat(st.task_dir(n) / B.WEIGHTS) for n in ("three", "four")]
    assert w[0].st_ino == w[1].st_ino                                     # one copy on disk
    base = (mlp_bundle / B.WEIGHTS).stat().st_size
    assert st.disk_bytes() < 2 * base + st.task_bytes("three") + st.task_bytes("four")     # the base once
    B.load_bundle(st.task_dir("four"))                                    # a stored task is a complete bundle
    listing = json.loads(run_cli("tasks", "--store", store, "--json").stdout)
    assert [t["name"] for t in listing["tasks"]] == ["four", "three"] and all(t["bytes"] > 0 for t in listing["tasks"])


@pytest.mark.parametrize("case", ["missing", "damaged", "altered"])
def test_pack_without_its_base_is_refused_and_nothing_written(tmp_path, mlp_bundle, packs, case):
    store = tmp_path / "store"
    pack = packs / "four.tar"
    if case == "damaged":                                   # the base is there, but its bytes are not the pack's
        assert run_cli("task", "add", mlp_bundle, "--name", "three", "--store", store).returncode == 0
        base = next((store / "bases").iterdir()) / B.WEIGHTS
        data = bytearray(base.read_bytes())                 # a damaged copy (the stored file is a link to
        data[100] ^= 0xFF                                   # the fixture's own weights.bin)
        base.unlink()
        base.write_bytes(bytes(data))
    elif case == "altered":                                 # task.json names a base the manifest does not
        import tarfile
        src = tmp_path / "x"
        with tarfile.open(pack) as tar:
            tar.extractall(src, filter="data")
        rec = json.loads((src / "task.json").read_text())
        (src / "task.json").write_text(json.dumps(dict(rec, base="0" * 64)))
        pack = tmp_path / "altered.tar"
        with tarfile.open(pack, "w") as tar:
            for p in sorted(src.iterdir()):
                tar.add(p, arcname=p.name)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    r = run_cli("task", "add", pack, "--store", store)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert {"missing": "is not on this board", "damaged": "damaged",
            "altered": "was altered"}[case] in r.stderr, r.stderr
    if case == "missing":
        assert "taskedge flash" in r.stderr and "taskedge pack" in r.stderr
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name != ".lock")
    assert after == [p for p in before if not p.endswith(".lock")]       # nothing written


def test_removing_a_task_leaves_the_others_intact(tmp_path, mlp_bundle, packs, mlp_data):
    store = tmp_path / "store"
    for args in ((mlp_bundle, "--name", "three"), (packs / "four.tar",), (packs / "three.tar", "--name", "again")):
        assert run_cli("task", "add", *args, "--store", store).returncode == 0
    st = TaskStore(store)
    def sums(name):
        return {f: sha256_file(st.task_dir(name) / f) for f in os.listdir(st.task_dir(name))}
    before = {n: sums(n) for n in ("three", "again")}
    r = run_cli("task", "remove", "four", "--store", store)
    assert r.returncode == 0, r.stderr
    assert st.names() == ["again", "three"]
    for n in ("three", "again"):
        B.load_bundle(st.task_dir(n))                                     # every file still matches its sha256
        assert sums(n) == before[n]
    r = run_cli("eval", "--task", "again", "--store", store, "--data", mlp_data / "test.npz", "--update",
                st.task_dir("again") / B.INITIAL_STATE)
    assert r.returncode == 0, r.stderr
    assert run_cli("task", "remove", "four", "--store", store).returncode == 2        # gone: one-line error
    assert not [p for p in (store / "blobs").iterdir() if p.stat().st_nlink == 1]    # no orphaned blobs


def test_hot_swap_equals_each_merged_model(tmp_path, mlp_bundle, packs, mlp_data):
    store = tmp_path / "store"
    for args in ((mlp_bundle, "--name", "three"), (packs / "four.tar",), (packs / "three.tar", "--name", "other")):
        assert run_cli("task", "add", *args, "--store", store).returncode == 0
    st = TaskStore(store)
    x = {"x": np.load(mlp_data / "test.npz")["x"]}
    ref = {}
    for i, name in enumerate(("three", "four", "other")):
        _trained(st, name, seed=i)
        merge(st.task_dir(name), tmp_path / f"{name}.onnx", update=str(st.task_dir(name) / B.TASK_STATE))
        ref[name] = predict_onnx(tmp_path / f"{name}.onnx", x)
    before = (st.bases_dir / st.bases()[0] / B.WEIGHTS).read_bytes()
    rt = Runtime(store=store)
    for name in ("three", "four", "three", "other", "four", "three"):
        np.testing.assert_allclose(rt.predict(name, x), ref[name], rtol=0, atol=1e-5)
    assert len(rt.sessions) == 2                                          # 3- and 4-class heads; tasks share them
    assert (st.bases_dir / st.bases()[0] / B.WEIGHTS).read_bytes() == before   # copy-on-write: disk untouched
    r = run_cli("predict", "--task", "three", "--task", "four", "--task", "three", mlp_data / "test.npz", "--store",
                store, "--json", "-o", tmp_path / "p.npz")
    assert r.returncode == 0, r.stderr
    out = np.load(tmp_path / "p.npz")
    np.testing.assert_allclose(out["2:three"], ref["three"], atol=1e-5)
    np.testing.assert_allclose(out["1:four"], ref["four"], atol=1e-5)


def test_adapt_task_records_state_and_accuracy(tmp_path, mlp_bundle, mlp_data):
    store = tmp_path / "store"
    assert run_cli("task", "add", mlp_bundle, "--name", "t", "--store", store).returncode == 0
    r = run_cli("adapt", "--task", "t", "--store", store, "--data", mlp_data / "train.npz", "--steps", "20",
                "--lr", "0.01", "--json")
    assert r.returncode == 0, r.stderr
    rec = TaskStore(store).record("t")
    assert rec["trained"]["steps"] == 20 and rec["accuracy"]["value"] == json.loads(r.stdout)["accuracy"]["after"]
    folder = TaskStore(store).task_dir("t")
    state = B.read_task_state(folder / B.TASK_STATE, B.read_manifest(folder),
                              B.allocation_digest(folder, B.read_manifest(folder)))
    report = json.loads(r.stdout)
    assert report["update"] == str(folder / B.TASK_STATE) and not (folder / "run" / "update.npz").exists()
    assert not [p for p in (folder / "run").iterdir() if p.name.startswith("ckpt-")]   # the finished run pruned
    assert rec["trained"]["checkpoints"] == "removed" and all(np.isfinite(v).all() for v in state.values())
    pack = tmp_path / "t.tar"
    assert run_cli("task", "export", "t", "--store", store, "-o", pack).returncode == 0
    other = tmp_path / "board2"                           # another board with the base: the trained task moves
    assert run_cli("task", "add", mlp_bundle, "--name", "seed", "--store", other).returncode == 0
    r = run_cli("task", "add", pack, "--store", other)
    assert r.returncode == 0, r.stderr
    assert TaskStore(other).record("t")["accuracy"] == rec["accuracy"]
    assert (TaskStore(other).task_dir("t") / B.TASK_STATE).read_bytes() == (folder / B.TASK_STATE).read_bytes()
    r = run_cli("adapt", mlp_bundle, "--task", "t", "--store", store, "--data", mlp_data / "train.npz")
    assert r.returncode == 2 and "not both" in r.stderr
    shutil.rmtree(tmp_path / "board2")


def test_predict_on_a_damaged_task_file_is_one_line(tmp_path, mlp_bundle, mlp_data):
    """Found by the fuzz suite: predict read a damaged allocation.npz (numpy traceback)."""
    store = tmp_path / "store"
    assert run_cli("task", "add", mlp_bundle, "--name", "t", "--store", store).returncode == 0
    alloc = TaskStore(store).task_dir("t") / B.ALLOCATION
    data = bytearray(alloc.read_bytes())
    data[0] ^= 1
    alloc.unlink()                                          # a new file: the stored one links to a blob
    alloc.write_bytes(bytes(data))
    r = run_cli("predict", "--task", "t", mlp_data / "test.npz", "--store", store)
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr and len(r.stderr.strip().splitlines()) == 1
