"""Power, energy and memory telemetry for the device runtime (no torch).

One interface for power, whatever the source:

    meter = make_power_meter(profile)   # Ina3221Meter | NvmlMeter | EstimatedMeter
    meter.start()
    for step in ...:
        train_step()
        joules = meter.tick()           # sample now, add the energy since the last tick
    meter.energy_j, meter.measured, meter.source, meter.fallback_reason

- Jetson Orin: the INA3221 power monitors in sysfs (NVML is a stub on Jetson).
  JetPack 5/6 expose `in{N}_label`, `in{N}_input` (bus mV), `curr{N}_input` (mA) under
  /sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/. Power = mV * mA / 1e6 W, summed over the
  profile's rails (Orin Nano/NX: VDD_IN is the module total; AGX Orin: no VDD_IN, sum rails).
- Desktop NVIDIA GPU: NVML's energy counter (GPU board only, Volta and newer).
- Anything else: an estimate from this process's CPU use and the profile's idle/max watts,
  reported with measured=False so nobody mistakes it for a measurement.

Energy between ticks is the trapezoid of the two power samples, except on NVML where the
driver's own counter is read. Tick often (every step) for a good integral.

Memory: rss_mb(), peak_rss_mb(), system_available_mb() and MemorySampler (a thread that keeps
the max RSS over a window, since ru_maxrss cannot be reset). On Jetson, CUDA allocations live
in the same DRAM but need not show up in RSS; system_available_mb() does see them.
"""
from __future__ import annotations

import glob
import os
import sys
import threading
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import psutil

from .fsutil import UserError

MB = 1 << 20


class PowerMeter:
    """Base class: subclasses implement power_w(); energy integration lives here.

    `clock` (seconds, monotonic) is injectable so tests can drive time."""
    source = "none"
    measured = False

    def __init__(self, clock: Optional[Callable[[], float]] = None):
        self.clock = clock or time.monotonic
        self.fallback_reason: Optional[str] = None
        self._t: Optional[float] = None
        self._p = 0.0
        self._e = 0.0

    def power_w(self) -> float:
        """Instantaneous power in watts."""
        raise NotImplementedError

    def start(self) -> "PowerMeter":
        """Zero the energy and take the first sample."""
        self._e, self._p, self._t = 0.0, self.power_w(), self.clock()
        return self

    def tick(self) -> float:
        """Sample now, add the trapezoid since the last sample; return total joules."""
        if self._t is None:
            self.start()
            return 0.0
        p, t = self.power_w(), self.clock()
        self._e += 0.5 * (p + self._p) * max(0.0, t - self._t)
        self._p, self._t = p, t
        return self._e

    @property
    def energy_j(self) -> float:
        """Joules since start(), as of the last tick()."""
        return self._e


# --- Jetson: INA3221 in sysfs -------------------------------------------------

def ina3221_channels(rails_glob: str, root: str = "/") -> Dict[str, Tuple[str, str]]:
    """label -> (in{N}_input path, curr{N}_input path) for every labelled channel.

    Channels without a curr{N}_input (e.g. in7 'sum of shunt voltages') are skipped;
    for a repeated label (e.g. "NC" on unconnected channels) the first one wins."""
    pattern = os.path.join(root, rails_glob.lstrip("/"))
    found: Dict[str, Tuple[str, str]] = {}
    for hw in sorted(glob.glob(pattern)):
        for lab in sorted(glob.glob(os.path.join(hw, "in*_label"))):
            n = os.path.basename(lab)[2:-len("_label")]
            vin, cur = os.path.join(hw, f"in{n}_input"), os.path.join(hw, f"curr{n}_input")
            if n.isdigit() and os.path.exists(vin) and os.path.exists(cur):
                found.setdefault(_read(lab), (vin, cur))
    return found


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:      # sysfs text; a bad byte must not crash
        return f.read().strip()


class Ina3221Meter(PowerMeter):
    """Sum of the named INA3221 rails, read from sysfs on every sample."""
    measured = True

    def __init__(self, rails: Sequence[str], rails_glob: str, root: str = "/", clock=None):
        super().__init__(clock)
        chans = ina3221_channels(rails_glob, root)
        where = os.path.join(root, rails_glob.lstrip("/"))
        if not chans:
            raise FileNotFoundError(f"no INA3221 channels under {where}")
        missing = [r for r in rails if r not in chans]
        if missing or not rails:
            raise UserError(f"INA3221 rail(s) {', '.join(missing) or '(none given)'} not found under "
                            f"{where}; labels found: {', '.join(chans)}. Use the profile for this "
                            f"board (`taskedge profiles`) or set power.rails.")
        self.rails = list(rails)
        self._paths = [chans[r] for r in self.rails]
        self.source = "ina3221: " + " + ".join(self.rails)

    def read_rails(self) -> Dict[str, float]:
        """Watts per rail right now."""
        return {r: float(_read(v)) * float(_read(c)) / 1e6 for r, (v, c) in zip(self.rails, self._paths)}

    def power_w(self) -> float:
        return sum(self.read_rails().values())


