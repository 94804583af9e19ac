"""probe: fixture trees laid out like a real Orin Nano 8GB (JetPack 6.2) and AGX Orin 64GB."""
import json
import os

import pytest

from conftest import run_cli
from taskedge.runtime.profiles import list_profiles, load_profile
from taskedge.runtime.probe import (closest_profile, parse_cpu_list, parse_nvpmodel_conf, probe, read_model,
                                  write_profile)

# Excerpt of /etc/nvpmodel/nvpmodel_p3767_0003.conf (Orin Nano 8GB, JetPack 6.2 "super" modes).
NANO_CONF = """\
< PARAM TYPE=FILE NAME=CPU_ONLINE >
CORE_0 /sys/devices/system/cpu/cpu0/online
CORE_1 /sys/devices/system/cpu/cpu1/online
< PARAM TYPE=CLOCK NAME=CPU_A78_0 >
FREQ_TABLE /sys/devices/system/cpu/cpu0/cpufreq/scaling_available_frequencies
MAX_FREQ /sys/devices/system/cpu/cpu0/cpufreq/scaling_max_freq

###########################
#                         #
#    POWER_MODEL DEFINE   #
#                         #
###########################
< POWER_MODEL ID=0 NAME=15W >
CPU_ONLINE CORE_0 1
CPU_ONLINE CORE_1 1
CPU_A78_0 MAX_FREQ 1497600
< POWER_MODEL ID=1 NAME=25W >
CPU_ONLINE CORE_0 1
CPU_A78_0 MAX_FREQ 1344000
< POWER_MODEL ID=2 NAME=MAXN_SUPER >
CPU_ONLINE CORE_0 1
CPU_A78_0 MAX_FREQ -1
< POWER_MODEL ID=3 NAME=7W >
CPU_ONLINE CORE_0 1
CPU_A78_0 MAX_FREQ 960000

< PM_CONFIG DEFAULT=0 >
"""

AGX_CONF = """\
< POWER_MODEL ID=0 NAME=MAXN >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=1 NAME=15W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=2 NAME=30W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=3 NAME=50W >
CPU_ONLINE CORE_0 1
< PM_CONFIG DEFAULT=2 >
"""

MEMINFO = """\
MemTotal:       {kb} kB
MemFree:         5123456 kB
MemAvailable:    {avail} kB
Buffers:           86232 kB
Cached:          1234567 kB
SwapTotal:       3901000 kB
"""


def write(p, text, mode="w"):
    p.parent.mkdir(parents=True, exist_ok=True)
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def ina3221(root, dev, hwmon, channels):
    """One INA3221 as the upstream hwmon driver shows it on JetPack 5/6 (plus files to ignore)."""
    d = root / "sys/bus/i2c/drivers/ina3221" / dev / "hwmon" / hwmon
    files = {"name": "ina3221", "update_interval": "1100", "in7_label": "sum of shunt voltages",
             "in7_input": "160", "curr4_input": "0"}
    for n, (label, mv, ma) in channels.items():
        files.update({f"in{n}_label": label, f"in{n}_input": mv, f"curr{n}_input": ma, f"in{n}_enable": "1",
                      f"in{n + 3}_input": "40", f"shunt{n}_resistor": "5000", f"curr{n}_crit": "7784"})
    for k, v in files.items():
        write(d / k, f"{v}\n")


def orin_nano_tree(root, status="pmode:0001\n", rails=True):
    write(root / "proc/device-tree/model", b"NVIDIA Jetson Orin Nano Developer Kit\x00", "wb")
    # JetPack: /etc/nvpmodel.conf is an absolute symlink to the board's file
    write(root / "etc/nvpmodel/nvpmodel_p3767_0003.conf", NANO_CONF)
    os.symlink("/etc/nvpmodel/nvpmodel_p3767_0003.conf", root / "etc/nvpmodel.conf")
    if status is not None:
        write(root / "var/lib/nvpmodel/status", status)
    write(root / "proc/meminfo", MEMINFO.format(kb=7802172, avail=6012345))
    write(root / "sys/devices/system/cpu/present", "0-5\n")
    if rails:
        ina3221(root, "1-0040", "hwmon1", {1: ("VDD_IN", 5056, 1176), 2: ("VDD_CPU_GPU_CV", 5048, 312),
                                           3: ("VDD_SOC", 5048, 728)})
    return root


def agx_orin_tree(root):
    write(root / "proc/device-tree/model", b"NVIDIA Jetson AGX Orin Developer Kit\x00", "wb")
    write(root / "etc/nvpmodel.conf", AGX_CONF)
    write(root / "var/lib/nvpmodel/status", "pmode:0000\nfmode:quiet\n")
    write(root / "proc/meminfo", MEMINFO.format(kb=64335836, avail=60012345))
    write(root / "sys/devices/system/cpu/present", "0-11\n")
    ina3221(root, "1-0040", "hwmon2", {1: ("VDD_GPU_SOC", 19936, 856), 2: ("VDD_CPU_CV", 19936, 320),
                                       3: ("VIN_SYS_5V0", 5016, 784)})
    ina3221(root, "1-0041", "hwmon3", {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 5000, 120), 3: ("NC", 0, 0)})
    return root


