"""Never a traceback (issue 14): every command driven in-process with generated flag values and
damaged files. The oracle for every input: exit 0 or 2, never another code or an exception;
on exit 2 exactly one line on stderr; what a command must not touch is unchanged.

Fixed seed (derandomized), no shrinking (each example is a real command). `make test`: the fast
profile (FUZZ_SCALE=1, 416 inputs); `make test-slow` (--runslow) runs 15x as many (6,240). Each
command's counts go to the fault summary; each bug found is pinned by a plain test at the end.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402

from taskedge.runtime import bundle as B  # noqa: E402
from taskedge.runtime.cli import main  # noqa: E402
from test_flash import sshd  # noqa: E402,F401  (the loopback sshd fixture, for the flash fuzz)

COUNTS: dict = {}


def scale(request) -> int:
    return 15 if request.config.getoption("--runslow") else int(os.environ.get("FUZZ_SCALE", "1"))


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,   # no shrinking: each
                    phases=[Phase.explicit, Phase.generate],                       # run is a real command
                    suppress_health_check=list(HealthCheck))


def run(argv) -> tuple:
    """main(argv) in this process: (exit code, stdout, stderr); an exception is a failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:          # argparse: --help (0) or a bad flag (2)
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def oracle(cmd: str, argv, rc, err) -> None:
    n = COUNTS.setdefault(cmd, {0: 0, 2: 0, "other": 0})
    n[rc if rc in (0, 2) else "other"] += 1
    assert rc in (0, 2), (argv, rc, err[-2000:])
    assert "Traceback" not in err, (argv, err[-2000:])
    if rc == 2:
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith("[")]   # [adapt]/[export] progress
        assert len(lines) == 1, (argv, err)


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


# numbers as a script would pass them: good, boundary, negative, huge, not-a-number, not a number
NUMBERS = st.sampled_from(["0", "1", "2", "3", "-1", "-3", "0.5", "1e-9", "1e9", "1e309", "nan", "inf", "-inf",
                           "", "abc", "1,5", "0x10", " 2"])


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    from .conftest import _ROWS
    for cmd, n in sorted(COUNTS.items()):
        _ROWS.append((f"fuzz: {cmd}", "exit 0 or 2, one line, no traceback",
                      f"{sum(n.values())} inputs: {n[0]} ran, {n[2]} refused; {n['other']} failures", "none",
                      "test_fuzz"))


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


def _flip(path: Path, data) -> None:
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "empty", "garbage"]))
    if how == "flip" and raw:
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]
    elif how == "empty":
        raw = bytearray()
    else:
        raw = bytearray(data.draw(st.binary(min_size=1, max_size=64)))
    path.write_bytes(bytes(raw))


