"""`taskedge pack` / `taskedge flash`: one tar that carries everything a board needs.

    taskedge pack BUNDLE --profile jetson-orin-nano-8gb -o bundle.tar

bundle.tar holds

    SHA256SUMS      sha256 of every other member (`sha256sum -c SHA256SUMS` format)
    install.sh      board-side installer: safe unpack + sha256 check, venv, pip install the wheel
    profile.toml    the device profile the board should run with
    wheels/         a wheel of this project (the runtime; built offline, no dependencies bundled)
    bundle/         the bundle from `taskedge export` (its manifest hashes are checked before packing)

`unpack(tar, dest)` is the safe extractor: it refuses absolute names, `..`, links that leave
the target, device files and FIFOs, writes into a staging folder next to `dest`, checks
SHA256SUMS and only then renames the folder into place. The same functions are embedded
verbatim in install.sh, so the board needs nothing but Python 3.8+ to unpack.

`taskedge flash` (tools/flash.py, tools/flash.sh) is registered here as well.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from taskedge.runtime.fsutil import UserError, atomic_path

SUMS = "SHA256SUMS"
INSTALL = "install.sh"
PROFILE = "profile.toml"
BUNDLE_DIR = "bundle"
WHEELS_DIR = "wheels"
# Files and folders of the project that go into the runtime wheel build (copied to a temp dir,
# so the build never writes into the checkout and never picks up a stale build/ folder).
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "setup.py", "MANIFEST.in")
PROJECT_DIRS = ("runtime", "export", "tools", "device_profiles")


class PackError(UserError):
    pass


# ----------------------------------------------------------------------------------------------
# Safe extraction. Everything from here to `# end of embedded code` uses only the standard library
# and Python 3.8 syntax: install.sh embeds these functions verbatim (inspect.getsource).
# ----------------------------------------------------------------------------------------------

class UnsafeArchive(Exception):
    """The archive is malformed, tampered with or tries to write outside its target."""


def _within(root, path):
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _member_name(m):
    """The normalised relative name of a member, or raise UnsafeArchive."""
    name = m.name
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeArchive("member %r has an empty or unusual name" % (name,))
    if name.startswith("/") or os.path.isabs(name):
        raise UnsafeArchive("member %r has an absolute path" % (name,))
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive("member %r contains '..'" % (name,))
    return "/".join(parts)


def _check_link(name, m):
    """Symlinks must be relative and resolve inside the archive root, lexically."""
    target = m.linkname
    if not target or "\x00" in target or target.startswith("/") or os.path.isabs(target):
        raise UnsafeArchive("link %r points to an absolute path %r" % (name, target))
    if m.issym():
        joined = os.path.normpath(os.path.join(os.path.dirname(name), target))
    else:  # hard link: linkname is another member's name, relative to the archive root
        joined = os.path.normpath(target)
    if joined == ".." or joined.startswith("../") or os.path.isabs(joined):
        raise UnsafeArchive("link %r -> %r leaves the target folder" % (name, target))
    return joined


def _safe_extract(tar_path, dest):
    """Extract every member of `tar_path` into the existing, empty folder `dest`.

    Checks each member itself (no reliance on tarfile's extraction filters); file data is
    written with fsync. Returns the list of regular files written (relative names)."""
    files = []
    seen = set()
    with tarfile.open(tar_path, "r:*") as tar:
        for m in tar:
            name = _member_name(m)
            if not name:
                if m.isdir():
                    continue
                raise UnsafeArchive("member %r has no name" % (m.name,))
            if name in seen:
                raise UnsafeArchive("member %r appears twice" % (name,))
            seen.add(name)
            if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
                raise UnsafeArchive("member %r is a device or FIFO" % (name,))
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise UnsafeArchive("member %r has an unsupported type %r" % (name, m.type))
            target = os.path.join(dest, name)
            parent = os.path.dirname(target)
            if not _within(dest, parent):
                raise UnsafeArchive("member %r would be written through a link outside the target" % (name,))
            if os.path.lexists(target) and not (m.isdir() and os.path.isdir(target)
                                                and not os.path.islink(target)):
                raise UnsafeArchive("member %r would overwrite an earlier member" % (name,))
            os.makedirs(parent, exist_ok=True)
            if m.isdir():
                os.makedirs(target, exist_ok=True)
                os.chmod(target, 0o755)
            elif m.issym():
                _check_link(name, m)
                os.symlink(m.linkname, target)
                if not _within(dest, target):
                    raise UnsafeArchive("symlink %r -> %r leaves the target folder" % (name, m.linkname))
            elif m.islnk():
                src = os.path.join(dest, _check_link(name, m))
                if os.path.islink(src) or not os.path.isfile(src) or not _within(dest, src):
                    raise UnsafeArchive("hard link %r -> %r does not name an earlier file inside the "
                                        "archive" % (name, m.linkname))
                shutil.copyfile(src, target)
                files.append(name)
            else:
                src = tar.extractfile(m)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                             0o755 if m.mode & 0o111 else 0o644)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                files.append(name)
    # a later symlink can turn an earlier, harmless one into an escape: check all at the end
    for dirpath, dirnames, filenames in os.walk(dest):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.path.islink(p) and not _within(dest, p):
                raise UnsafeArchive("symlink %r leaves the target folder" % (os.path.relpath(p, dest),))
    return files


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_sums(folder, files, sums_name="SHA256SUMS"):
    """Every regular file but SHA256SUMS must be listed with the right sha256, and vice versa."""
    path = os.path.join(folder, sums_name)
    if not os.path.isfile(path) or os.path.islink(path):
        raise UnsafeArchive("%s is missing from the archive" % sums_name)
    listed = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            digest, sep, name = line.partition("  ")
            if not sep or len(digest) != 64:
                raise UnsafeArchive("%s line %d is malformed: %r" % (sums_name, i, line))
            listed[name.lstrip("*")] = digest.lower()
    present = set(f for f in files if f != sums_name)
    missing = sorted(set(listed) - present)
    extra = sorted(present - set(listed))
    if missing:
        raise UnsafeArchive("%s lists files the archive lacks: %s" % (sums_name, ", ".join(missing[:5])))
    if extra:
        raise UnsafeArchive("archive holds files %s does not list: %s" % (sums_name, ", ".join(extra[:5])))
    bad = [n for n in sorted(listed) if _sha256(os.path.join(folder, n)) != listed[n]]
    if bad:
        raise UnsafeArchive("sha256 mismatch for %s (corrupted or modified after packing)" % ", ".join(bad[:5]))
    return len(listed)


def _fsync_tree(folder):
    for dirpath, _dirs, _files in os.walk(folder):
        try:
            fd = os.open(dirpath, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _unpack(tar_path, dest):
    """Safe-extract into a staging folder next to `dest`, verify SHA256SUMS, rename into place.

    An existing `dest` is replaced only after the new one is complete and verified."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix="." + os.path.basename(dest) + ".", suffix=".partial", dir=parent)
    try:
        files = _safe_extract(tar_path, stage)
        count = _verify_sums(stage, files)
        _fsync_tree(stage)
        if os.path.lexists(dest):
            old = os.path.join(parent, "." + os.path.basename(dest) + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(stage, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, dest)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return count
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

# end of embedded code --------------------------------------------------------------------------


_EMBEDDED = (UnsafeArchive, _within, _member_name, _check_link, _safe_extract, _sha256, _verify_sums,
             _fsync_tree, _unpack)


def embedded_unpacker() -> str:
    """A standalone Python 3.8+ script: `python3 - TAR DEST` unpacks safely and verifies."""
    body = "\n\n".join(inspect.getsource(obj) for obj in _EMBEDDED)
    return ("import hashlib, os, shutil, sys, tarfile, tempfile\n\n" + body +
            "\n\nif __name__ == '__main__':\n"
            "    try:\n"
            "        n = _unpack(sys.argv[1], sys.argv[2])\n"
            "    except (UnsafeArchive, tarfile.TarError, OSError) as e:\n"
            "        sys.exit('unpack: refusing %s: %s' % (sys.argv[1], e))\n"
            "    print('unpacked %s -> %s (%d files, sha256 verified)' % (sys.argv[1], sys.argv[2], n))\n")


def unpack(tar, dest) -> Dict[str, object]:
    """Safely extract a pack into `dest` (replaced atomically) and verify its SHA256SUMS."""
    tar, dest = Path(tar), Path(dest)
    if not tar.is_file():
        raise PackError(f"archive not found: {tar} (give the -o file of `taskedge pack`)")
    try:
        count = _unpack(str(tar), str(dest))
    except UnsafeArchive as e:
        raise PackError(f"{tar}: refusing to unpack: {e}; re-create it with `taskedge pack`") from None
    except tarfile.TarError as e:
        raise PackError(f"{tar}: not a readable tar archive ({e}); re-copy it from the host") from None
    return {"archive": str(tar), "dest": str(dest), "files": count, "verified": True}


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

def project_root() -> Path:
    """The source checkout this package runs from (tools/ sits at its top level)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "runtime").is_dir():
        raise PackError(f"cannot find the TaskEdge source tree next to {Path(__file__).parent} "
                        "(this installed copy is not a checkout); run `taskedge pack` from a clone "
                        "installed with `pip install -e .`, or pass --wheel PATH")
    return root


def build_wheel(out_dir, root: Optional[Path] = None, python: str = sys.executable) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of the project, offline, from a clean copy.

    The copy holds only the packaged folders, so the build neither writes into the checkout
    nor packs a stale build/ folder; no index is contacted (setuptools comes from this venv)."""
    root = Path(root) if root else project_root()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="taskedge-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for f in PROJECT_FILES:
            if (root / f).is_file():
                shutil.copy2(root / f, src / f)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*")
        for d in PROJECT_DIRS:
            if (root / d).is_dir():
                shutil.copytree(root / d, src / d, ignore=ignore)
        if not (src / "README.md").exists():  # pyproject names it as the readme
            (src / "README.md").write_text("TaskEdge\n", encoding="utf-8")
        build = Path(tmp) / "dist"
        env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
                   PIP_NO_CACHE_DIR="1", SOURCE_DATE_EPOCH=os.environ.get("SOURCE_DATE_EPOCH", "315532800"))
        env.pop("PIP_FIND_LINKS", None)
        cmd = [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
               "-w", str(build), str(src)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        wheels = sorted(build.glob("taskedge-*.whl"))
        if r.returncode != 0 or not wheels:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise PackError("building the runtime wheel failed: " + " | ".join(tail) +
                            "; install the build tools into this venv (`pip install 'setuptools>=64' wheel`)"
                            " or pass a prebuilt wheel with --wheel")
        dest = out_dir / wheels[0].name
        with atomic_path(dest) as t:
            shutil.copyfile(wheels[0], t)
        return dest


INSTALL_SH = r'''#!/usr/bin/env bash
# TaskEdge board installer (written by `taskedge pack`). Needs bash, Python >= 3.8 with venv.
#
#   bash install.sh --tar bundle.tar [--prefix ~/taskedge] [--python python3]
#                   [--no-deps] [--system-site-packages] [--ort-wheel PATH]
#   (read it straight from the archive: tar -xOf bundle.tar install.sh | bash -s -- --tar bundle.tar)
#
# 1. unpacks the archive safely into PREFIX/release (no absolute paths, no '..', no links leaving
#    the folder, no device files) and checks every file against SHA256SUMS; the previous release is
#    replaced only once the new one is verified;
# 2. creates the venv PREFIX/venv (once) and pip-installs the runtime wheel from release/wheels:
#    `pip install WHEEL[board]` (numpy, psutil and the CPU onnxruntime wheel, aarch64 or x86_64) if the
#    venv has no onnxruntime yet; plain `pip install WHEEL` if it has one (e.g. NVIDIA's onnxruntime-gpu
#    from --ort-wheel or --system-site-packages), so pip never puts the CPU build over it;
# 3. prints the commands to run. PREFIX/runs is the place for checkpoints (survives re-flashing).
# The runtime needs an onnxruntime inference build (>= 1.17), never onnxruntime-training or torch.
#
# --no-deps               install only the runtime wheel, no dependencies and no index: for an offline
#                         board whose --python already has numpy, psutil, onnxruntime (tomli below 3.11);
#                         use it with --system-site-packages (an --ort-wheel is then installed --no-deps).
# --system-site-packages  the venv sees the packages of --python: `python -m venv
#                         --system-site-packages`, and if --python is itself a venv, its
#                         site-packages are added through a .pth file (venvs do not chain).
# --ort-wheel PATH        pip install this onnxruntime wheel first: for the CUDA EP on a Jetson,
#                         NVIDIA's onnxruntime-gpu wheel for your JetPack (Jetson Zoo /
#                         pypi.jetson-ai-lab); the runtime wheel then goes in without the extra.
set -euo pipefail
exec 1>&2   # progress goes to stderr; stdout stays free for the caller (e.g. doctor --json)

TAR="" PREFIX="${HOME}/taskedge" PY="python3" NODEPS=0 SYSSITE=0 ORTWHEEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tar) TAR="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --no-deps) NODEPS=1; shift ;;
    --system-site-packages) SYSSITE=1; shift ;;
    --ort-wheel) ORTWHEEL="$2"; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0" 2>/dev/null || true; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)"; exit 2 ;;
  esac
done
case "$PREFIX" in "~") PREFIX="$HOME" ;; "~/"*) PREFIX="$HOME/${PREFIX#\~/}" ;; esac
[ -n "$TAR" ] || { echo "install.sh: give --tar bundle.tar (the archive made by taskedge pack)"; exit 2; }
[ -f "$TAR" ] || { echo "install.sh: archive not found: $TAR"; exit 2; }
command -v "$PY" >/dev/null 2>&1 || { echo "install.sh: python not found: $PY (pass --python /path/to/python3)"; exit 2; }
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 8) else 1)' \
  || { echo "install.sh: $PY is older than Python 3.8; pass --python with a newer one"; exit 2; }
mkdir -p "$PREFIX/runs"
PREFIX="$(cd "$PREFIX" && pwd -P)"

echo "[1/3] unpacking $TAR -> $PREFIX/release (safe extraction, sha256 check)"
"$PY" - "$TAR" "$PREFIX/release" <<'TASKEDGE_UNPACK_PY'
@@UNPACKER@@
TASKEDGE_UNPACK_PY

VENV="$PREFIX/venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[2/3] creating venv $VENV"
  if [ "$SYSSITE" = 1 ]; then "$PY" -m venv --system-site-packages "$VENV"; else "$PY" -m venv "$VENV"; fi
else
  echo "[2/3] reusing venv $VENV"
fi
if [ "$SYSSITE" = 1 ]; then
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$PY" -c 'import site, sys
if sys.prefix != sys.base_prefix:
    print("\n".join(p for p in site.getsitepackages()))' > "$SITE/_taskedge_inherit.pth"
  [ -s "$SITE/_taskedge_inherit.pth" ] || rm -f "$SITE/_taskedge_inherit.pth"
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
if [ -n "$ORTWHEEL" ]; then
  echo "      installing ONNX Runtime wheel $ORTWHEEL"
  if [ "$NODEPS" = 1 ]; then "${PIP[@]}" install -q --no-deps "$ORTWHEEL"; else "${PIP[@]}" install -q "$ORTWHEEL"; fi
fi
WHEEL="$(ls "$PREFIX"/release/wheels/taskedge-*.whl | head -n 1)"
# does the venv already see an onnxruntime (onnxruntime-gpu, a CPU wheel, an inherited one)?
has_ort() { "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("onnxruntime") is None)'; }
"${PIP[@]}" uninstall -q -y taskedge >/dev/null 2>&1 || true
if [ "$NODEPS" = 1 ]; then
  echo "[3/3] installing $(basename "$WHEEL") (--no-deps)"
  "${PIP[@]}" install -q --no-deps --no-index "$WHEEL"
elif has_ort; then
  echo "[3/3] installing $(basename "$WHEEL") (keeping the venv's onnxruntime)"
  "${PIP[@]}" install -q "$WHEEL"
else
  echo "[3/3] installing $(basename "$WHEEL")[board] (with the CPU onnxruntime wheel)"
  "${PIP[@]}" install -q "$WHEEL[board]"
fi
has_ort || { echo "install.sh: no onnxruntime in $VENV: run without --no-deps, or pass --ort-wheel PATH"; exit 1; }
"$VENV/bin/python" -c 'import sys, taskedge.runtime.trainer
assert not [m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith("onnxruntime.training")]' \
  || { echo "install.sh: the runtime does not import (or it loaded torch); see the output above"; exit 1; }

echo "installed. Next:"
echo "  $VENV/bin/taskedge doctor --profile $PREFIX/release/profile.toml"
echo "  $VENV/bin/taskedge adapt $PREFIX/release/bundle --profile $PREFIX/release/profile.toml \\"
echo "      --data DATA.npz --run-dir $PREFIX/runs/\$(date +%Y%m%d-%H%M%S)"
'''


def install_script() -> str:
    return INSTALL_SH.replace("@@UNPACKER@@", embedded_unpacker().rstrip("\n"))


def _profile_text(name: str):
    from taskedge.runtime.profiles import load_profile
    p = load_profile(name)
    if not p.path or not os.path.isfile(p.path):  # zipped package data: write it from the dict
        from taskedge.runtime.profiles import profile_to_toml
        return p, profile_to_toml(p.to_dict(), comment=f"TaskEdge device profile {p.name}")
    return p, Path(p.path).read_text(encoding="utf-8")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644, mtime: float = 0) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = path.stat().st_size, 0o644, int(mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with open(path, "rb") as f:
        tar.addfile(info, f)


def pack(bundle, profile: str, out, wheel: Optional[str] = None,
         log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Dict[str, object]:
    """Verify `bundle`, build the runtime wheel and write the archive `out` atomically."""
    from taskedge.runtime.bundle import load_bundle
    t0 = time.perf_counter()
    bundle = Path(bundle)
    manifest = load_bundle(bundle, verify=True)  # BundleError (a UserError) names the problem and fix
    prof, prof_text = _profile_text(profile)
    bundle_files: List[Path] = []
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle)
        if rel.parts[0] in ("run",) or any(part.startswith(".") for part in rel.parts):
            continue  # a previous local run's checkpoints and temp files do not ship
        if p.is_symlink():
            raise PackError(f"{p}: bundles must not contain symlinks; re-export the bundle")
        if p.is_file():
            bundle_files.append(p)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="taskedge-pack-") as tmp:
        if wheel:
            whl = Path(wheel)
            if not whl.is_file() or not whl.name.endswith(".whl"):
                raise PackError(f"--wheel {wheel}: not a .whl file")
        else:
            log("building the runtime wheel (offline, no deps)")
            whl = build_wheel(tmp)
        install = install_script().encode("utf-8")
        members: Dict[str, object] = {INSTALL: install, PROFILE: prof_text.encode("utf-8"),
                                      f"{WHEELS_DIR}/{whl.name}": whl}
        for p in bundle_files:
            members[f"{BUNDLE_DIR}/{p.relative_to(bundle).as_posix()}"] = p
        sums = {}
        for name, src in members.items():
            sums[name] = hashlib.sha256(src).hexdigest() if isinstance(src, bytes) else _sha256(str(src))
        sums_text = "".join(f"{sums[n]}  {n}\n" for n in sorted(sums)).encode("utf-8")
        mtime = time.time()
        mode = "w:gz" if out.name.endswith((".tar.gz", ".tgz")) else "w"
        with atomic_path(out) as t:
            with tarfile.open(t, mode, format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, SUMS, sums_text, mtime=mtime)
                for name in sorted(members, key=lambda n: (n != INSTALL, n != PROFILE, n)):
                    src = members[name]
                    if isinstance(src, bytes):
                        _add_bytes(tar, name, src, 0o755 if name == INSTALL else 0o644, mtime)
                    else:
                        _add_file(tar, name, Path(src), mtime)
    log(f"wrote {out}")
    return {"out": str(out), "bytes": out.stat().st_size, "bundle": str(bundle), "model": manifest.model_name,
            "profile": prof.name, "wheel": whl.name, "members": len(sums) + 1,
            "sha256": _sha256(str(out)), "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def cmd_pack(a) -> int:
    res = pack(a.bundle, a.profile, a.out, wheel=a.wheel,
               log=(lambda m: None) if a.json else (lambda m: print(m, file=sys.stderr)))
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['out']}: {res['bytes']} bytes, {res['members']} members (bundle {res['model']}, "
              f"profile {res['profile']}, {res['wheel']}) in {res['seconds']} s; sha256 {res['sha256']}")
    return 0


def cmd_unpack(a) -> int:
    res = unpack(a.archive, a.dest)
    print(json.dumps(res, indent=2) if a.json else f"unpacked {res['archive']} -> {res['dest']} "
                                                    f"({res['files']} files, sha256 verified)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pack", help="host: one tar with the bundle, a device profile, the runtime wheel, "
                                    "install.sh and SHA256SUMS",
                       description="Verify BUNDLE, build the runtime wheel (offline) and write a tar for "
                                   "`taskedge flash` or a manual copy to the board.")
    p.add_argument("bundle", help="bundle folder (from `taskedge export`)")
    p.add_argument("--profile", required=True, help="device profile name or .toml the board will use")
    p.add_argument("-o", "--out", required=True, help="archive to write (.tar, or .tar.gz to compress)")
    p.add_argument("--wheel", help="use this prebuilt taskedge wheel instead of building one")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(fn=cmd_pack)

    u = sub.add_parser("unpack", help="safely extract a pack and verify its SHA256SUMS")
    u.add_argument("archive")
    u.add_argument("dest", help="folder to create (replaced atomically)")
    u.add_argument("--json", action="store_true")
    u.set_defaults(fn=cmd_unpack)

    from . import flash
    flash.register(sub)
