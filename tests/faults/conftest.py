"""Fault-injection suite (issue 6): shared helpers and the summary table.

Every test records one or more rows with the `record` fixture:
    record(case, expected, seen, data_lost="none")
and `pytest_terminal_summary` prints the table at the end of the session (also written to
.pytest_cache/taskedge-faults-summary.txt).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

_ROWS = []


@pytest.fixture
def record(request):
    def add(case, expected, seen, data_lost="none"):
        _ROWS.append((case, expected, seen, data_lost, request.node.nodeid.split("::")[-1]))
    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _ROWS:
        return
    heads = ("case", "outcome expected", "outcome seen", "data lost")
    rows = [r[:4] for r in _ROWS]
    widths = [min((50, 62, 92, 16)[i], max(len(h), *(len(str(r[i])) for r in rows))) for i, h in enumerate(heads)]

    def line(cells):
        return " | ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths))
    out = [line(heads), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    terminalreporter.write_sep("=", f"TaskEdge fault-injection summary ({len(rows)} cases)")
    for s in out:
        terminalreporter.write_line(s)
    try:
        cache = Path(config.rootpath) / ".pytest_cache"
        cache.mkdir(exist_ok=True)
        (cache / "taskedge-faults-summary.txt").write_text("\n".join(out) + "\n")
    except OSError:
        pass


# -- running the board CLI -------------------------------------------------------------------

def cli_cmd(*args):
    return [sys.executable, "-m", "taskedge.runtime.cli", *map(str, args)]


def run(*args, env=None, timeout=300):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, timeout=timeout, env=e)


def adapt_args(bundle, data, run_dir, *extra):
    return ("adapt", bundle, "--data", data, "--run-dir", run_dir, "--quiet", "--json", *extra)


def adapt_ok(bundle, data, run_dir, *extra, env=None):
    r = run(*adapt_args(bundle, data, run_dir, *extra), env=env)
    rep = json.loads(r.stdout) if r.stdout.strip() else None
    # a run that stops as diverged still writes its report, and exits 1 (not 2: the input was fine)
    ok = r.returncode == 0 or (r.returncode == 1 and rep and rep["stop_reason"] == "diverged")
    assert ok and rep is not None, (r.returncode, r.stderr[-2000:])
    return rep, r.stderr


def one_line_error(r, *must_contain):
    """Exit 2, exactly one `error:` line naming what it must, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, r.stderr
    for m in must_contain:
        assert m in errors[0], (m, errors[0])
    return errors[0]


def load_update(run_dir):
    with np.load(Path(run_dir) / "update.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def same_update(a, b):
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def checkpoint_files(run_dir):
    d = Path(run_dir)
    return sorted(p.name for p in d.iterdir() if p.name.startswith("ckpt-")) if d.is_dir() else []


def temp_files(run_dir):
    d = Path(run_dir)
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp")) if d.is_dir() else []


def committed_checkpoints_load(run_dir):
    """Every checkpoint with a commit record matches its hash and loads. Returns their steps."""
    from taskedge.runtime.fsutil import sha256_file
    d = Path(run_dir)
    steps = []
    for rec in sorted(d.glob("ckpt-*.json")):
        data = d / rec.name[:-5]
        assert data.is_file(), f"{rec.name}: commit record without its checkpoint"
        meta = json.loads(rec.read_text())
        assert sha256_file(data) == meta["sha256"], f"{data.name}: committed but hash differs"
        with np.load(data) as z:               # loads, with the update count
            int(z["updates"])
        steps.append(meta["step"])
    return steps


def flip_byte(path, pos=None, seed=0):
    b = bytearray(Path(path).read_bytes())
    i = len(b) // 2 if pos is None else pos
    b[i] ^= 0x5A
    Path(path).write_bytes(bytes(b))


def truncate(path, keep=0.5):
    b = Path(path).read_bytes()
    Path(path).write_bytes(b[: int(len(b) * keep)])


def wait_for(pred, timeout=60.0, every=0.005):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if pred():
            return True
        time.sleep(every)
    return False


def kill(proc):
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
