"""`taskedge probe -o profile.toml`: write a device profile for the machine it runs on.

Reads (all under --root, default /, so a copied sysfs/procfs tree works too):

    /proc/device-tree/model              board name, NUL-terminated ("NVIDIA Jetson Orin Nano Developer Kit")
    /etc/nvpmodel.conf                   "< POWER_MODEL ID=0 NAME=15W >" lines, "< PM_CONFIG DEFAULT=0 >"
    /var/lib/nvpmodel/status             the current mode, "pmode:0001"
    /proc/meminfo                        MemTotal
    /sys/devices/system/cpu/present      "0-5"
    INA3221 hwmon channels               via taskedge.runtime.telemetry.ina3221_channels

The defaults (execution providers, memory share, idle/max watts, energy budget, watts of
modes whose name carries no number such as MAXN) come from the closest shipped profile:
same board family from the model string (Orin Nano / Orin NX / AGX Orin), then nearest
memory size. The written file loads back with `taskedge.runtime.profiles.load_profile`.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from taskedge.runtime.fsutil import UserError, atomic_write_text
from taskedge.runtime.profiles import DeviceProfile, list_profiles, load_profile, profile_to_toml
from taskedge.runtime.telemetry import ina3221_channels

DEFAULT_RAILS_GLOB = "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
MODEL_FILES = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")


def _under(root: str, path: str) -> Path:
    return Path(root) / path.lstrip("/")


def _read(root: str, path: str) -> Optional[str]:
    p = _under(root, path)
    if p.is_symlink() and root not in ("", "/"):  # an absolute link inside a copied tree: re-root it
        target = os.readlink(p)
        if target.startswith("/"):
            p = _under(root, target)
    try:
        return p.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def read_model(root: str = "/") -> Optional[str]:
    """The device-tree model string without its trailing NUL, or None (not a device-tree board)."""
    for f in MODEL_FILES:
        text = _read(root, f)
        if text is not None:
            text = text.replace("\x00", "").strip()
            if text:
                return text
    return None


_POWER_MODEL = re.compile(r"<\s*POWER_MODEL\s+ID\s*=\s*(\d+)\s+NAME\s*=\s*([^\s>]+)\s*>", re.I)
_PM_DEFAULT = re.compile(r"<\s*PM_CONFIG\s+DEFAULT\s*=\s*(\d+)\s*>", re.I)
_PMODE = re.compile(r"pmode\s*:\s*(\d+)", re.I)


def parse_nvpmodel_conf(text: str) -> Tuple[Dict[int, str], Optional[int]]:
    """{mode id: name} from the POWER_MODEL lines, and the PM_CONFIG DEFAULT id."""
    modes = {int(i): name for i, name in _POWER_MODEL.findall(text)}
    m = _PM_DEFAULT.search(text)
    return modes, (int(m.group(1)) if m else None)


def read_nvpmodel(root: str = "/") -> Optional[dict]:
    conf = _read(root, "/etc/nvpmodel.conf")
    if conf is None:
        return None
    modes, default = parse_nvpmodel_conf(conf)
    status = _read(root, "/var/lib/nvpmodel/status") or ""
    m = _PMODE.search(status)
    current = int(m.group(1)) if m else None
    return {"modes": modes, "default_id": default, "current_id": current}


def read_memtotal_mb(root: str = "/") -> Optional[int]:
    text = _read(root, "/proc/meminfo") or ""
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.M)
    return int(m.group(1)) // 1024 if m else None


def parse_cpu_list(text: str) -> int:
    """Count CPUs in a kernel cpu list such as "0-5" or "0-3,6,8-11"."""
    n = 0
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        n += (int(hi) - int(lo) + 1) if hi else 1
    return n


def read_cpu_count(root: str = "/") -> Optional[int]:
    text = _read(root, "/sys/devices/system/cpu/present")
    if text and text.strip():
        try:
            return parse_cpu_list(text)
        except ValueError:
            pass
    return os.cpu_count() if root in ("", "/") else None


def family_of(model: Optional[str]) -> Optional[str]:
    m = (model or "").lower()
    if "jetson" not in m and "orin" not in m:
        return None
    if "agx" in m:
        return "jetson-agx-orin"
    if "orin nx" in m or " nx" in m:
        return "jetson-orin-nx"
    if "nano" in m:
        return "jetson-orin-nano"
    return "jetson"


def closest_profile(model: Optional[str], memtotal_mb: Optional[int], has_nvidia_gpu: bool = False,
                    profiles: Optional[List[DeviceProfile]] = None) -> DeviceProfile:
    """The shipped profile nearest to this machine: board family first, then memory size."""
    profiles = profiles if profiles is not None else list_profiles()
    fam = family_of(model)
    if fam:
        pool = [p for p in profiles if p.name.startswith(fam)] or \
               [p for p in profiles if p.name.startswith("jetson")]
    else:
        want = "desktop-nvidia-gpu" if has_nvidia_gpu else "host-cpu"
        pool = [p for p in profiles if p.name == want]
    pool = pool or profiles
    if memtotal_mb:  # MemTotal is a little below the nominal size (carve-outs): compare on a log scale
        import math
        return min(pool, key=lambda p: (abs(math.log(p.memory_mb / memtotal_mb)), p.name))
    return pool[0]


def _mode_watts(name: str, base: DeviceProfile) -> float:
    if name in base.modes:
        return float(base.modes[name])
    m = re.match(r"^(\d+(?:\.\d+)?)W", name, re.I) or re.search(r"(\d+(?:\.\d+)?)W", name, re.I)
    return float(m.group(1)) if m else float(base.max_w)


def has_nvidia_gpu(root: str = "/") -> bool:
    dev = _under(root, "/dev")
    found = dev.is_dir() and any(dev.glob("nvidia[0-9]*"))
    return bool(found or (root in ("", "/") and shutil.which("nvidia-smi")))


def probe(root: str = "/", name: Optional[str] = None, base: Optional[str] = None) -> dict:
    """Gather the facts and build the profile dict (validated). Returns
    {"facts": ..., "base": name, "notes": [...], "profile": dict in TOML shape}."""
    notes: List[str] = []
    model = read_model(root)
    mem = read_memtotal_mb(root)
    cpus = read_cpu_count(root)
    nvp = read_nvpmodel(root)
    gpu = has_nvidia_gpu(root)
    basep = load_profile(base) if base else closest_profile(model, mem, gpu)

    rails_glob = basep.rails_glob or DEFAULT_RAILS_GLOB
    chans = sorted(ina3221_channels(rails_glob, root))
    labels = [c for c in chans if c.upper() != "NC" and "sum" not in c.lower()]
    if labels:
        sensor = "ina3221"
        if basep.rails and all(r in labels for r in basep.rails):
            rails = list(basep.rails)
        elif "VDD_IN" in labels:
            rails = ["VDD_IN"]           # Orin Nano / NX: the module input rail is the total
        else:
            rails = labels               # AGX Orin and others: sum what is there
            notes.append(f"no VDD_IN rail: power = sum of {', '.join(rails)}; edit power.rails to change")
    else:
        sensor = basep.sensor if basep.sensor != "ina3221" else "none"
        rails = [] if sensor != "ina3221" else list(basep.rails)
        if basep.sensor == "ina3221":
            notes.append(f"no INA3221 channels under {os.path.join(root, rails_glob.lstrip('/'))}: "
                         "energy will be estimated (sensor = \"none\"); load the ina3221 driver and probe again")

    modes, default_mode = dict(basep.modes), basep.default_mode
    if nvp and nvp["modes"]:
        modes = {nm: _mode_watts(nm, basep) for _, nm in sorted(nvp["modes"].items())}
        cur = nvp["current_id"] if nvp["current_id"] in nvp["modes"] else nvp["default_id"]
        default_mode = nvp["modes"].get(cur, next(iter(modes)))
        if nvp["current_id"] is None:
            notes.append("no /var/lib/nvpmodel/status: default mode taken from PM_CONFIG DEFAULT")
    elif basep.name.startswith("jetson"):
        notes.append("no /etc/nvpmodel.conf: power modes copied from " + basep.name)

    if mem is None:
        mem = basep.memory_mb
        notes.append(f"no /proc/meminfo: memory_mb copied from {basep.name}")
    if cpus is None:
        cpus = basep.cpu_cores
        notes.append(f"no /sys/devices/system/cpu/present: cpu_cores copied from {basep.name}")
    board = model or f"{platform.machine() or 'unknown'} host"
    slug = re.sub(r"[^a-z0-9]+", "-", (model or "host").lower()).strip("-")
    prof = {
        "name": name or f"probed-{slug}",
        "description": f"probed on {board}; defaults from {basep.name}",
        "board": board,
        "memory_mb": int(mem),
        "shared_memory": bool(basep.shared_memory),
        "memory_share": float(basep.memory_share),
        "execution_providers": list(basep.execution_providers),
        "cpu_cores": int(cpus),
        "power": {
            "modes": modes,
            "default_mode": default_mode,
            "idle_w": float(basep.idle_w),
            "max_w": float(max([basep.max_w] + list(modes.values()))),
            "sensor": sensor,
            "rails": rails,
            "rails_glob": rails_glob if sensor == "ina3221" else "",
            "energy_budget_j": float(basep.energy_budget_j),
        },
    }
    DeviceProfile.from_dict(prof, "<probed profile>")  # validate before anything is written
    facts = {"root": root, "model": model, "memtotal_mb": mem, "cpu_cores": cpus, "nvpmodel": nvp,
             "ina3221_labels": chans, "nvidia_gpu_device": gpu}
    return {"facts": facts, "base": basep.name, "notes": notes, "profile": prof}


def write_profile(result: dict, out) -> str:
    comment = (f"TaskEdge device profile written by `taskedge probe` on {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
               f"board: {result['facts']['model'] or 'no device-tree model'}; defaults from the shipped "
               f"profile {result['base']}\n"
               "memory_mb is MemTotal (a little below the nominal size); edit and re-check with "
               "`taskedge profile show FILE`")
    text = profile_to_toml(result["profile"], comment=comment)
    DeviceProfile.from_dict(tomllib.loads(text), "<probed profile>")
    atomic_write_text(out, text)
    load_profile(Path(out))  # loads back, validated
    return text


def cmd_probe(a) -> int:
    if not Path(a.root).is_dir():
        raise UserError(f"--root {a.root}: not a folder (give / or a copy of a board's /proc, /sys, /etc)")
    res = probe(a.root, name=a.name, base=a.base)
    text = profile_to_toml(res["profile"])
    if a.out:
        text = write_profile(res, a.out)
        res["out"] = str(a.out)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for n in res["notes"]:
            print(f"note: {n}", file=sys.stderr)
        if a.out:
            p = res["profile"]
            print(f"wrote {a.out}: {p['name']} ({p['board']}, {p['memory_mb']} MB, {p['cpu_cores']} cores, "
                  f"mode {p['power']['default_mode']}, sensor {p['power']['sensor']}"
                  f"{' ' + '+'.join(p['power']['rails']) if p['power']['rails'] else ''}; "
                  f"defaults from {res['base']})")
        else:
            sys.stdout.write(text)
    return 0


def register(sub) -> None:
    p = sub.add_parser("probe", help="board: write a device profile for this machine",
                       description="Read the board model, nvpmodel modes, memory, CPUs and INA3221 rails and "
                                   "write a device profile (defaults from the closest shipped profile).")
    p.add_argument("-o", "--out", help="profile .toml to write (default: print it)")
    p.add_argument("--root", default="/", help="read /proc, /sys, /etc under this folder (default /)")
    p.add_argument("--name", help="profile name (default probed-<model>)")
    p.add_argument("--base", help="take defaults from this shipped profile instead of the closest one")
    p.add_argument("--json", action="store_true", help="print facts, notes and the profile as JSON")
    p.set_defaults(fn=cmd_probe)
