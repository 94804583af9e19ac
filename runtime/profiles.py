"""Device profiles: what a board has (memory, cores, execution providers) and how
its power is read (INA3221 rails, NVML, or an estimate), one TOML file per board.

The shipped profiles live in the `taskedge.device_profiles` package; a profile can
also be any .toml file with the same keys (e.g. one written by `taskedge probe`).

    p = load_profile("jetson-orin-nano-8gb")
    p.budget_mb          # RAM the runtime may plan with (memory_mb * memory_share)
    p.mode_watts("7W")   # power budget of an nvpmodel mode

File layout (every key required):

    name, description, board         strings
    memory_mb, cpu_cores             ints > 0
    shared_memory                    bool (CPU and GPU share DRAM, as on Jetson)
    memory_share                     float in (0, 1]
    execution_providers              list of ONNX Runtime provider names
    [power]
    modes = { "15W" = 15, ... }      nvpmodel mode name -> watts
    default_mode, sensor             strings; sensor is "ina3221" | "nvml" | "none"
    idle_w, max_w, energy_budget_j   numbers (idle/max feed the estimated power model)
    rails, rails_glob                INA3221 rail labels to sum, sysfs hwmon glob
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from .fsutil import UserError, one_line

PACKAGE = "taskedge.device_profiles"
SENSORS = ("ina3221", "nvml", "none")
TOP_KEYS = ("name", "description", "board", "memory_mb", "shared_memory", "memory_share",
            "execution_providers", "cpu_cores")
POWER_KEYS = ("modes", "default_mode", "idle_w", "max_w", "sensor", "rails", "rails_glob",
              "energy_budget_j")


@dataclass
class DeviceProfile:
    name: str
    description: str
    board: str
    memory_mb: int
    shared_memory: bool
    memory_share: float
    execution_providers: List[str]
    cpu_cores: int
    modes: Dict[str, float]  # [power] table from here on
    default_mode: str
    idle_w: float
    max_w: float
    sensor: str
    rails: List[str]
    rails_glob: str
    energy_budget_j: float
    path: Optional[str] = field(default=None, compare=False)  # file it was loaded from

    @property
    def budget_mb(self) -> float:
        """Memory the runtime may plan with; the rest is OS, desktop and CUDA context."""
        return self.memory_mb * self.memory_share

    def mode_watts(self, mode: Optional[str] = None) -> float:
        """Power budget (W) of an nvpmodel mode; the profile's default mode if None."""
        mode = self.default_mode if mode is None else mode
        if mode not in self.modes:
            raise UserError(f"profile {self.name!r} has no power mode {mode!r}; "
                            f"its modes are: {', '.join(self.modes)}")
        return float(self.modes[mode])

    def to_dict(self) -> dict:
        """The TOML shape ({top-level keys..., "power": {...}}) plus "path".
        `profile_to_toml(p.to_dict())` writes the file back (without path)."""
        d = asdict(self)
        out = {k: d[k] for k in TOP_KEYS}
        out["power"] = {k: d[k] for k in POWER_KEYS}
        out["path"] = self.path
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "DeviceProfile":
        """Validate a parsed TOML dict; errors are UserErrors naming `source` and the key."""
        def get(table, key, types, where=""):
            if key not in table:
                raise UserError(f"{source}: missing key '{where}{key}'")
            v = table[key]
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                raise UserError(f"{source}: key '{where}{key}' has the wrong type "
                                f"({type(v).__name__}: {v!r})")
            return v

        def check(ok, key, msg):
            if not ok:
                raise UserError(f"{source}: key '{key}' {msg}")

        S, I, B, L, D, num = (str,), (int,), (bool,), (list,), (dict,), (int, float)
        top = {k: get(d, k, t) for k, t in zip(TOP_KEYS, (S, S, S, I, B, num, L, I))}
        power = get(d, "power", D)
        pw = {k: get(power, k, t, "power.") for k, t in zip(POWER_KEYS, (D, S, num, num, S, L, S, num))}
        check(top["memory_mb"] > 0, "memory_mb", "must be > 0")
        check(top["cpu_cores"] > 0, "cpu_cores", "must be > 0")
        check(0 < top["memory_share"] <= 1, "memory_share", "must be in (0, 1]")
        check(top["execution_providers"] and all(isinstance(x, str) for x in top["execution_providers"]),
              "execution_providers", "must be a non-empty list of strings")
        check(pw["modes"] and all(isinstance(v, num) and not isinstance(v, bool) and v > 0
                                  for v in pw["modes"].values()),
              "power.modes", "must map mode names to watts > 0")
        check(pw["default_mode"] in pw["modes"], "power.default_mode",
              f"must be one of the modes ({', '.join(pw['modes'])})")
        check(0 <= pw["idle_w"] < pw["max_w"], "power.max_w", "must be > power.idle_w >= 0")
        check(pw["sensor"] in SENSORS, "power.sensor", f"must be one of {', '.join(SENSORS)}")
        check(all(isinstance(r, str) for r in pw["rails"]), "power.rails", "must be a list of strings")
        check(pw["sensor"] != "ina3221" or (pw["rails"] and pw["rails_glob"]), "power.rails",
              "and power.rails_glob must be set when sensor = \"ina3221\"")
        check(pw["energy_budget_j"] > 0, "power.energy_budget_j", "must be > 0")
        return cls(**top, **pw, path=None if source.startswith("<") else source)