# --- desktop: NVML ------------------------------------------------------------

class NvmlMeter(PowerMeter):
    """GPU board power and energy from NVML (pip install nvidia-ml-py; imported lazily).

    Energy comes from nvmlDeviceGetTotalEnergyConsumption (mJ since driver load), as the
    difference since start(); GPUs without that counter fall back to trapezoid on power."""
    measured = True

    def __init__(self, index: int = 0, clock=None):
        super().__init__(clock)
        try:
            import pynvml
        except ImportError as e:
            raise RuntimeError(f"pynvml is not importable ({e}); pip install nvidia-ml-py") from None
        self.nv = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.source = f"nvml: GPU {index} board power"
        try:
            self._mj0 = self._mj()
            self.has_counter = True
        except Exception:  # NVMLError_NotSupported on pre-Volta GPUs
            self.has_counter = False

    def _mj(self) -> int:
        return self.nv.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def power_w(self) -> float:
        return self.nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0

    def start(self) -> "NvmlMeter":
        if self.has_counter:
            self._mj0, self._e, self._t = self._mj(), 0.0, self.clock()
            return self
        return super().start()

    def tick(self) -> float:
        if not self.has_counter:
            return super().tick()
        if self._t is None:
            self.start()
        self._e, self._t = (self._mj() - self._mj0) / 1000.0, self.clock()
        return self._e

    def close(self) -> None:
        self.nv.nvmlShutdown()


# --- fallback: estimate from CPU use -------------------------------------------

class EstimatedMeter(PowerMeter):
    """power = idle_w + (max_w - idle_w) * share of the cores this process keeps busy."""
    measured = False
    source = "estimate: cpu-util x profile power model"

    def __init__(self, idle_w: float, max_w: float, cores: int, clock=None):
        super().__init__(clock)
        self.idle_w, self.max_w, self.cores = float(idle_w), float(max_w), max(1, int(cores))
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)  # first call only primes the counter

    def power_w(self) -> float:
        share = self.proc.cpu_percent(None) / (100.0 * self.cores)
        return self.idle_w + (self.max_w - self.idle_w) * min(1.0, max(0.0, share))


def make_power_meter(profile, root: str = "/", clock=None, power_mode: Optional[str] = None) -> PowerMeter:
    """The best meter the profile allows on this machine.

    ina3221 if the profile says so and the sysfs channels exist, nvml if the profile says
    so and pynvml initialises, else EstimatedMeter with `.fallback_reason` saying why.
    If the INA3221 is there but lacks the profile's rails, that is a wrong profile: raise.
    A `power_mode` (nvpmodel name) caps the estimate's full-load power at that mode's budget."""
    if profile.sensor == "ina3221":
        try:
            return Ina3221Meter(profile.rails, profile.rails_glob, root=root, clock=clock)
        except (FileNotFoundError, PermissionError) as e:
            reason = f"ina3221 unavailable: {e}"
    elif profile.sensor == "nvml":
        try:
            return NvmlMeter(clock=clock)
        except Exception as e:  # not installed, no driver, no GPU
            reason = f"nvml unavailable: {type(e).__name__}: {e}"
    else:
        reason = f"profile {profile.name!r} has no power sensor"
    max_w = profile.max_w if power_mode is None else min(profile.max_w, profile.mode_watts(power_mode))
    m = EstimatedMeter(min(profile.idle_w, max_w), max_w, profile.cpu_cores, clock=clock)
    m.fallback_reason = reason
    if power_mode is not None:
        m.source += f" capped at power mode {power_mode} ({max_w:g} W)"
    return m


# --- memory ---------------------------------------------------------------------

def rss_mb() -> float:
    """Resident set size of this process now, MiB."""
    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    """Max RSS of this process since it started, MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def system_available_mb() -> float:
    """Memory the OS could hand out now, MiB (on Jetson this is the CPU+GPU pool)."""
    return psutil.virtual_memory().available / MB


class MemorySampler:
    """Background thread sampling RSS every `interval_ms` (or `interval_s`) and keeping the max.

        ms = MemorySampler(interval_ms=5).start()
        ms.reset()          # start a new window (e.g. per train step) without stopping
        step()
        ms.peak_mb()        # max RSS since the last start()/reset(), MiB
        ms.stop()
    """

    def __init__(self, interval_ms: float = 50, interval_s: Optional[float] = None):
        self.interval = interval_s if interval_s is not None else interval_ms / 1000.0
        self.samples = 0
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._proc = psutil.Process()

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss / MB
        with self._lock:
            self._peak = max(self._peak, rss)
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def reset(self) -> None:
        """Forget the max so far; the new window starts at the current RSS."""
        with self._lock:
            self._peak = 0.0
        self._sample()

    def peak_mb(self) -> float:
        """Max RSS seen since start()/reset() (a fresh sample included), MiB."""
        self._sample()
        return self._peak

    def start(self) -> "MemorySampler":
        self.stop()
        self.samples = 0
        self.reset()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="taskedge-mem", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop sampling (one last sample first); return the peak in MiB."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.peak_mb()

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
