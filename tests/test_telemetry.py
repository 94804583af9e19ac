"""Telemetry: INA3221 reader on fake sysfs trees laid out as on real Orin boards,
NVML reader against a fake pynvml, the CPU estimate for real, memory helpers, and
the no-torch guarantee."""
import os
import subprocess
import sys
import time
import types

import pytest

from taskedge.runtime.fsutil import UserError
from taskedge.runtime.profiles import load_profile
from taskedge.runtime.telemetry import (EstimatedMeter, Ina3221Meter, NvmlMeter,
                                        make_power_meter)

GLOB = "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def write_ina3221(root, dev, hwmon, channels):
    """One INA3221 as the upstream hwmon driver shows it on JetPack 5/6:
    channels = {N: (label, mV, mA)} for N in 1..3, plus the files a reader must ignore
    (in4-6 shunt uV without labels, in7 'sum' label without curr7, curr4 sum, limits)."""
    d = root / "sys/bus/i2c/drivers/ina3221" / dev / "hwmon" / hwmon
    d.mkdir(parents=True)
    files = {"name": "ina3221", "update_interval": "1100", "samples": "512",
             "in7_label": "sum of shunt voltages", "in7_input": "160", "curr4_input": "0"}
    for n, (label, mv, ma) in channels.items():
        files.update({f"in{n}_label": label, f"in{n}_input": mv, f"curr{n}_input": ma,
                      f"in{n}_enable": "1", f"in{n + 3}_input": "40", f"shunt{n}_resistor": "5000",
                      f"curr{n}_crit": "7784", f"curr{n}_max": "7784", f"curr{n}_crit_alarm": "0"})
    for k, v in files.items():
        (d / k).write_text(f"{v}\n")
    return d


def orin_nano_tree(root, vdd_in=(5000, 1000)):
    return write_ina3221(root, "1-0040", "hwmon1", {
        1: ("VDD_IN", *vdd_in), 2: ("VDD_CPU_GPU_CV", 4992, 320), 3: ("VDD_SOC", 4992, 280)})


def agx_orin_tree(root):
    a = write_ina3221(root, "1-0040", "hwmon2", {
        1: ("VDD_GPU_SOC", 19984, 400), 2: ("VDD_CPU_CV", 19984, 200), 3: ("VIN_SYS_5V0", 5000, 600)})
    b = write_ina3221(root, "1-0041", "hwmon3", {
        1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 4976, 96), 3: ("NC", 0, 0)})
    return a, b


def test_orin_nano_reads_vdd_in_and_integrates(tmp_path):
    hw = orin_nano_tree(tmp_path)
    prof = load_profile("jetson-orin-nano-8gb")
    clock = FakeClock()
    m = make_power_meter(prof, root=str(tmp_path), clock=clock)
    assert isinstance(m, Ina3221Meter) and m.measured and m.fallback_reason is None
    assert m.power_w() == pytest.approx(5.0)  # 5000 mV * 1000 mA, VDD_IN only
    m.start()
    (hw / "curr1_input").write_text("2000\n")  # load rises to 10 W
    clock.t += 2.0
    assert m.tick() == pytest.approx(0.5 * (5 + 10) * 2)  # trapezoid: 15 J
    clock.t += 3.0
    assert m.tick() == pytest.approx(15 + 10 * 3)
    (hw / "in1_input").write_text("0\n")
    clock.t += 1.0
    assert m.tick() == pytest.approx(45 + 0.5 * 10 * 1)
    assert m.energy_j == pytest.approx(50.0)


def test_agx_orin_sums_rails_over_two_devices(tmp_path):
    agx_orin_tree(tmp_path)
    prof = load_profile("jetson-agx-orin-64gb")
    m = make_power_meter(prof, root=str(tmp_path))
    assert isinstance(m, Ina3221Meter)
    rails = m.read_rails()
    assert rails == pytest.approx({"VDD_GPU_SOC": 7.9936, "VDD_CPU_CV": 3.9968, "VIN_SYS_5V0": 3.0})
    assert m.power_w() == pytest.approx(7.9936 + 3.9968 + 3.0)
    # a rail of the second device is reachable too
    assert Ina3221Meter(["VDDQ_VDD2_1V8AO"], GLOB, root=str(tmp_path)).power_w() == pytest.approx(0.477696)


def test_wrong_profile_for_the_board_lists_labels(tmp_path):
    agx_orin_tree(tmp_path)
    with pytest.raises(UserError) as e:
        make_power_meter(load_profile("jetson-orin-nano-8gb"), root=str(tmp_path))
    msg = str(e.value)
    assert "VDD_IN" in msg and "VDD_GPU_SOC" in msg and "VDDQ_VDD2_1V8AO" in msg


def test_no_sysfs_falls_back_to_estimate(tmp_path):
    m = make_power_meter(load_profile("jetson-orin-nano-4gb"), root=str(tmp_path))
    assert isinstance(m, EstimatedMeter) and not m.measured
    assert "ina3221" in m.fallback_reason


def test_power_mode_caps_the_estimate(tmp_path):
    prof = load_profile("jetson-orin-nano-8gb")
    free = make_power_meter(prof, root=str(tmp_path))
    capped = make_power_meter(prof, root=str(tmp_path), power_mode="7W")
    assert free.max_w == prof.max_w and capped.max_w == 7.0 and capped.idle_w <= 7.0
    assert "7W" in capped.source and "7W" not in free.source


