"""Never a traceback (issue 14): every command driven in-process with generated flag values and
damaged files. The oracle for every input: exit 0 or 2, never another code or an exception;
on exit 2 exactly one line on stderr; what a command must not touch is unchanged.

Fixed seed (derandomized), no shrinking (each example is a real command). `make test`: the fast
profile (FUZZ_SCALE=1, 416 inputs); `make test-slow` (--runslow) runs 15x as many (6,240). Each
command's counts go to the fault summary; each bug found is pinned by a plain test at the end.
pack, flash, bench and demo: test_fuzz_tools.py; the shared runner and oracle: fuzzkit.py.
"""
from __future__ import annotations

import json
import shutil

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from taskedge.runtime import bundle as B  # noqa: E402
from .fuzzkit import (NUMBERS, _flip, damaged_copy, fuzz_settings, oracle, run, scale,  # noqa: E402,F401
                      summary, tree_hash)


ADAPT_FLAGS = ["--steps", "--epochs", "--batch-size", "--micro-batch", "--lr", "--warmup", "--eval-every",
               "--checkpoint-every", "--keep", "--memory-budget-mb", "--energy-budget-j", "--max-seconds",
               "--seed", "--threads"]


def test_adapt_flags(request, tmp_path, mlp_bundle, mlp_data):
    @fuzz_settings(40 * scale(request))
    @given(st.dictionaries(st.sampled_from(ADAPT_FLAGS), NUMBERS, max_size=3))
    def case(flags):
        run_dir = tmp_path / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        argv = ["adapt", mlp_bundle, "--data", mlp_data / "train.npz", "--run-dir", run_dir, "--quiet", "--json",
                "--steps", "2"]
        for k, v in flags.items():
            argv += [f"{k}={v}"]
        rc, out, err = run(argv)
        oracle("adapt flags", argv, rc, err)
        if rc == 0:
            assert json.loads(out)["steps"] >= 0
    case()


EXPORT_FLAGS = ["--budget", "--calib-batches", "--batch-size", "--lora-rank", "--num-classes", "--lr", "--seed"]


def test_export_flags(request, tmp_path, mlp_onnx, mlp_data):
    @fuzz_settings(25 * scale(request))
    @given(st.dictionaries(st.sampled_from(EXPORT_FLAGS), NUMBERS, max_size=2),
           st.sampled_from([None, "2:4", "4:2", "a:b", "0:4", "2:4:8"]),
           st.sampled_from([None, "mean", "avg"]))
    def case(flags, nm, pool):
        out = tmp_path / "bundle"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["export", mlp_onnx, "--out", out, "--calib", mlp_data / "train.npz", "--calib-batches", "1"]
        argv += [f"{k}={v}" for k, v in flags.items()]
        argv += [f"--nm={nm}"] if nm else []
        argv += [f"--pool={pool}"] if pool else []
        rc, _, err = run(argv)
        oracle("export flags", argv, rc, err)
        if rc == 2:
            assert not out.exists()                      # nothing half-written
        else:
            assert (out / B.MANIFEST).is_file()
    case()


def test_damaged_bundle_files(request, tmp_path, mlp_bundle, mlp_data):
    names = sorted(p.name for p in mlp_bundle.iterdir() if p.is_file())

    @fuzz_settings(30 * scale(request))
    @given(st.data())
    def case(data):
        b = damaged_copy(mlp_bundle, tmp_path / "b", names, data)
        for cmd in (["inspect", b], ["eval", b, "--data", mlp_data / "test.npz"],
                    ["merge", b, "--out", tmp_path / "m.onnx"]):
            rc, _, err = run(cmd)
            oracle(f"{cmd[0]} on a damaged bundle", cmd, rc, err)
    case()


def test_task_commands_on_damaged_packs_and_stores(request, tmp_path, mlp_bundle, mlp_data):
    """task add on a damaged pack (the store unchanged on exit 2); tasks, predict, task export and
    task remove on a store with one damaged task file; random task names."""
    seed = tmp_path / "seed"
    assert run(["task", "add", mlp_bundle, "--name", "t", "--store", seed])[0] == 0
    assert run(["task", "export", "t", "--store", seed, "-o", tmp_path / "packs" / "t.tar"])[0] == 0
    files = sorted(p.name for p in (seed / "tasks" / "t").iterdir() if p.is_file() and p.name != B.WEIGHTS)
    names = st.sampled_from(["t", "u", "", "-t", "../t", "a/b", "x" * 70, "t\n", ".t"])

    @fuzz_settings(12 * scale(request))
    @given(st.data())
    def case(data):
        store = tmp_path / "store"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(seed, store)
        pack = tmp_path / "packs" / "t.tar"
        if data.draw(st.booleans()):                             # else the pack is fine (a --name may not be)
            pack = damaged_copy(tmp_path / "packs", tmp_path / "p", ["t.tar"], data) / "t.tar"
        before = tree_hash(store)
        argv = ["task", "add", pack, "--store", store, "--replace"] + \
            (["--name", data.draw(names)] if data.draw(st.booleans()) else [])
        rc, _, err = run(argv)
        oracle("task add on a damaged pack", argv, rc, err)
        if rc == 2:
            assert tree_hash(store) == before                    # nothing written
        _flip(store / "tasks" / "t" / data.draw(st.sampled_from(files)), data)
        name = data.draw(names)
        for argv in (["tasks", "--store", store], ["predict", "--task", name, mlp_data / "test.npz", "--store", store],
                     ["task", "export", name, "--store", store, "-o", tmp_path / "out.tar"],
                     ["task", "remove", name, "--store", store]):
            rc, _, err = run(argv)
            oracle(" ".join(argv[:2] if argv[0] == "task" else argv[:1]) + " on a damaged store", argv, rc, err)
    case()


