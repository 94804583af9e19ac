"""Task packs: one task's own files in a tar, KB to MB, without the base it runs on.

    taskedge task export BUNDLE|NAME -o sentiment.task.tar     host (a bundle) or board (a stored task)
    taskedge task add sentiment.task.tar                       board: refused unless its base is stored
    taskedge tasks / taskedge task remove NAME

A pack holds

    SHA256SUMS        sha256 of every other member (checked by the safe extractor, tools/unpack.py)
    task.json         name, base id, model, last trained, accuracy (runtime/store.py's record)
    manifest.json     the bundle manifest (it lists the base files' sha256s: the base it needs)
    step_model.onnx, eval_model.onnx, base_model.onnx, task_weights.bin, initial_state.npz,
    allocation.npz    the task's own bundle files (runtime/bundle.py), never weights.bin/tokenizer.json
    state.npz         the trained task state, when the task was trained (bundle.TASK_STATE)

`task add` reads task.json and manifest.json from the tar first and refuses (exit 2, nothing
written) a pack whose base is not in the store, naming the fix; only then is it extracted (into a
staging folder of the store) and installed (runtime/store.py).
"""
from __future__ import annotations

import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict

from taskedge.runtime import bundle as B
from taskedge.runtime.fsutil import UserError, atomic_path, one_line, sha256_file
from taskedge.runtime.store import TASK_RECORD, TaskStore, check_name, now
from taskedge.tools import unpack as extractor

MAX_META = 16 << 20          # manifest.json / task.json larger than this are not read into memory


def _members(source: str, store: TaskStore, name=None):
    """(folder, task record, file names) of a stored task NAME or of a bundle folder."""
    folder = Path(source)
    stored = not folder.is_dir()
    if not stored:
        manifest = B.read_manifest(folder)
        if manifest.schema_version < 3:
            raise UserError(f"{folder}: bundle schema {manifest.schema_version} has no base/task split; export it "
                            "again with this taskedge")
        rec = {"schema": "taskedge.task", "schema_version": 1, "name": name or folder.resolve().name,
               "base": B.base_id(manifest), "model": manifest.model_name, "added": now(), "trained": None,
               "accuracy": None}
    else:
        folder = store.task_dir(source)
        manifest = B.read_manifest(folder)
        rec = dict(store.record(source), name=name or source)
    check_name(rec["name"])
    names = [B.MANIFEST] + [n for n in manifest.files if n not in B.BASE_FILES]
    if stored and (folder / B.TASK_STATE).is_file():
        names.append(B.TASK_STATE)
    for n in names:
        p = B.safe_member(folder, n)
        if n in manifest.files and (not p.is_file() or sha256_file(p) != manifest.files[n]["sha256"]):
            raise UserError(f"{p}: missing or changed since export (sha256); re-export the task")
    return folder, rec, names


def export_pack(source: str, out, store: TaskStore, name=None) -> Dict[str, object]:
    folder, rec, names = _members(source, store, name)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"-o {out} is a folder; give the pack's file name, e.g. -o {out / (rec['name'] + '.task.tar')}")
    with tempfile.TemporaryDirectory(prefix="taskedge-task-") as tmp:
        files = {n: folder / n for n in names}
        files[TASK_RECORD] = Path(tmp) / TASK_RECORD
        files[TASK_RECORD].write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
        sums = Path(tmp) / extractor.SUMS
        sums.write_text("".join(f"{sha256_file(files[n])}  {n}\n" for n in sorted(files)), encoding="utf-8")
        mode = "w:gz" if out.name.endswith((".gz", ".tgz")) else "w"        # .tar.gz: graphs compress 3-4x
        with atomic_path(out) as t, tarfile.open(t, mode, format=tarfile.PAX_FORMAT) as tar:
            for n, p in [(extractor.SUMS, sums)] + sorted(files.items()):
                info = tar.gettarinfo(str(p), arcname=n)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)
    return {"out": str(out), "bytes": out.stat().st_size, "name": rec["name"], "base": rec["base"],
            "model": rec["model"], "files": {n: (folder / n).stat().st_size for n in names},
            "trained": rec.get("trained")}