# NVML is tested against a fake at the library-call level: a stand-in `pynvml` module in
# sys.modules whose functions return scripted values (no NVIDIA driver needed, and pynvml
# itself is not installed here).
def fake_pynvml(energy_mj=(), power_mw=75000, counter=True):
    nv = types.ModuleType("pynvml")
    nv.calls = []

    class NVMLError(Exception):
        pass

    energy = iter(energy_mj)

    def total_energy(handle):
        assert handle == "handle-0"
        if not counter:
            raise NVMLError("Not Supported")
        return next(energy)

    nv.NVMLError = NVMLError
    nv.nvmlInit = lambda: nv.calls.append("init")
    nv.nvmlShutdown = lambda: nv.calls.append("shutdown")
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"handle-{i}"
    nv.nvmlDeviceGetTotalEnergyConsumption = total_energy
    nv.nvmlDeviceGetPowerUsage = lambda h: power_mw
    return nv


def test_nvml_energy_from_counter(monkeypatch):
    # probe read in __init__, start, two ticks (mJ since driver load)
    nv = fake_pynvml(energy_mj=[1_000_000, 1_000_500, 1_013_000, 1_020_500])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    m = make_power_meter(load_profile("desktop-nvidia-gpu"))
    assert isinstance(m, NvmlMeter) and m.measured and m.has_counter
    assert nv.calls == ["init"]
    assert m.power_w() == pytest.approx(75.0)
    m.start()
    assert m.tick() == pytest.approx(12.5)
    assert m.tick() == pytest.approx(20.0) and m.energy_j == pytest.approx(20.0)
    m.close()
    assert nv.calls == ["init", "shutdown"]


def test_nvml_without_counter_integrates_power(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(power_mw=50000, counter=False))
    clock = FakeClock()
    m = NvmlMeter(clock=clock).start()
    assert not m.has_counter
    clock.t += 4.0
    assert m.tick() == pytest.approx(200.0)


def test_nvml_missing_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    m = make_power_meter(load_profile("desktop-nvidia-gpu"))
    assert isinstance(m, EstimatedMeter) and "nvml" in m.fallback_reason


def test_estimated_meter_runs_for_real():
    prof = load_profile("host-cpu")
    m = make_power_meter(prof)
    assert isinstance(m, EstimatedMeter) and m.measured is False
    assert m.source == "estimate: cpu-util x profile power model"
    assert "no power sensor" in m.fallback_reason
    m.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.3:  # keep one core busy
        sum(i * i for i in range(10000))
    busy = m.power_w()
    import psutil
    if sum(psutil.Process().cpu_times()[:2]) == 0:     # qemu-user fakes /proc/self/stat with zero CPU times
        pytest.skip("this system reports no per-process CPU time (qemu-user emulation): nothing to estimate from")
    time.sleep(0.3)
    idle = m.power_w()
    # one busy core of m.cores moves the estimate a good part of 1/cores of the way to max_w;
    # sleeping brings it back towards idle_w
    assert busy >= prof.idle_w + 0.5 * (prof.max_w - prof.idle_w) / m.cores, (busy, m.cores)
    assert idle < busy and idle <= prof.idle_w + 0.2 * (prof.max_w - prof.idle_w) / m.cores, (idle, busy)
    t1 = time.monotonic()
    e1 = m.tick()                            # trapezoids since start(): between the two power levels
    assert prof.idle_w * (t1 - t0) * 0.95 <= e1 <= busy * (time.monotonic() - t0) * 1.05


_SAMPLER_CHECK = """
import time
from taskedge.runtime.telemetry import MemorySampler, peak_rss_mb, rss_mb, system_available_mb
assert rss_mb() > 1 and system_available_mb() > 1
assert peak_rss_mb() >= rss_mb() * 0.99
with MemorySampler(interval_ms=5) as ms:
    base = rss_mb()
    blob = bytearray(64 << 20)          # 64 MiB of fresh pages ...
    blob[::4096] = b"\\x01" * len(blob[::4096])   # ... touched, so resident
    seen = ms.samples
    deadline = time.monotonic() + 10    # a loaded machine may starve the sampler thread a while
    while ms.samples < seen + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    del blob
    time.sleep(0.02)
    assert ms.peak_mb() >= base + 50, (ms.peak_mb(), base)   # the sampler saw the blob after it was freed
    ms.reset()                          # new window: starts from the current RSS, the blob is forgotten
    assert ms.peak_mb() < base + 50
assert ms.samples >= 3
ms2 = MemorySampler(interval_s=0.001).start()
assert ms2.interval == 0.001 and ms2.stop() > 1
"""


def test_memory_helpers_and_sampler():
    # in a fresh interpreter: in a long test process, freed heap pages are reused and RSS would not grow
    r = subprocess.run([sys.executable, "-c", _SAMPLER_CHECK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_runtime_modules_do_not_import_torch():
    code = ("import sys, taskedge.runtime.profiles, taskedge.runtime.telemetry\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'pynvml' not in sys.modules, 'pynvml must be imported lazily'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