def test_damaged_data_and_control_files(request, tmp_path, mlp_bundle, mlp_data):
    @fuzz_settings(25 * scale(request))
    @given(st.data())
    def case(data):
        d = tmp_path / "d.npz"
        shutil.copyfile(mlp_data / "train.npz", d)
        _flip(d, data)
        control = tmp_path / "control.json"
        control.write_text(data.draw(st.sampled_from(['{"memory_budget_mb": 900}', '{"memory_budget_mb": -5}',
                                                      "{", "[]", '{"memory_budget_mb": "x"}', ""])))
        run_dir = tmp_path / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        argv = ["adapt", mlp_bundle, "--data", d, "--run-dir", run_dir, "--steps", "2", "--quiet",
                "--control-file", control]
        rc, _, err = run(argv)
        oracle("adapt on damaged data / control files", argv, rc, err)
    case()


def test_damaged_checkpoints_resume(request, tmp_path, mlp_bundle, mlp_data):
    base = tmp_path / "base-run"
    rc, _, err = run(["adapt", mlp_bundle, "--data", mlp_data / "train.npz", "--run-dir", base, "--steps", "4",
                      "--checkpoint-every", "2", "--quiet"])
    assert rc == 0, err
    files = sorted(p.name for p in base.iterdir() if p.is_file())

    @fuzz_settings(20 * scale(request))
    @given(st.data())
    def case(data):
        r = damaged_copy(base, tmp_path / "run", files, data)
        argv = ["adapt", mlp_bundle, "--run-dir", r, "--resume", "--steps", "6", "--quiet"]
        rc, _, err = run(argv)
        oracle("adapt --resume on damaged checkpoints", argv, rc, err)
    case()


def test_profiles_and_names(request, tmp_path):
    @fuzz_settings(30 * scale(request))
    @given(st.sampled_from(["profile", "show"]), st.text(max_size=20), st.binary(max_size=200))
    def case(kind, name, toml):
        path = tmp_path / "p.toml"
        path.write_bytes(toml)
        for argv in (["profile", "show", name or "x"], ["profile", "show", path], ["doctor", "--profile", path],
                     ["profiles"]):
            rc, _, err = run(argv)
            oracle(f"{argv[0]} {argv[1] if len(argv) > 1 and argv[0] == 'profile' else ''}".strip(), argv, rc, err)
    case()


def test_unpack_random_archives(request, tmp_path):
    @fuzz_settings(30 * scale(request))
    @given(st.binary(max_size=600))
    def case(blob):
        tar = tmp_path / "x.tar"
        tar.write_bytes(blob)
        dest = tmp_path / "dest"
        before = tree_hash(dest) if dest.exists() else None
        argv = ["unpack", tar, dest]
        rc, _, err = run(argv)
        oracle("unpack random bytes", argv, rc, err)
        if rc == 2:
            assert (tree_hash(dest) if dest.exists() else None) == before
    case()


# -- host tools: pack, flash, bench, demo ------------------------------------------------------

def test_negative_seed_is_refused_by_name(mlp_bundle, mlp_data):
    rc, _, err = run(["adapt", mlp_bundle, "--data", mlp_data / "train.npz", "--seed", "-3"])
    assert rc == 2 and "--seed: '-3' must be >= 0" in err          # was a ValueError traceback from numpy


def test_profile_that_is_not_utf8_is_refused(tmp_path):
    (tmp_path / "p.toml").write_bytes(b"\xb8A\x0e\xa1")
    rc, _, err = run(["profile", "show", tmp_path / "p.toml"])
    assert rc == 2 and "give a UTF-8 TOML file" in err and len(err.strip().splitlines()) == 1   # was a traceback


def test_empty_archive_is_one_line(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"")
    rc, _, err = run(["unpack", tmp_path / "x.tar", tmp_path / "dest"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "not a readable tar archive" in err  # was 5 lines


def test_error_quoting_a_control_character_stays_one_line():
    rc, _, err = run(["profile", "show", "a/b\x1cc\u2028d"])   # \x1c and \u2028 split lines in Python
    assert rc == 2 and len(err.splitlines()) == 1 and "\\x1c" in err   # was two lines


def test_probe_on_damaged_sysfs(request, tmp_path):
    """probe on a fake Orin Nano tree (tests/test_probe.py) with one of its files damaged."""
    from test_probe import orin_nano_tree

    base = tmp_path / "base"
    orin_nano_tree(base)
    files = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and not p.is_symlink())

    @fuzz_settings(30 * scale(request))
    @given(st.data())
    def case(data):
        root = damaged_copy(base, tmp_path / "root", files, data)
        out = tmp_path / "p.toml"
        out.unlink(missing_ok=True)
        argv = ["probe", "--root", root, "-o", out]
        rc, _, err = run(argv)
        oracle("probe on damaged sysfs", argv, rc, err)
        if rc == 0:                                       # what it wrote is a profile the runtime loads
            assert run(["profile", "show", out])[0] == 0
    case()


def test_probe_survives_bad_bytes_in_sysfs(tmp_path):
    """Found by the fuzzing: an INA3221 label that is not UTF-8 (a traceback) and a device-tree
    model with a control character (a TOML comment the reader refused)."""
    from test_probe import orin_nano_tree
    orin_nano_tree(tmp_path)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson \x1bOrin\x00")
    label = next(tmp_path.rglob("in1_label"))
    label.write_bytes(b"\xc2VDD_IN\n")
    rc, _, err = run(["probe", "--root", tmp_path, "-o", tmp_path / "p.toml"])
    assert rc == 0, err
    assert run(["profile", "show", tmp_path / "p.toml"])[0] == 0