def _shipped() -> Dict[str, "object"]:
    """name -> Traversable of every .toml in the package data."""
    try:
        from importlib.resources import files
        root = files(PACKAGE)
        return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".toml")}
    except ImportError:  # Python 3.8: no files(); the package is a plain directory
        import importlib
        root = Path(importlib.import_module(PACKAGE).__file__).parent
        return {p.stem: p for p in root.glob("*.toml")}


def _parse(text: str, source: str) -> DeviceProfile:
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source}: not valid TOML: {e}") from None
    return DeviceProfile.from_dict(d, source)


def list_profiles() -> List[DeviceProfile]:
    """Every shipped profile, sorted by name."""
    items = sorted(_shipped().items())
    return [_parse(t.read_text(encoding="utf-8"), str(t)) for _, t in items]


def load_profile(name_or_path) -> DeviceProfile:
    """A shipped profile by name ("jetson-orin-nano-8gb") or any profile .toml by path."""
    s = str(name_or_path)
    p = Path(s)
    if isinstance(name_or_path, Path) or s.endswith(".toml") or "/" in s or p.is_file():
        if not p.is_file():
            raise UserError(f"profile file not found: {s}")
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            raise UserError(f"{s}: cannot read the profile ({type(e).__name__}: {e}); give a UTF-8 TOML file "
                            "(see `taskedge profile show host-cpu` for one)") from None
        return _parse(text, str(p))
    shipped = _shipped()
    if s not in shipped:
        raise UserError(f"unknown device profile {s!r}; known profiles: {', '.join(sorted(shipped))} "
                        f"(`taskedge profiles` lists them; or pass a path to a .toml file)")
    return _parse(shipped[s].read_text(encoding="utf-8"), str(shipped[s]))


# --- a tiny TOML writer: scalars, lists of scalars, one level of [tables] whose
# values may be inline tables of scalars. Enough for profiles; round-trip tested.

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k, ensure_ascii=False)


def _val(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):  # JSON string escapes (\" \\ \n \uXXXX) are valid TOML basic strings
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_val(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML: {v!r}")


def profile_to_toml(profile_dict: dict, comment: Optional[str] = None) -> str:
    """Serialise a profile dict (as from DeviceProfile.to_dict()) to TOML text.

    Top-level scalars first, then each dict value as a [table]. "path" and None values
    are skipped (TOML has no null). `comment` lines go on top, e.g. the data source."""
    lines = [f"# {one_line(c)}".rstrip() for c in comment.split("\n")] if comment else []  # TOML comments: no control chars
    items = [(k, v) for k, v in profile_dict.items() if k != "path" and v is not None]
    lines += [f"{_key(k)} = {_val(v)}" for k, v in items if not isinstance(v, dict)]
    for k, table in items:
        if isinstance(table, dict):
            lines += ["", f"[{_key(k)}]"]
            lines += [f"{_key(tk)} = {_val(tv)}" for tk, tv in table.items() if tv is not None]
    return "\n".join(lines) + "\n"
