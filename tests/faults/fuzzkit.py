"""What the fuzz modules (test_fuzz.py, test_fuzz_tools.py) share: the in-process runner, the oracle,
Hypothesis settings, the number strategy and the per-command counts for the fault summary."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st

from taskedge.runtime.cli import main

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
    for cmd, n in sorted(COUNTS.items()):           # each module reports (and clears) the commands it ran
        _ROWS.append((f"fuzz: {cmd}", "exit 0 or 2, one line, no traceback",
                      f"{sum(n.values())} inputs: {n[0]} ran, {n[2]} refused; {n['other']} failures", "none",
                      "test_fuzz"))
    COUNTS.clear()


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
