"""`taskedge doctor`: is this machine ready to run `taskedge adapt` with this profile?

Checks, each ok / warn / fail with the fix in one line:

    python        version >= 3.9
    runtime       taskedge.runtime imports, and without torch or onnxruntime.training
    onnxruntime   importable, version >= 1.17 (any inference build: CPU wheel or NVIDIA's
                  onnxruntime-gpu), and only one onnxruntime distribution installed
    providers     ORT's execution providers vs the profile's list
    cuda          a CUDA device is visible when the profile wants CUDA
                  (/dev/nvhost-* on Jetson, /dev/nvidia* on desktops, or nvidia-smi)
    power         the profile's INA3221 rails are readable under --root (or NVML initialises)
    memory        available memory vs the profile's budget
    disk          free space for checkpoints (--dir)
    bundle        (with --bundle) the manifest and the sha256 of every file

Exit status 0 if nothing failed, 1 otherwise. `--root` points the sysfs/dev/proc reads at a
copied tree (tests, or checking a board image).
"""
from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from taskedge.runtime.fsutil import UserError

OK, WARN, FAIL = "ok", "warn", "fail"
GPU_WHEEL = "NVIDIA's onnxruntime-gpu wheel for your JetPack (Jetson Zoo / pypi.jetson-ai-lab)"
ORT_FIX = f"in the venv: pip install onnxruntime (CPU), or on a Jetson install {GPU_WHEEL} for the CUDA EP"
CUDA_FIX = f"install {GPU_WHEEL} in the venv"
MIN_ORT = (1, 17)
# distributions that all provide the `onnxruntime` module (two of them overwrite each other's files)
ORT_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-training", "onnxruntime-training-cpu",
             "onnxruntime-directml", "onnxruntime-openvino", "ort-nightly", "ort-nightly-gpu")
MIN_FREE_DISK_MB = 512
MIN_AVAILABLE_MB = 256


class Check:
    def __init__(self, name: str, status: str, detail: str, fix: str = ""):
        self.name, self.status, self.detail, self.fix = name, status, detail, fix

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def check_python() -> Check:
    v = sys.version_info
    detail = f"{platform.python_version()} ({sys.executable})"
    if v < (3, 9):
        return Check("python", FAIL, detail, "use Python 3.9 or newer (JetPack 6 ships 3.10)")
    return Check("python", OK, detail)


def check_runtime() -> Check:
    code = ("import sys, taskedge.runtime, taskedge.runtime.adapt, taskedge.runtime.trainer; "
            "print(taskedge.runtime.__file__); "
            "sys.exit(3 if 'torch' in sys.modules else 4 if 'onnxruntime.training' in sys.modules else 0)")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("runtime", WARN, f"could not start a check process ({e})", "re-run the doctor")
    where = os.path.dirname(r.stdout.strip()) if r.stdout.strip() else "?"
    if r.returncode in (3, 4):
        what = "torch" if r.returncode == 3 else "onnxruntime.training"
        return Check("runtime", FAIL, f"importing the runtime loaded {what} ({where})",
                     f"report a bug: the board runtime must not import {what}")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return Check("runtime", FAIL, f"taskedge.runtime does not import: {last}",
                     "reinstall the runtime wheel (install.sh from `taskedge pack`) and its dependencies")
    from importlib import metadata
    try:
        version = metadata.version("taskedge")
    except metadata.PackageNotFoundError:
        version = "?"
    return Check("runtime", OK, f"taskedge {version} at {where}, torch-free, no onnxruntime.training")


