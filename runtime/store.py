"""The board's task store: each base once, many tasks over it.

    STORE/bases/<id>/      weights.bin (+ tokenizer.json): one pretrained model's frozen files,
                           named by their content (`bundle.base_id`), and base.json
    STORE/tasks/<name>/    a complete bundle: the task's own files (KB-MB), the base files
                           hard-linked from bases/<id>/ (no second copy on disk), task.json
                           (name, base, added, last trained, accuracy), state.npz (the trained task
                           state, bundle.TASK_STATE) and run/ (adapt's checkpoints)

Every command that takes a bundle folder takes a task folder as it is (`adapt --task NAME`).
Writes are crash-safe: a task or base is built under a dot-name `.partial` folder and renamed into
place; a replaced task is first renamed to `.NAME.old`, and opening the store finishes or rolls back
a swap a power cut interrupted, so a killed `task add` leaves the old state. One writer at a time
(`.lock`). Default location: $TASKEDGE_STORE, else ~/taskedge/store.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from . import bundle as B
from .fsutil import UserError, atomic_write_json, fsync_dir, one_line, sha256_file

TASK_RECORD = "task.json"
BASE_RECORD = "base.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Files of a bundle folder that are not the task's own and never move with it.
SKIP = {"run", TASK_RECORD}


def default_root() -> Path:
    return Path(os.environ.get("TASKEDGE_STORE") or Path.home() / "taskedge" / "store")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fault_pause() -> None:
    """TEST-ONLY hook (tests/faults): with TASKEDGE_FAULT_DELAY_TASK=SECONDS set, sleep between moving
    the old task aside and publishing the new one, so a test can SIGKILL there. Unset: a no-op."""
    delay = os.environ.get("TASKEDGE_FAULT_DELAY_TASK")
    if delay:
        import time
        time.sleep(float(delay))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise UserError(f"bad task name {one_line(name)!r}: use 1-64 letters, digits, '_', '-' or '.', "
                        "starting with a letter or digit")
    return name


def verify_own(folder: Path, manifest: B.Manifest, fix: str) -> List[str]:
    """The task's own files (the manifest's, base files aside), each checked against its sha256."""
    own = [n for n in manifest.files if n not in B.BASE_FILES]
    for n in own:
        p = B.safe_member(folder, n)
        meta = manifest.files[n]
        if not p.is_file() or not isinstance(meta, dict) or sha256_file(p) != meta.get("sha256"):
            raise UserError(f"{p}: {'missing' if not p.is_file() else 'sha256 mismatch'}; {fix}")
    return own


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (the same bytes on disk), or a copy where the file system has no links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class TaskStore:
    def __init__(self, root=None):
        self.root = Path(root) if root else default_root()
        if self.root.is_dir() and os.access(self.root, os.W_OK):
            with contextlib.suppress(UserError):          # a writer is busy: it recovers, not us
                with self.writing():
                    pass

    # -- layout ------------------------------------------------------------------
    @property
    def tasks_dir(self) -> Path:
        return self.root / "tasks"

    @property
    def bases_dir(self) -> Path:
        return self.root / "bases"

    def task_dir(self, name: str) -> Path:
        d = self.tasks_dir / check_name(name)
        if not (d / TASK_RECORD).is_file():
            have = ", ".join(self.names()) or "none"
            raise UserError(f"no task {name!r} in {self.root} (tasks: {have}); add it with `taskedge task add PACK`")
        return d

    def names(self) -> List[str]:
        if not self.tasks_dir.is_dir():
            return []
        return sorted(p.name for p in self.tasks_dir.iterdir() if not p.name.startswith(".") and p.is_dir())

    def bases(self) -> List[str]:
        if not self.bases_dir.is_dir():
            return []
        return sorted(p.name for p in self.bases_dir.iterdir() if (p / BASE_RECORD).is_file())

    # -- crash recovery and the writer lock -----------------------------------------
    def recover(self) -> None:
        """(Under the writer lock.) Finish or roll back what a killed writer left: `.X.old` without X
        goes back to X (the swap had not published the new one), else it is removed; `.partial`
        folders are removed."""
        for folder in (self.tasks_dir, self.bases_dir):
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                continue
            for p in folder.iterdir():
                if p.name.endswith(".partial"):
                    shutil.rmtree(p, ignore_errors=True)
                elif p.name.startswith(".") and p.name.endswith(".old"):
                    live = folder / p.name[1:-len(".old")]
                    if live.exists():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        os.replace(p, live)
            fsync_dir(folder)

    @contextlib.contextmanager
    def writing(self):
        import fcntl
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(str(self.root / ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write the task store {self.root}: {e.strerror or e} "
                            "(give a writable --store)") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f"the task store {self.root} is in use by another `taskedge task` command; "
                                "wait for it") from None
            self.recover()
            yield
        finally:
            os.close(fd)

    def _publish(self, stage: Path, dest: Path) -> None:
        """Rename the finished `stage` onto `dest`; an old `dest` goes through `.dest.old`."""
        for dirpath, _dirs, _files in os.walk(stage):
            fsync_dir(Path(dirpath))
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            os.replace(dest, old)
            fsync_dir(dest.parent)
            fault_pause()                     # test-only: the window where neither name is the live task
        os.replace(stage, dest)
        fsync_dir(dest.parent)
        shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _stage(folder: Path, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=str(folder)))

    # -- bases -------------------------------------------------------------------------
    def base_record(self, base: str) -> Optional[dict]:
        try:
            return json.loads((self.bases_dir / base / BASE_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def check_base(self, manifest: B.Manifest, source: str) -> Path:
        """The store's folder of the manifest's base, its files checked against the manifest's sha256s."""
        bid = B.base_id(manifest)
        folder = self.bases_dir / bid
        if self.base_record(bid) is None:
            have = ", ".join(f"{b[:12]} ({(self.base_record(b) or {}).get('model', '?')})" for b in self.bases())
            raise UserError(
                f"{source}: its base {bid[:12]} ({manifest.model_name}) is not on this board (bases here: "
                f"{have or 'none'}); ship the base once: `taskedge pack BUNDLE --profile P -o base.tar` and "
                f"`taskedge flash base.tar user@board` (or `taskedge task add BUNDLE` with the full bundle)")
        for name in self._base_files(manifest):
            p = folder / name
            if not p.is_file() or sha256_file(p) != manifest.files[name]["sha256"]:
                raise UserError(f"{p}: the stored base {bid[:12]} is damaged (sha256 mismatch); re-add it from "
                                "the full bundle: `taskedge task add BUNDLE` or re-flash the base")
        return folder

    @staticmethod
    def _base_files(manifest: B.Manifest) -> List[str]:
        return [n for n in B.BASE_FILES if n in manifest.files]

    def add_base(self, bundle_dir: Path, manifest: B.Manifest) -> str:
        """Store the base files of a full bundle (hard-linked where possible), verified; returns its id."""
        bid = B.base_id(manifest)
        if self.base_record(bid) is not None:
            return bid
        stage = self._stage(self.bases_dir, bid)
        try:
            for name in self._base_files(manifest):
                src = B.safe_member(bundle_dir, name)
                if not src.is_file():
                    raise UserError(f"{src}: missing; the bundle's base is incomplete (re-copy the bundle)")
                link_or_copy(src, stage / name)
                if sha256_file(stage / name) != manifest.files[name]["sha256"]:
                    raise UserError(f"{src}: sha256 mismatch; re-copy the bundle from the host")
            atomic_write_json(stage / BASE_RECORD, {
                "schema": "taskedge.base", "schema_version": 1, "id": bid, "model": manifest.model_name,
                "files": {n: manifest.files[n] for n in self._base_files(manifest)}, "added": now()})
            self._publish(stage, self.bases_dir / bid)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return bid

    # -- tasks ---------------------------------------------------------------------------
    def add_task(self, source: Path, name: str, replace: bool = False, record: Optional[dict] = None) -> dict:
        """Install the task in the folder `source` (a full bundle, or an unpacked task pack) as `name`."""
        source = Path(source)
        check_name(name)
        manifest = B.read_manifest(source)
        if manifest.schema_version < 3:
            raise UserError(f"{source}: bundle schema {manifest.schema_version} keeps the task's constants in "
                            "weights.bin (no base/task split); export it again with this taskedge")
        dest = self.tasks_dir / name
        if dest.exists() and not replace:
            raise UserError(f"task {name!r} is already on this board; give --replace to replace it, "
                            "or another --name")
        own = verify_own(source, manifest, "re-create the task pack (`taskedge task export`) and copy it again")
        full = all((source / n).is_file() for n in self._base_files(manifest))
        if full:
            self.add_base(source, manifest)
        base = self.check_base(manifest, str(source))
        digest = B.allocation_digest(source, manifest)
        extra = [n for n in (B.TASK_STATE,) if (source / n).is_file()]
        if extra:
            B.read_task_state(source / B.TASK_STATE, manifest, digest)       # refuses a state of another export
        stage = self._stage(self.tasks_dir, name)
        try:
            for n in own:
                self._shared_copy(source / n, stage / n, manifest.files[n]["sha256"])
            for n in [B.MANIFEST] + extra:
                shutil.copyfile(source / n, stage / n)
            for n in self._base_files(manifest):
                link_or_copy(base / n, stage / n)
            rec = {"schema": "taskedge.task", "schema_version": 1, "name": name, "base": B.base_id(manifest),
                   "model": manifest.model_name, "allocation": digest, "added": now(), "trained": None,
                   "accuracy": None}
            rec.update({k: v for k, v in (record or {}).items() if k in ("trained", "accuracy")})
            atomic_write_json(stage / TASK_RECORD, rec)
            self._publish(stage, dest)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        self.collect()                        # the replaced task's blobs, and those of an add that died
        return rec

    def _shared_copy(self, src: Path, dst: Path, sha: str) -> None:
        """`dst` as a hard link to the store's one copy of these bytes (blobs/<sha256>): tasks with the
        same head shape share base_model.onnx, re-added tasks share everything."""
        blob = self.root / "blobs" / sha
        if blob.is_file():
            link_or_copy(blob, dst)
            return
        shutil.copyfile(src, dst)
        blob.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.link(dst, blob)

    def collect(self) -> int:
        """Remove the blobs no task links to any more; returns how many."""
        folder = self.root / "blobs"
        gone = [p for p in folder.iterdir() if p.is_file() and p.stat().st_nlink == 1] if folder.is_dir() else []
        for p in gone:
            p.unlink()
        return len(gone)

    def remove(self, name: str) -> None:
        d = self.task_dir(name)
        gone = d.with_name(f".{name}.removed.partial")
        os.replace(d, gone)                   # one rename: the task is gone at once; leftovers end in .partial
        fsync_dir(d.parent)
        shutil.rmtree(gone, ignore_errors=True)
        self.collect()

    def record(self, name: str) -> dict:
        try:
            return json.loads((self.task_dir(name) / TASK_RECORD).read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{self.tasks_dir / name / TASK_RECORD}: unreadable ({e}); re-add the task") from None

    def update_record(self, name: str, **fields) -> None:
        rec = self.record(name)
        rec.update(fields)
        atomic_write_json(self.task_dir(name) / TASK_RECORD, rec)

    # -- sizes -----------------------------------------------------------------------------
    def task_bytes(self, name: str) -> int:
        """The task's own bytes on disk (its base files are the base's, counted once there)."""
        d = self.tasks_dir / name
        return sum(p.stat().st_size for p in d.rglob("*")
                   if p.is_file() and not p.is_symlink() and p.relative_to(d).as_posix() not in B.BASE_FILES)

    def disk_bytes(self) -> int:
        """Bytes the whole store takes, each file counted once however many names it has."""
        seen: Dict[tuple, int] = {}
        for p in self.root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                seen[(st.st_dev, st.st_ino)] = st.st_size
        return sum(seen.values())

    def listing(self) -> List[dict]:
        out = []
        for name in self.names():
            try:
                rec = self.record(name)
            except UserError:
                rec = {"name": name, "base": "?", "damaged": True}
            rec["bytes"] = self.task_bytes(name)
            out.append(rec)
        return out