def test_orin_nano_8gb(tmp_path):
    root = orin_nano_tree(tmp_path / "nano")
    assert read_model(str(root)) == "NVIDIA Jetson Orin Nano Developer Kit"
    res = probe(str(root))
    p = res["profile"]
    assert res["base"] == "jetson-orin-nano-8gb"
    assert p["board"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert p["memory_mb"] == 7802172 // 1024 and p["cpu_cores"] == 6
    assert p["power"]["modes"] == {"15W": 15.0, "25W": 25.0, "MAXN_SUPER": 25.0, "7W": 7.0}
    assert p["power"]["default_mode"] == "25W"          # pmode:0001 = the current mode
    assert p["power"]["sensor"] == "ina3221" and p["power"]["rails"] == ["VDD_IN"]
    assert p["execution_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]

    out = tmp_path / "profile.toml"
    r = run_cli("probe", "--root", root, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["out"] == str(out)
    loaded = load_profile(out)  # validates
    assert loaded.name == "probed-nvidia-jetson-orin-nano-developer-kit"
    assert loaded.rails == ["VDD_IN"] and loaded.default_mode == "25W" and loaded.mode_watts("7W") == 7.0
    assert out.read_text().startswith("# TaskEdge device profile written by `taskedge probe`")
    # and the runtime can meter power with it on that tree
    from taskedge.runtime.telemetry import make_power_meter
    m = make_power_meter(loaded, root=str(root))
    assert m.measured and abs(m.power_w() - 5056 * 1176 / 1e6) < 1e-9


def test_agx_orin_64gb(tmp_path):
    root = agx_orin_tree(tmp_path / "agx")
    res = probe(str(root), name="lab-agx")
    p = res["profile"]
    assert res["base"] == "jetson-agx-orin-64gb"
    assert p["name"] == "lab-agx" and p["cpu_cores"] == 12 and p["memory_mb"] == 64335836 // 1024
    assert p["power"]["default_mode"] == "MAXN" and p["power"]["modes"]["MAXN"] == 60.0
    assert p["power"]["modes"]["30W"] == 30.0
    assert p["power"]["rails"] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]  # no VDD_IN: the sum
    out = tmp_path / "agx.toml"
    write_profile(res, out)
    assert load_profile(out).rails == p["power"]["rails"]


def test_missing_status_rails_and_conf(tmp_path):
    root = orin_nano_tree(tmp_path / "n", status=None, rails=False)
    res = probe(str(root))
    assert res["profile"]["power"]["default_mode"] == "15W"  # PM_CONFIG DEFAULT=0
    assert res["profile"]["power"]["sensor"] == "none" and res["profile"]["power"]["rails"] == []
    assert any("no INA3221" in n for n in res["notes"])
    write_profile(res, tmp_path / "p.toml")
    assert load_profile(tmp_path / "p.toml").sensor == "none"

    bare = tmp_path / "bare"
    write(bare / "proc/device-tree/model", b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\x00", "wb")
    write(bare / "proc/meminfo", MEMINFO.format(kb=15655000, avail=14000000))
    res = probe(str(bare))
    assert res["base"] == "jetson-orin-nx-16gb"
    assert res["profile"]["power"]["modes"] == load_profile("jetson-orin-nx-16gb").modes
    assert any("nvpmodel.conf" in n for n in res["notes"])


@pytest.mark.parametrize("model,mem_mb,want", [
    ("NVIDIA Jetson Orin Nano Developer Kit", 7620, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", 7620, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano 4GB", 3700, "jetson-orin-nano-4gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 7450, "jetson-orin-nx-8gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", 30536, "jetson-agx-orin-32gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", 62841, "jetson-agx-orin-64gb"),
    (None, 16000, "host-cpu"),
])
def test_closest_profile(model, mem_mb, want):
    assert closest_profile(model, mem_mb, profiles=list_profiles()).name == want


def test_parsers():
    assert parse_cpu_list("0-5\n") == 6 and parse_cpu_list("0-3,6,8-11") == 9 and parse_cpu_list("0") == 1
    modes, default = parse_nvpmodel_conf(NANO_CONF)
    assert modes == {0: "15W", 1: "25W", 2: "MAXN_SUPER", 3: "7W"} and default == 0


def test_probe_prints_without_out(tmp_path):
    root = orin_nano_tree(tmp_path / "nano")
    r = run_cli("probe", "--root", root)
    assert r.returncode == 0 and 'rails = ["VDD_IN"]' in r.stdout
    r = run_cli("probe", "--root", tmp_path / "nope")
    assert r.returncode == 2 and "not a folder" in r.stderr