def _version_tuple(version: str) -> tuple:
    """(major, minor) of a version string: 1.23.2 -> (1, 23), 1.24.0.dev20250101 -> (1, 24)."""
    parts = (version.split(".") + ["0", "0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def ort_distributions(site_dir: str) -> List[str]:
    """The installed distributions in `site_dir` that provide the `onnxruntime` module, as name==version."""
    from importlib import metadata
    found = []
    for name in ORT_DISTS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if os.path.realpath(str(dist.locate_file(""))) == os.path.realpath(site_dir):
            found.append(f"{name}=={dist.version}")
    return found


def check_ort_version(ort) -> Check:
    where = os.path.dirname(ort.__file__)
    dists = ort_distributions(os.path.dirname(where))
    detail = f"{ort.__version__} ({', '.join(dists) or 'unknown distribution'}) at {where}"
    if _version_tuple(ort.__version__) < MIN_ORT:
        return Check("onnxruntime", WARN, detail + f"; older than {MIN_ORT[0]}.{MIN_ORT[1]}, untested",
                     "upgrade: " + ORT_FIX)
    if len(dists) > 1:
        names = " ".join(d.split("==")[0] for d in dists)
        return Check("onnxruntime", WARN, detail + "; these distributions overwrite each other's onnxruntime files",
                     f"keep one: pip uninstall -y {names}, then install the one you want again")
    return Check("onnxruntime", OK, detail)


def check_providers(ort, profile) -> Check:
    have = list(ort.get_available_providers())
    want = list(profile.execution_providers)
    missing = [p for p in want if p not in have]
    detail = f"available {', '.join(have)}; profile wants {', '.join(want)}"
    if not missing:
        return Check("providers", OK, detail)
    other = "install an onnxruntime build with " + ", ".join(missing)
    if "CPUExecutionProvider" in missing or not any(p in have for p in want):
        return Check("providers", FAIL, detail, other)
    fix = CUDA_FIX if "CUDAExecutionProvider" in missing else other
    return Check("providers", WARN, detail + f"; {', '.join(missing)} missing, training runs on CPU", fix)


def check_onnxruntime(profile) -> List[Check]:
    try:
        from taskedge.runtime.ort import onnxruntime as ort
    except Exception as e:  # ImportError, or a broken native library (OSError)
        return [Check("onnxruntime", FAIL, f"not importable: {type(e).__name__}: {e}", ORT_FIX),
                Check("providers", FAIL, "onnxruntime missing", ORT_FIX)]
    return [check_ort_version(ort), check_providers(ort, profile)]


def check_cuda(profile, root: str) -> Check:
    if "CUDAExecutionProvider" not in profile.execution_providers:
        return Check("cuda", OK, f"not needed by profile {profile.name}")
    nodes = sorted(glob.glob(_under(root, "/dev/nvhost-*")) + glob.glob(_under(root, "/dev/nvidia*")))
    smi = shutil.which("nvidia-smi") if root in ("", "/") else None
    if nodes:
        shown = ", ".join(os.path.basename(n) for n in nodes[:4]) + (" ..." if len(nodes) > 4 else "")
        bad = [n for n in nodes if not os.access(n, os.R_OK | os.W_OK)]
        if bad and len(bad) == len(nodes) and root in ("", "/"):
            return Check("cuda", WARN, f"device nodes {shown} are not accessible to this user",
                         "add the user to the 'video' group (sudo usermod -aG video $USER) and log in again")
        return Check("cuda", OK, f"device nodes {shown}")
    if smi:
        return Check("cuda", OK, f"nvidia-smi at {smi}")
    return Check("cuda", FAIL, f"profile {profile.name} wants CUDA but no /dev/nvhost-*, /dev/nvidia* or "
                               "nvidia-smi is visible",
                 "install JetPack / the NVIDIA driver (or in a container pass --runtime nvidia), or use a CPU profile")


def check_power(profile, root: str) -> Check:
    from taskedge.runtime.telemetry import NvmlMeter, ina3221_channels
    if profile.sensor == "ina3221":
        where = _under(root, profile.rails_glob)
        chans = ina3221_channels(profile.rails_glob, root)
        if not chans:
            return Check("power", WARN, f"no INA3221 channels under {where}; energy will be estimated",
                         "on a Jetson load the ina3221 hwmon driver (JetPack 5/6 does by default) or run "
                         "`taskedge probe -o profile.toml` and use that profile")
        missing = [r for r in profile.rails if r not in chans]
        if missing:
            return Check("power", FAIL, f"rail(s) {', '.join(missing)} not found; labels here: {', '.join(chans)}",
                         "this profile is for another board: use the matching one (`taskedge profiles`) or "
                         "`taskedge probe -o profile.toml`")
        try:
            watts = {}
            for r in profile.rails:
                vin, cur = chans[r]
                with open(vin) as f1, open(cur) as f2:
                    watts[r] = float(f1.read().strip()) * float(f2.read().strip()) / 1e6
        except (OSError, ValueError) as e:
            return Check("power", FAIL, f"INA3221 rails not readable: {e}",
                         "make the hwmon files readable for this user (udev rule) or run as a user that can")
        return Check("power", OK, f"{' + '.join(profile.rails)} = {sum(watts.values()):.2f} W now")
    if profile.sensor == "nvml":
        try:
            m = NvmlMeter()
            w = m.power_w()
            m.close()
            return Check("power", OK, f"NVML board power {w:.1f} W")
        except Exception as e:
            return Check("power", WARN, f"NVML unavailable ({type(e).__name__}: {e}); energy will be estimated",
                         "pip install nvidia-ml-py and check the NVIDIA driver (not on Jetson: use an ina3221 profile)")
    return Check("power", OK, f"profile {profile.name} has no power sensor; energy is estimated from CPU use")


def _available_mb(root: str) -> float:
    if root not in ("", "/"):
        try:
            text = Path(_under(root, "/proc/meminfo")).read_text(encoding="utf-8", errors="replace")
            for line in text.splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
    import psutil
    return psutil.virtual_memory().available / (1 << 20)


def check_memory(profile, root: str) -> Check:
    avail = _available_mb(root)
    budget = profile.budget_mb
    detail = f"{avail:.0f} MB available; profile {profile.name} plans with {budget:.0f} MB"
    if avail < MIN_AVAILABLE_MB:
        return Check("memory", FAIL, detail, "free memory (stop other programs, disable the desktop: "
                                             "sudo systemctl isolate multi-user.target) and re-run")
    if avail < budget:
        return Check("memory", WARN, detail, f"pass --memory-budget-mb {int(avail * 0.8)} to adapt, or free memory")
    return Check("memory", OK, detail)


def check_disk(path: str, bundle: Optional[str]) -> Check:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(str(p)).free / (1 << 20)
    need = MIN_FREE_DISK_MB
    if bundle and (Path(bundle) / "checkpoint").is_file():
        need = max(need, 4 * (Path(bundle) / "checkpoint").stat().st_size / (1 << 20))
    detail = f"{free:.0f} MB free at {p} (checkpoints need about {need:.0f} MB)"
    if free < need / 4:
        return Check("disk", FAIL, detail, "free disk space or pass --run-dir on a larger disk to adapt")
    if free < need:
        return Check("disk", WARN, detail, "free disk space or pass --run-dir on a larger disk to adapt")
    return Check("disk", OK, detail)


def check_bundle(bundle: str) -> Check:
    from taskedge.runtime.bundle import load_bundle
    try:
        m = load_bundle(bundle, verify=True)
    except UserError as e:
        return Check("bundle", FAIL, str(e), "re-copy the bundle (`taskedge flash`) or export it again")
    return Check("bundle", OK, f"{m.model_name}: {len(m.files)} files verified, {m.trainable_params} trainable")


def default_profile(root: str) -> str:
    """The closest shipped profile to this machine (via probe); host-cpu if unsure."""
    try:
        from .probe import closest_profile, has_nvidia_gpu, read_memtotal_mb, read_model
        return closest_profile(read_model(root), read_memtotal_mb(root), has_nvidia_gpu(root)).name
    except Exception:
        return "host-cpu"


def run_checks(profile: Optional[str] = None, root: str = "/", disk_dir: Optional[str] = None,
               bundle: Optional[str] = None) -> dict:
    from taskedge.runtime.profiles import load_profile
    name = profile or default_profile(root)
    p = load_profile(name)
    checks = [check_python(), check_runtime()]
    checks += check_onnxruntime(p)
    checks += [check_cuda(p, root), check_power(p, root), check_memory(p, root),
               check_disk(disk_dir or os.getcwd(), bundle)]
    if bundle:
        checks.append(check_bundle(bundle))
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    return {"profile": p.name, "profile_path": p.path, "profile_chosen": "given" if profile else "auto",
            "root": root, "ok": counts[FAIL] == 0, "counts": counts, "checks": [c.to_dict() for c in checks]}


def format_report(rep: dict) -> str:
    lines = [f"taskedge doctor: profile {rep['profile']} ({rep['profile_chosen']}), root {rep['root']}"]
    for c in rep["checks"]:
        lines.append(f"[{c['status']:>4}] {c['name']:<13} {c['detail']}")
        if c["status"] != OK and c["fix"]:
            lines.append(f"       {'':<13} fix: {c['fix']}")
    n = rep["counts"]
    lines.append(f"{n[OK]} ok, {n[WARN]} warn, {n[FAIL]} fail" +
                 ("" if rep["ok"] else " - fix the failures above before `taskedge adapt`"))
    return "\n".join(lines)


def cmd_doctor(a) -> int:
    if not Path(a.root).is_dir():
        raise UserError(f"--root {a.root}: not a folder")
    rep = run_checks(a.profile, a.root, a.dir, a.bundle)
    print(json.dumps(rep, indent=2) if a.json else format_report(rep))
    return 0 if rep["ok"] else 1


def register(sub) -> None:
    d = sub.add_parser("doctor", help="board: check Python, ONNX Runtime, providers, CUDA, power "
                                      "rails, memory and disk against a device profile",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    d.add_argument("--profile", help="device profile name or .toml (default: the closest shipped profile)")
    d.add_argument("--root", default="/", help="read /sys, /dev, /proc under this folder (default /)")
    d.add_argument("--dir", help="where checkpoints will be written, for the disk check (default: cwd)")
    d.add_argument("--bundle", help="also verify this bundle's manifest and file hashes")
    d.add_argument("--json", action="store_true", help="print the checks as JSON")
    d.set_defaults(fn=cmd_doctor)