def _read_member(tar: tarfile.TarFile, name: str, pack: Path):
    try:
        m = tar.getmember(name)
    except KeyError:
        raise UserError(f"{pack}: no {name} in it; not a task pack (make one with `taskedge task export`)") from None
    if not m.isfile() or m.size > MAX_META:
        raise UserError(f"{pack}: {name} is not a plain file of sane size; re-create the pack")
    try:
        return json.loads(tar.extractfile(m).read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{pack}: {name} is corrupted ({one_line(e)}); re-create the pack") from None


def precheck(pack: Path, store: TaskStore):
    """Manifest and record from the tar (nothing written), and the base check."""
    try:
        with tarfile.open(pack, "r:*") as tar:
            raw, rec = _read_member(tar, B.MANIFEST, pack), _read_member(tar, TASK_RECORD, pack)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{pack}: not a readable task pack ({one_line(e)}); copy it again") from None
    try:
        manifest = B.Manifest.from_dict(raw) if isinstance(raw, dict) and raw.get("schema") == B.SCHEMA else None
    except (TypeError, KeyError, AttributeError, ValueError):
        manifest = None
    if manifest is None or not isinstance(rec, dict) or not isinstance(manifest.files, dict):
        raise UserError(f"{pack}: its manifest.json or task.json is not TaskEdge's; re-create the pack")
    if rec.get("base") != B.base_id(manifest):
        raise UserError(f"{pack}: task.json names base {str(rec.get('base'))[:12]} but its manifest's base is "
                        f"{B.base_id(manifest)[:12]}; the pack was altered: re-create it with `taskedge task export`")
    store.check_base(manifest, str(pack))
    return manifest, rec


def add(source: str, store: TaskStore, name=None, replace: bool = False) -> dict:
    """Install a task pack (.tar) or a bundle / task folder into the store."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source}: not found; give a task pack (.tar from `taskedge task export`) or a bundle folder")
    if path.is_dir():
        with store.writing():
            return store.add_task(path, name or path.resolve().name, replace)
    _, rec = precheck(path, store)                      # refusals before the store is touched at all
    name = check_name(name or str(rec.get("name", "")))
    with store.writing():
        if (store.tasks_dir / name).exists() and not replace:
            raise UserError(f"task {name!r} is already on this board; give --replace to replace it, or --name")
        store.tasks_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".incoming.", suffix=".partial", dir=str(store.tasks_dir)))
        try:
            try:
                extractor.unpack(str(path), str(stage / "pack"))
            except (extractor.UnsafeArchive, tarfile.TarError) as e:
                raise UserError(f"{path}: refusing the pack: {one_line(e)}; re-create it with `taskedge task export`") \
                    from None
            return store.add_task(stage / "pack", name, replace, record=rec)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _print(obj, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else text)


def _accuracy(rec: dict) -> str:
    acc = rec.get("accuracy")
    return f"{acc['value']:.4f}" if isinstance(acc, dict) and isinstance(acc.get("value"), (int, float)) else "-"


def cmd_tasks(a) -> int:
    store = TaskStore(a.store)
    rows = store.listing()
    if a.json:
        _print({"store": str(store.root), "bases": store.bases(), "tasks": rows, "disk_bytes": store.disk_bytes()},
               True, "")
        return 0
    print(f"{'task':20s} {'base':12s} {'model':28s} {'bytes':>10s} {'accuracy':>8s}  last trained")
    for r in rows:
        trained = r.get("trained") or {}
        print(f"{r['name']:20s} {str(r.get('base'))[:12]:12s} {str(r.get('model'))[:28]:28s} {r['bytes']:10,d} "
              f"{_accuracy(r):>8s}  {trained.get('at', 'never')}"
              f"{' (%s steps)' % trained['steps'] if trained.get('steps') else ''}")
    print(f"{len(rows)} task(s), {len(store.bases())} base(s), {store.disk_bytes():,d} bytes on disk in {store.root}")
    return 0


def cmd_task_add(a) -> int:
    t0 = time.perf_counter()
    rec = add(a.source, TaskStore(a.store), a.name, a.replace)
    _print(rec, a.json, f"added task {rec['name']} (base {rec['base'][:12]}, {rec['model']}) "
                        f"in {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_task_remove(a) -> int:
    store = TaskStore(a.store)
    with store.writing():
        store.remove(a.name)
    _print({"removed": a.name}, a.json, f"removed task {a.name}")
    return 0


def cmd_task_export(a) -> int:
    res = export_pack(a.source, a.out, TaskStore(a.store), a.name)
    _print(res, a.json, f"wrote {res['out']}: task {res['name']}, {res['bytes']:,d} bytes "
                        f"(base {res['base'][:12]} not included)")
    return 0


def _store_flag(p) -> None:
    p.add_argument("--store", help="task store folder (default $TASKEDGE_STORE, else ~/taskedge/store)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub) -> None:
    t = sub.add_parser("tasks", help="board: the tasks in the store (base, size, accuracy, last trained)")
    _store_flag(t)
    t.set_defaults(fn=cmd_tasks)
    task = sub.add_parser("task", help="board/host: add, remove or export a task (many tasks share one base)")
    ts = task.add_subparsers(dest="task_cmd", metavar="add|remove|export")
    ad = ts.add_parser("add", help="install a task pack (or a full bundle, whose base is stored too)",
                       description="Install SOURCE into the store: a task pack from `taskedge task export` (its "
                                   "base must be on the board already) or a bundle folder (its base is stored "
                                   "once, hard-linked). Crash-safe: a killed add leaves the old state.")
    ad.add_argument("source", help="task pack .tar, or a bundle folder")
    ad.add_argument("--name", help="task name (default: the pack's, or the folder's name)")
    ad.add_argument("--replace", action="store_true", help="replace a task of the same name")
    _store_flag(ad)
    ad.set_defaults(fn=cmd_task_add)
    rm = ts.add_parser("remove", help="remove a task (its base and the other tasks stay)")
    rm.add_argument("name")
    _store_flag(rm)
    rm.set_defaults(fn=cmd_task_remove)
    ex = ts.add_parser("export", help="write a task pack: the task's own files, never its base",
                       description="SOURCE is a bundle folder (host: a new task for a base the board has) or the "
                                   "name of a stored task (board: with its trained state, to move or back up).")
    ex.add_argument("source", help="bundle folder or stored task name")
    ex.add_argument("-o", "--out", required=True, help="pack file to write (.tar, or .tar.gz to compress)")
    ex.add_argument("--name", help="task name in the pack (default: the task's, or the folder's name)")
    _store_flag(ex)
    ex.set_defaults(fn=cmd_task_export)


if __name__ == "__main__":
    sys.exit("use `taskedge task ...`")
