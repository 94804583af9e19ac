"""doctor: passes on this host with host-cpu; fake board roots give warnings/failures with fixes."""
import json

from conftest import run_cli
from test_probe import agx_orin_tree, orin_nano_tree, write


def checks(stdout):
    rep = json.loads(stdout)
    return rep, {c["name"]: c for c in rep["checks"]}


def test_host_cpu_passes():
    r = run_cli("doctor", "--profile", "host-cpu", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep, c = checks(r.stdout)
    assert rep["ok"] and rep["profile"] == "host-cpu" and rep["counts"]["fail"] == 0
    assert {"python", "runtime", "onnxruntime", "training-api", "providers", "cuda", "power", "memory",
            "disk"} <= set(c)
    for name in ("python", "runtime", "onnxruntime", "training-api", "providers", "cuda", "power"):
        assert c[name]["status"] == "ok", c[name]
    assert "torch-free" in c["runtime"]["detail"]
    r = run_cli("doctor", "--profile", "host-cpu")
    assert r.returncode == 0 and "0 fail" in r.stdout


def test_orin_nano_fake_root(tmp_path):
    root = orin_nano_tree(tmp_path / "nano")
    write(root / "dev/nvhost-ctrl-gpu", "")
    r = run_cli("doctor", "--root", root, "--json")  # profile picked from the tree
    rep, c = checks(r.stdout)
    assert rep["profile"] == "jetson-orin-nano-8gb" and rep["profile_chosen"] == "auto"
    assert c["cuda"]["status"] == "ok" and "nvhost-ctrl-gpu" in c["cuda"]["detail"]
    assert c["power"]["status"] == "ok" and "VDD_IN" in c["power"]["detail"]
    # memory comes from the tree's MemAvailable (5871 MB) vs the 8 GB profile's 4915 MB budget
    assert c["memory"]["status"] == "ok" and "5871 MB available" in c["memory"]["detail"]
    # no CUDA provider in this host's onnxruntime: a warning with the build fix, not a failure
    assert c["providers"]["status"] == "ok" or "--use_cuda" in c["providers"]["fix"]
    assert r.returncode == 0, r.stdout


def test_missing_rails_cuda_and_memory(tmp_path):
    # an AGX tree checked with the Orin Nano profile: VDD_IN is missing -> fail naming the fix
    root = agx_orin_tree(tmp_path / "agx")
    r = run_cli("doctor", "--profile", "jetson-orin-nano-8gb", "--root", root, "--json")
    assert r.returncode == 1
    rep, c = checks(r.stdout)
    assert not rep["ok"]
    assert c["power"]["status"] == "fail" and "VDD_IN" in c["power"]["detail"]
    assert "taskedge probe" in c["power"]["fix"]
    assert c["cuda"]["status"] == "fail" and "JetPack" in c["cuda"]["fix"]  # no /dev/nvhost-* in the tree

    # no INA3221 at all: energy is estimated -> warn; tiny MemAvailable -> warn/fail with a fix
    bare = tmp_path / "bare"
    write(bare / "dev/nvidia0", "")
    write(bare / "proc/meminfo", "MemTotal: 8000000 kB\nMemAvailable: 2000000 kB\n")
    r = run_cli("doctor", "--profile", "jetson-orin-nano-8gb", "--root", bare, "--json")
    rep, c = checks(r.stdout)
    assert c["power"]["status"] == "warn" and "estimated" in c["power"]["detail"] and c["power"]["fix"]
    assert c["memory"]["status"] == "warn" and "--memory-budget-mb 1562" in c["memory"]["fix"]
    write(bare / "proc/meminfo", "MemTotal: 8000000 kB\nMemAvailable: 100000 kB\n")
    r = run_cli("doctor", "--profile", "jetson-orin-nano-8gb", "--root", bare)
    assert r.returncode == 1 and "[fail] memory" in r.stdout and "fix: free memory" in r.stdout


def test_bundle_and_bad_input(mlp_bundle, tmp_path):
    r = run_cli("doctor", "--profile", "host-cpu", "--bundle", mlp_bundle, "--dir", tmp_path, "--json")
    rep, c = checks(r.stdout)
    assert r.returncode == 0 and c["bundle"]["status"] == "ok"
    r = run_cli("doctor", "--profile", "no-such-board")
    assert r.returncode == 2 and "unknown device profile" in r.stderr