def damaged_copy(src: Path, dest: Path, files, data) -> Path:
    """A fresh copy of the folder `src` at `dest` with one of `files` damaged (`_flip`)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, symlinks=True)
    _flip(dest / data.draw(st.sampled_from(files)), data)
    return dest


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

@pytest.fixture(scope="module")
def runtime_wheel(tmp_path_factory):
    from taskedge.tools.pack import build_wheel
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _sometimes_bad(good, bad):
    """Mostly the good value (so whole runs happen too), else one of the bad ones."""
    return st.one_of(st.just(good), st.just(good), st.sampled_from(bad))


def test_pack_flags_and_bundles(request, tmp_path, mlp_bundle, runtime_wheel):
    """The archive is complete (`unpack` verifies every SHA256SUMS line) or absent, temp files included."""
    names = sorted(p.name for p in mlp_bundle.iterdir() if p.is_file())
    junk = tmp_path / "taskedge-0.1.0-py3-none-any.whl"
    junk.write_bytes(b"PK\x03\x04 not a wheel")
    (tmp_path / "bad.toml").write_bytes(b"name = [")
    (tmp_path / "folder").mkdir()

    @fuzz_settings(12 * scale(request))
    @given(st.data())
    def case(data):
        bundle = data.draw(_sometimes_bad("good", ["damaged", "missing"]))
        bundle = {"good": mlp_bundle, "missing": tmp_path / "nope"}.get(bundle) or \
            damaged_copy(mlp_bundle, tmp_path / "b", names, data)
        out = tmp_path / "o" / data.draw(_sometimes_bad("x.tar", ["x.tar.gz", "sub/dir/x.tgz", "", "a\nb.tar",
                                                                   "../folder", "/proc/x.tar", "/dev/null/x.tar"]))
        profile = data.draw(_sometimes_bad("host-cpu", ["jetson-orin-nano-8gb", "nope", "", tmp_path / "bad.toml",
                                                        tmp_path, "../../etc/passwd"]))
        wheel = data.draw(_sometimes_bad(runtime_wheel, [junk, tmp_path / "missing.whl", tmp_path / "folder"]))
        shutil.rmtree(tmp_path / "o", ignore_errors=True)
        argv = ["pack", bundle, "--profile", profile, "-o", out, "--wheel", wheel, "--json"]
        rc, _, err = run(argv)
        oracle("pack", argv, rc, err)
        if rc == 0:
            assert run(["unpack", out, tmp_path / "u"])[0] == 0
        else:
            leftovers = [p for p in (tmp_path / "o").rglob("*") if p.is_file()] if (tmp_path / "o").exists() else []
            assert leftovers == [], leftovers
    case()


def test_flash_flags_and_archives(request, tmp_path, sshd, mlp_bundle, runtime_wheel):
    """flash to a real sshd on 127.0.0.1 (tests/test_flash.py's fixture): a bad flag or archive is
    refused before anything reaches the board (its folder unchanged); a good one installs completely."""
    import sys
    tar = tmp_path / "bundle.tar"
    assert run(["pack", mlp_bundle, "--profile", "host-cpu", "-o", tar, "--wheel", runtime_wheel])[0] == 0
    board = tmp_path / "board"
    board.mkdir()
    raw = tar.read_bytes()
    bad_tars = {"random": os.urandom(512), "truncated": raw[: len(raw) // 2], "empty": b"",
                "flipped": raw[:2000] + bytes([raw[2000] ^ 1]) + raw[2001:]}

    @fuzz_settings(4 * scale(request))
    @given(st.data())
    def case(data):
        archive = data.draw(_sometimes_bad("good", sorted(bad_tars) + ["missing"]))
        path = tar if archive == "good" else tmp_path / f"{archive}.tar"
        if archive in bad_tars:
            path.write_bytes(bad_tars[archive])
        target = data.draw(_sometimes_bad(sshd["target"], ["", "-oProxyCommand=x", "u@", "@h", "a b@h", "u@h\n"]))
        port = data.draw(_sometimes_bad(str(sshd["port"]), ["0", "-1", "65536", "abc", "nan", ""]))
        prefix = data.draw(_sometimes_bad(str(board / "p"), ["", "-x", str(board / "a\nb"), str(board / "a b"),
                                                             str(board / "$(touch pwned)"), str(board / "q;w")]))
        identity = data.draw(_sometimes_bad(sshd["key"], [tmp_path / "nokey", tmp_path]))
        option = data.draw(_sometimes_bad(f"UserKnownHostsFile={sshd['known_hosts']}", ["", "=x", "-x", "A=\n"]))
        before = tree_hash(board)
        argv = ["flash", path, target, "--port", port, "--prefix", prefix, "--identity", identity,
                "--python", sys.executable, "--no-deps", "--system-site-packages", "-o", option, "--json"]
        rc, out, err = run(argv)
        oracle("flash", argv, rc, err)
        if rc == 2:
            assert tree_hash(board) == before                 # nothing reached the board
        else:
            res = json.loads(out)
            assert res["exit"] == 0 and res["doctor"]["ok"], res
            assert (Path(prefix) / "release" / "bundle" / B.MANIFEST).is_file()
            assert not list((Path(prefix) / "incoming").glob("*.part"))
    case()


class _Started(Exception):
    """Raised by the stand-in for the long run: every flag passed the parser."""


def _reach(check):
    def start(*args, **kw):
        check(*args, **kw)
        raise _Started
    return start


def _run_until_start(argv):
    try:
        return run(argv)
    except _Started:
        return 0, "", ""


def test_bench_and_demo_flags(request, tmp_path, monkeypatch):
    """Flag validation of `bench` and `demo` up to the start of the run (the runs themselves take
    minutes; tests/test_bench.py and tests/test_demo.py run them): what passes the parser reaches
    the run with values it can use; what does not is one line, exit 2, and creates nothing."""
    from taskedge.tools import demo
    from taskedge.tools.bench import VARIANTS, cli as bench_cli

    def bench_ok(model, quick, steps, seed, out, variants, workdir, *rest, **kw):
        assert (steps is None or steps >= 1) and seed >= 0 and set(variants or []) <= set(VARIANTS)
        assert (kw.get("cfg_override") or {}).get("rounds", 1) >= 1

    def demo_ok(task, seed, out, profile, quick, steps, quiet=False):
        assert task in demo.TASKS and seed >= 0 and (steps is None or steps >= 1)

    monkeypatch.setattr(bench_cli, "run_bench", _reach(bench_ok))
    monkeypatch.setattr(demo, "run_demo", _reach(demo_ok))
    (tmp_path / "file").write_text("x")
    outs = [tmp_path / "o", tmp_path / "o" / "deeper", tmp_path / "file", "", "a\nb", "/proc/self/x", "/dev/null/x"]
    flags = {"bench": {"--steps": NUMBERS, "--rounds": NUMBERS, "--seed": NUMBERS, "--out": st.sampled_from(outs),
                       "--workdir": st.sampled_from(outs), "--model": st.sampled_from(["text", "vision", "audio"]),
                       "--variants": st.sampled_from(["infer", "infer,ort-full", "nope", "infer,,", "",
                                                      "taskedge-0.1%", "TASKEDGE-1%"])},
             "demo": {"--steps": NUMBERS, "--seed": NUMBERS, "--out": st.sampled_from(outs),
                      "--task": st.sampled_from(["text", "vision", "x"]),
                      "--profile": st.sampled_from(["host-cpu", "nope", "", str(tmp_path / "file")])}}

    @fuzz_settings(20 * scale(request))
    @given(st.sampled_from(sorted(flags)), st.data())
    def case(cmd, data):
        chosen = data.draw(st.lists(st.sampled_from(sorted(flags[cmd])), max_size=3, unique=True))
        argv = [cmd] + [f"{k}={data.draw(flags[cmd][k])}" for k in chosen] + ["--quiet" if cmd == "bench" else "--quick"]
        before = sorted(os.listdir(tmp_path))
        rc, _, err = _run_until_start(argv)
        oracle(f"{cmd} flags", argv, rc, err)
        if rc == 2:
            assert sorted(os.listdir(tmp_path)) == before
    case()


# -- the bugs the fuzzing found, pinned -------------------------------------------------------

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


def test_pack_found_bugs(tmp_path, mlp_bundle, runtime_wheel):
    """An -o the archive cannot be written to was a FileNotFoundError traceback; a file named
    taskedge-*.whl that is no wheel was packed (the board's pip failed on it)."""
    rc, _, err = run(["pack", mlp_bundle, "--profile", "host-cpu", "-o", "/proc/x.tar", "--wheel", runtime_wheel])
    assert rc == 2 and "/proc/x.tar" in err and "cannot" in err and len(err.splitlines()) == 1, err
    junk = tmp_path / "taskedge-0.1.0-py3-none-any.whl"
    junk.write_bytes(b"junk")
    rc, _, err = run(["pack", mlp_bundle, "--profile", "host-cpu", "-o", tmp_path / "x.tar", "--wheel", junk])
    assert rc == 2 and "not a readable wheel" in err and not (tmp_path / "x.tar").exists()


def test_flash_found_bugs(tmp_path):
    """A --prefix with `$(...)` ran as shell on the board (pip's console-script launcher quotes the
    venv path in double quotes); port 0 / 65536 and target 'u@' reached ssh; a damaged archive was
    copied to the board before install.sh refused it there (exit 3). All refused here, exit 2."""
    tar = tmp_path / "x.tar"
    for extra, words in ((["--prefix", "b/$(touch x)"], "--prefix"), (["--port", "0"], "--port"),
                         (["--port", "65536"], "--port")):
        rc, _, err = run(["flash", tar, "root@127.0.0.1", *extra])
        assert rc == 2 and words in err and len(err.splitlines()) == 1, err
    rc, _, err = run(["flash", tar, "u@"])
    assert rc == 2 and "user@host" in err
    tar.write_bytes(os.urandom(300))
    rc, _, err = run(["flash", tar, "root@127.0.0.1", "--port", "1"])
    assert rc == 2 and "nothing was copied to the board" in err and len(err.splitlines()) == 1, err


def test_bench_and_demo_found_bugs(tmp_path):
    """bench --steps 0 ran the default count; bench/demo --out FILE was a traceback after the whole
    run; demo --steps -3 / --profile nope a traceback after the exports. Now refused where parsed."""
    (tmp_path / "f").write_text("x")
    for argv, words in ((["bench", "--steps", "0"], "--steps: '0' must be >= 1"),
                        (["bench", "--out", tmp_path / "f"], "--out"),
                        (["bench", "--variants", "infer,nope"], "unknown variant"),
                        (["demo", "--steps", "-3"], "--steps: '-3' must be >= 1"),
                        (["demo", "--profile", "nope"], "unknown device profile"),
                        (["demo", "--out", tmp_path / "f"], "--out")):
        rc, _, err = run(argv)
        assert rc == 2 and words in err and len(err.splitlines()) == 1, (argv, err)
