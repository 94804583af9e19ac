"""Never a traceback, for the tools (issue 14): pack, flash (to a real sshd on 127.0.0.1), bench and
demo flags, with test_fuzz.py's oracle (fuzzkit.py); the bugs found are pinned at the end."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

from taskedge.runtime import bundle as B  # noqa: E402
from test_flash import sshd  # noqa: E402,F401  (the loopback sshd fixture, for the flash fuzz)
from .fuzzkit import NUMBERS, damaged_copy, fuzz_settings, oracle, run, scale, summary, tree_hash  # noqa: E402,F401

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
