"""Training checkpoints that survive power loss.

A checkpoint is two files in the run folder:
    ckpt-00000120        the trainable state only (an .npz: trainable tensors, AdamW moments, update
                         count; KB to MB, never the frozen weights), written atomically
    ckpt-00000120.json   commit record: sha256 of the checkpoint + the run's state (RunState,
                         runtime/train/state.py), written last
A checkpoint without its commit record, or whose hash does not match, is ignored
(the previous one is used). The newest `keep` *good* checkpoints are kept: a torn or
corrupted one never counts towards `keep`, so a bad file cannot push a good one out.

Write order (each file atomic: temp name, fsync, rename, fsync dir):
    1. remove a stale commit record of the same step (so a record always matches its data)
    2. ckpt-N            3. ckpt-N.json          4. prune
A power cut at any point leaves the previous good checkpoint untouched. Leftover temp
files (`.ckpt-N.XXXX.tmp`) are removed by `clean()` when the next run takes the folder's lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .fsutil import (UserError, atomic_write_bytes, atomic_write_json, clean_temp_files, fault_delay, fsync_dir,
                     sha256_file)
from .trainer import TrainState

_NAME = re.compile(r"^ckpt-(\d{8})$")
_RECORD = re.compile(r"^ckpt-(\d{8})\.json$")
LOCK = ".lock"


class CheckpointStore:
    def __init__(self, run_dir, keep: int = 2):
        self.dir = Path(run_dir)
        self.keep = max(1, keep)
        self.skipped: List[str] = []              # bad checkpoints passed over by the last `latest()`
        self._verified: Dict[str, tuple] = {}     # name -> (size, mtime_ns) of data known to match its record
        self._lock_fd: Optional[int] = None
        self.last_write: Optional[dict] = None     # bytes and seconds of the newest checkpoint written

    # -- names ----------------------------------------------------------------
    def _scan(self, pattern: "re.Pattern") -> List[int]:
        """Steps of the files in the run folder whose names match `pattern`, newest first."""
        if not self.dir.is_dir():
            return []
        return sorted((int(m.group(1)) for p in self.dir.iterdir() if (m := pattern.match(p.name))), reverse=True)

    def steps(self) -> List[int]:
        return self._scan(_NAME)

    def _record_steps(self) -> List[int]:
        return self._scan(_RECORD)

    def path(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:08d}"

    @staticmethod
    def record_path(path: Path) -> Path:
        return path.with_name(path.name + ".json")

    # -- one writer per run folder ---------------------------------------------
    def lock(self) -> None:
        """Take an exclusive lock on the run folder (released by the kernel if the process dies), then
        remove temp files left by an interrupted write. Two runs on one folder would corrupt each other."""
        try:
            import fcntl
        except ImportError:                      # not POSIX: no lock, still clean up
            self.clean()
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(str(self.dir / LOCK), os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:                      # read-only folder: lock through a read-only descriptor,
                fd = os.open(str(self.dir), os.O_RDONLY)   # the checkpoint write will name the problem
        except OSError as e:
            raise UserError(f"cannot use run folder {self.dir}: {e.strerror or e} ({self.dir / LOCK})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{self.dir} is in use by another `taskedge adapt` (lock {self.dir / LOCK}); "
                            "wait for it or give another --run-dir") from None
        self._lock_fd = fd
        self.clean()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def clean(self) -> List[str]:
        return clean_temp_files(self.dir)

    # -- write ------------------------------------------------------------------
    def save(self, train_state: TrainState, state: dict, step: int) -> Path:
        path = self.path(step)
        record = self.record_path(path)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if record.exists():                  # a record must never vouch for data it did not hash
                record.unlink()
                fsync_dir(self.dir)
            self._verified.pop(path.name, None)
            t0 = time.perf_counter()
            atomic_write_bytes(path, train_state.to_bytes())
            fault_delay(path.name)               # test-only hook (no-op unless TASKEDGE_FAULT_DELAY_CKPT is set)
            atomic_write_json(record, {"sha256": sha256_file(path), "step": step, "state": state})
            self.last_write = {"bytes": path.stat().st_size, "seconds": round(time.perf_counter() - t0, 4)}
        except OSError as e:
            why = e.strerror or f"{type(e).__name__}: {e}"
            good = self.latest(warn=lambda m: None)
            prev = f"the previous checkpoint {good[0]} is intact" if good else "no earlier checkpoint exists"
            raise UserError(f"cannot write checkpoint {path}: {why}; {prev} "
                            "(free disk space or make the run folder writable, then --resume)") from None
        self._remember(path)
        self._prune(current=step)
        return path

    def _remember(self, path: Path) -> None:
        st = path.stat()
        self._verified[path.name] = (st.st_size, st.st_mtime_ns)

    def _is_good(self, step: int) -> bool:
        path = self.path(step)
        try:
            st = path.stat()
            if self._verified.get(path.name) == (st.st_size, st.st_mtime_ns):
                return self.record_path(path).is_file()
            record = json.loads(self.record_path(path).read_text(encoding="utf-8"))
            ok = isinstance(record, dict) and isinstance(record.get("state"), dict) \
                and sha256_file(path) == record.get("sha256")
        except (OSError, ValueError):
            return False
        if ok:
            self._remember(path)
        return ok

    def _remove(self, step: int) -> None:
        # the record first: a kill in between leaves data without a record (a torn checkpoint that
        # `latest` skips and the next prune removes), never a record without its data
        for p in (self.record_path(self.path(step)), self.path(step)):
            with contextlib.suppress(OSError):
                p.unlink()
        self._verified.pop(self.path(step).name, None)

    def _prune(self, current: int) -> None:
        """Keep the newest `keep` good checkpoints (always the one just written); remove the rest,
        including torn/corrupted ones and commit records without data."""
        good = [current]
        for step in self.steps():
            if step != current and len(good) < self.keep and self._is_good(step):
                good.append(step)
        for step in set(self.steps()) | set(self._record_steps()):
            if step not in good:
                self._remove(step)

    # -- read -------------------------------------------------------------------
    def latest(self, warn=lambda m: print(f"[adapt] {m}", file=sys.stderr)) -> Optional[Tuple[Path, dict]]:
        """Newest checkpoint whose commit record exists and whose hash matches. Bad ones are named
        through `warn` and listed in `self.skipped`."""
        self.skipped = []
        for step in self.steps():
            path = self.path(step)
            record_path = self.record_path(path)
            try:
                record = json.loads(record_path.read_text(encoding="utf-8"))
                if not isinstance(record, dict) or not isinstance(record.get("state"), dict):
                    raise ValueError("not a TaskEdge commit record")
            except FileNotFoundError:
                warn(f"{path}: no commit record (write was interrupted); skipping it")
                self.skipped.append(f"{path}: no commit record")
                continue
            except (OSError, ValueError) as e:
                warn(f"{record_path}: unreadable commit record ({e}); skipping it")
                self.skipped.append(f"{record_path}: unreadable commit record")
                continue
            try:
                digest = sha256_file(path)
            except OSError as e:
                warn(f"{path}: unreadable ({e.strerror or e}); falling back to an older checkpoint")
                self.skipped.append(f"{path}: unreadable")
                continue
            if digest != record.get("sha256"):
                warn(f"{path}: sha256 mismatch (torn or corrupted); falling back to an older checkpoint")
                self.skipped.append(f"{path}: sha256 mismatch")
                continue
            self._remember(path)
            return path, record["state"]
        return None

    def clear(self) -> None:
        for step in set(self.steps()) | set(self._record_steps()):
            for p in (self.record_path(self.path(step)), self.path(step)):     # record first, as in _remove
                if p.exists():
                    p.unlink()
        self._verified.clear()
