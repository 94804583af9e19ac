"""`taskedge pack` / `taskedge unpack`: one tar that carries everything a board needs.

    taskedge pack BUNDLE --profile jetson-orin-nano-8gb -o bundle.tar

bundle.tar holds

    SHA256SUMS      sha256 of every other member (`sha256sum -c SHA256SUMS` format)
    install.sh      the board-side installer (tools/install.sh): safe unpack, venv, pip install the wheel
    installer/      unpack.py (tools/unpack.py) and fsutil.py (runtime/fsutil.py): the checked extractor
                    install.sh runs with the board's Python before the runtime is installed
    profile.toml    the device profile the board should run with
    wheels/         a wheel of this project (the runtime; built offline, no dependencies bundled)
    bundle/         the bundle from `taskedge export` (its manifest hashes are checked before packing)

`taskedge unpack` runs the same extractor on the host. The archive is written under a temporary
name and renamed when complete. `taskedge flash` (tools/flash.py, tools/flash.sh) is registered here.
"""
from __future__ import annotations

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

from taskedge.runtime import fsutil
from taskedge.runtime.flags import arg_type, out_path
from taskedge.runtime.fsutil import UserError, atomic_path, sha256_file
from taskedge.tools import unpack as extractor

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


def installer_files() -> Dict[str, Path]:
    """Archive name -> source file of the installer members (real files of this package)."""
    files = {INSTALL: Path(__file__).with_name("install.sh"), "installer/unpack.py": Path(extractor.__file__),
             "installer/fsutil.py": Path(fsutil.__file__)}
    for name, path in files.items():
        if not path.is_file():
            raise PackError(f"{path} is missing from this install (needed for {name}); reinstall taskedge "
                            "from a checkout (`pip install -e .`), which ships tools/*.sh as package data")
    return files


def unpack(tar, dest) -> Dict[str, object]:
    """Safely extract a pack into `dest` (replaced atomically) and verify its SHA256SUMS."""
    tar, dest = Path(tar), Path(dest)
    if not tar.is_file():
        raise PackError(f"archive not found: {tar} (give the -o file of `taskedge pack`)")
    if os.path.lexists(dest) and not dest.is_dir():
        raise PackError(f"{dest} exists and is not a folder; give a folder to create or replace")
    try:
        count = extractor.unpack(str(tar), str(dest))
    except extractor.UnsafeArchive as e:
        raise PackError(f"{tar}: refusing to unpack: {e}; re-create it with `taskedge pack`") from None
    except tarfile.TarError as e:
        raise PackError(f"{tar}: not a readable tar archive ({' '.join(str(e).split())}); re-copy it from the host") from None
    return {"archive": str(tar), "dest": str(dest), "files": count, "verified": True,
            "tarfile_data_filter": extractor.DATA_FILTER is not None}


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


def check_wheel(path: Path) -> None:
    """--wheel must be a taskedge wheel: a zip named taskedge-*.whl holding taskedge's METADATA."""
    import zipfile
    fix = "give the taskedge-*.whl that `pip wheel --no-deps .` writes, or drop --wheel to build one"
    if not (path.is_file() and path.name.startswith("taskedge-") and path.name.endswith(".whl")):
        raise PackError(f"--wheel {path}: not a taskedge-*.whl file; {fix}")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise PackError(f"--wheel {path}: not a readable wheel ({e}); {fix}") from None
    if not any(n.startswith("taskedge-") and n.endswith(".dist-info/METADATA") for n in names):
        raise PackError(f"--wheel {path}: holds no taskedge-*.dist-info/METADATA (not a taskedge wheel); {fix}")


def _profile_text(name: str):
    from taskedge.runtime.profiles import load_profile
    p = load_profile(name)
    if not p.path or not os.path.isfile(p.path):  # zipped package data: write it from the dict
        from taskedge.runtime.profiles import profile_to_toml
        return p, profile_to_toml(p.to_dict(), comment=f"TaskEdge device profile {p.name}")
    return p, Path(p.path).read_text(encoding="utf-8")


def _bundle_files(bundle: Path) -> List[Path]:
    files = []
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle)
        if rel.parts[0] == "run" or any(part.startswith(".") for part in rel.parts):
            continue  # a previous local run's checkpoints and temp files do not ship
        if p.is_symlink():
            raise PackError(f"{p}: bundles must not contain symlinks; re-export the bundle")
        if p.is_file():
            files.append(p)
    return files


def _add(tar: tarfile.TarFile, name: str, path: Path, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = path.stat().st_size, int(mtime)
    info.mode = 0o755 if name == INSTALL else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with open(path, "rb") as f:
        tar.addfile(info, f)


def pack(bundle, profile: str, out, wheel: Optional[str] = None,
         log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Dict[str, object]:
    """Verify `bundle`, build the runtime wheel and write the archive `out` atomically."""
    from taskedge.runtime.bundle import load_bundle
    t0 = time.perf_counter()
    bundle, out = Path(bundle), Path(out)
    if out.is_dir():
        raise PackError(f"-o {out} is a folder; give the archive's file name, e.g. -o {out / 'bundle.tar'}")
    if wheel:
        check_wheel(Path(wheel))
    manifest = load_bundle(bundle, verify=True)  # BundleError (a UserError) names the problem and fix
    prof, prof_text = _profile_text(profile)
    members = installer_files()
    members.update({f"{BUNDLE_DIR}/{p.relative_to(bundle).as_posix()}": p for p in _bundle_files(bundle)})
    with tempfile.TemporaryDirectory(prefix="taskedge-pack-") as tmp:
        tmp = Path(tmp)
        if not wheel:
            log("building the runtime wheel (offline, no deps)")
        whl = Path(wheel) if wheel else build_wheel(tmp)
        members[f"{WHEELS_DIR}/{whl.name}"] = whl
        members[PROFILE] = tmp / PROFILE
        members[PROFILE].write_text(prof_text, encoding="utf-8")
        sums = tmp / SUMS
        sums.write_text("".join(f"{sha256_file(members[n])}  {n}\n" for n in sorted(members)), encoding="utf-8")
        order = [INSTALL, PROFILE] + sorted(set(members) - {INSTALL, PROFILE})
        mtime = time.time()
        mode = "w:gz" if out.name.endswith((".tar.gz", ".tgz")) else "w"
        try:
            with atomic_path(out) as t, tarfile.open(t, mode, format=tarfile.PAX_FORMAT) as tar:
                _add(tar, SUMS, sums, mtime)
                for name in order:
                    _add(tar, name, members[name], mtime)
        except OSError as e:                  # the temp file is gone (atomic_path); nothing was renamed
            raise PackError(f"-o {out}: cannot write the archive ({e.strerror or e}); give a path in a "
                            "writable folder with room for it") from None
    log(f"wrote {out}")
    return {"out": str(out), "bytes": out.stat().st_size, "bundle": str(bundle), "model": manifest.model_name,
            "profile": prof.name, "wheel": whl.name, "members": len(members) + 1,
            "sha256": sha256_file(out), "seconds": round(time.perf_counter() - t0, 2)}


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
    p.add_argument("-o", "--out", required=True, type=arg_type(str, out_path("file")),
                   help="archive to write (.tar, or .tar.gz to compress)")
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
