"""Case 7 — bundle safety: names that escape the folder, links and hostile archives are refused;
nothing read from a bundle goes through pickle or eval."""
from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from taskedge.runtime import bundle as B
from taskedge.runtime.bundle import BundleError, load_bundle, manifest_digest, safe_member

RUNTIME = Path(B.__file__).parent


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../evil", "sub/../../../x", "", "a\x00b",
                                  "..\\evil"])
def test_safe_member_refuses_escapes(tmp_path, name):
    with pytest.raises(BundleError):
        safe_member(tmp_path, name)


def test_links_in_bundle_refused(mlp_bundle, tmp_path, record):
    b = tmp_path / "b"
    shutil.copytree(mlp_bundle, b)
    (tmp_path / "outside").write_bytes((b / B.STEP_MODEL).read_bytes())
    os.unlink(b / B.STEP_MODEL)
    os.symlink(tmp_path / "outside", b / B.STEP_MODEL)          # same bytes, so the hash would match
    with pytest.raises(BundleError, match="link"):
        load_bundle(b)
    os.unlink(b / B.STEP_MODEL)
    os.symlink(B.INITIAL_STATE, b / B.STEP_MODEL)                  # even a link inside the folder
    with pytest.raises(BundleError, match="link"):
        load_bundle(b)
    record("bundle: member is a symlink (outside / inside)", "refused", "refused both")


def _rewrite_manifest(folder, edit):
    raw = __import__("json").loads((folder / B.MANIFEST).read_text())
    edit(raw)
    raw[B.SELF_HASH] = manifest_digest(raw)                         # a consistent, deliberately hostile manifest
    (folder / B.MANIFEST).write_text(__import__("json").dumps(raw))


@pytest.mark.parametrize("hostile", ["../escape", "/etc/hostname", "omit step model"])
def test_hostile_manifest_refused(mlp_bundle, tmp_path, record, hostile):
    b = tmp_path / "b"
    shutil.copytree(mlp_bundle, b)
    if hostile == "omit step model":
        _rewrite_manifest(b, lambda m: m["files"].pop(B.STEP_MODEL))
    else:
        _rewrite_manifest(b, lambda m: m["files"].__setitem__(hostile, {"sha256": "0" * 64, "bytes": 1}))
    with pytest.raises(BundleError) as e:
        load_bundle(b)
    with pytest.raises(BundleError):
        load_bundle(b, verify=False)                                  # refused even without hashing
    record(f"bundle manifest: {hostile}", "refused", str(e.value).split(": ", 1)[-1][:60])


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _ti(name, data=b"x", **kw):
    ti = tarfile.TarInfo(name)
    ti.size = len(data) if data is not None and kw.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, (data if ti.size else None)


ARCHIVES = {
    "dot-dot": [_ti("../evil")],
    "absolute": [_ti("/tmp/taskedge-evil")],
    "symlink out": [_ti("bundle", type=tarfile.SYMTYPE, linkname="/etc")],
    "relative symlink out": [_ti("l", type=tarfile.SYMTYPE, linkname="../../x")],
    "write through link": [_ti("d", type=tarfile.SYMTYPE, linkname="."), _ti("d/../../evil")],
    "hard link out": [_ti("h", type=tarfile.LNKTYPE, linkname="../../etc/passwd")],
    "device": [_ti("dev", type=tarfile.CHRTYPE)],
}


@pytest.mark.parametrize("case", list(ARCHIVES))
def test_unpack_refuses_hostile_archives(tmp_path, record, case):
    from taskedge.tools.pack import PackError, unpack
    tar = _tar(tmp_path / "a.tar", ARCHIVES[case])
    dest = tmp_path / "deep" / "dest"
    before = set(p for p in tmp_path.rglob("*"))
    with pytest.raises(PackError) as e:
        unpack(tar, dest)
    after = set(p for p in tmp_path.rglob("*"))
    assert after - before <= {tmp_path / "deep"}, after - before     # nothing extracted anywhere
    assert not Path("/tmp/taskedge-evil").exists()
    record(f"unpack: {case}", "refused, nothing written", str(e.value).split("refusing to unpack: ")[-1][:60])


def test_no_pickle_or_eval_in_runtime(record):
    hits = []
    files = sorted(RUNTIME.rglob("*.py"))            # the packages under runtime/ (train/) too
    assert RUNTIME / "train" / "session.py" in files
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\b|allow_pickle\s*=\s*True|(?<![\w.])eval\(|(?<![\w.])exec\(|\bmarshal\b|"
                         r"\bshelve\b|\bdill\b|torch\.load", code):
                hits.append(f"{f.relative_to(RUNTIME)}:{i}: {line.strip()}")
        text = f.read_text()
        for m in re.finditer(r"np\.load\(", text):
            call = text[m.start(): text.find("\n", m.start())]
            if "allow_pickle=False" not in call:
                hits.append(f"{f.relative_to(RUNTIME)}: np.load without allow_pickle=False: {call.strip()}")
    record("runtime source: pickle / eval / exec / np.load", "none, np.load always allow_pickle=False",
           "clean" if not hits else "; ".join(hits)[:60])
    assert not hits, hits


def test_pickled_npz_is_refused_not_unpickled(mlp_bundle, tmp_path):
    from taskedge.runtime.data import load_dataset
    from taskedge.runtime.fsutil import UserError

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))
    np.savez(tmp_path / "evil.npz", x=np.array([Boom()] * 4, dtype=object), labels=np.zeros(4, np.int64))
    with pytest.raises(UserError, match="evil.npz"):
        load_dataset(tmp_path / "evil.npz", load_bundle(mlp_bundle), mlp_bundle)
    assert not (tmp_path / "PWNED").exists()
