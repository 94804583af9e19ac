"""Crash-safe file writes: temp name in the same folder, flush, fsync, rename.

Every file TaskEdge writes goes through here, so a power cut leaves either the
old file or the new one, never half of one.

`taskedge pack` also ships this file as installer/fsutil.py, imported by the board's installer
before the runtime is installed: keep it standard library only and Python 3.9 syntax.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def fault_delay(what: str) -> None:
    """TEST-ONLY fault-injection hook (tests/faults): with TASKEDGE_FAULT_DELAY_CKPT=SECONDS set, sleep
    inside the checkpoint write window (temp file written but not yet renamed; checkpoint renamed but
    its commit record not yet written) so a test can SIGKILL the process there. Unset in production:
    then this is a no-op."""
    delay = os.environ.get("TASKEDGE_FAULT_DELAY_CKPT")
    if delay and what.startswith("ckpt-"):
        time.sleep(float(delay))


def one_line(text: str) -> str:
    """`text` as one printable line: control characters and line breaks (a file name can hold
    them) shown as escapes, so an error stays one line whatever it quotes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad data). The CLI prints
    it as one line and exits with status 2."""


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(dest, suffix: str = ""):
    """Yield a temporary path next to `dest`; on success rename it onto `dest`.

    For writers that insist on a file name (onnx.save, ORT's save_checkpoint).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + TEMP_SUFFIX, dir=str(dest.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        fault_delay(dest.name)                      # test-only hook; no-op unless the env var is set
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def clean_temp_files(folder) -> list:
    """Remove the leftovers of interrupted atomic writes (`.NAME.XXXX[.suffix].tmp`) in `folder`.
    Call it only while holding the folder's lock (no writer is active)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p.name)
    return removed


def atomic_write_bytes(dest, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def atomic_write_text(dest, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest, obj) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def staged_dir(dest):
    """Build a folder under a temporary name and rename it into place at the end.

    On any error the partial folder is removed, so a failed export leaves nothing.
    An existing `dest` is replaced only after the new one is complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=str(dest.parent)))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
