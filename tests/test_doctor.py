"""doctor: passes on this host with host-cpu; fake board roots give warnings/failures with fixes."""
import json
import os
from types import SimpleNamespace

import pytest

from conftest import run_cli
from taskedge.runtime import doctor
from test_probe import agx_orin_tree, orin_nano_tree, write


def checks(stdout):
    rep = json.loads(stdout)
    return rep, {c["name"]: c for c in rep["checks"]}


def test_host_cpu_passes():
    r = run_cli("doctor", "--profile", "host-cpu", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep, c = checks(r.stdout)
    assert rep["ok"] and rep["profile"] == "host-cpu" and rep["counts"]["fail"] == 0
    assert {"python", "runtime", "onnxruntime", "providers", "cuda", "power", "memory", "disk"} == set(c)
    for name in ("python", "runtime", "onnxruntime", "providers", "cuda", "power"):
        assert c[name]["status"] == "ok", c[name]
    assert "torch-free" in c["runtime"]["detail"] and "no onnxruntime.training" in c["runtime"]["detail"]
    assert set(rep["checks"][0]) == {"name", "status", "detail", "fix"}
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
    # no CUDA provider in this host's onnxruntime: a warning pointing to NVIDIA's wheel, not a failure
    assert c["providers"]["status"] == "ok" or "onnxruntime-gpu wheel" in c["providers"]["fix"]
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


def fake_ort(version, providers=("CPUExecutionProvider",), site=None):
    import onnxruntime
    init = os.path.join(str(site), "onnxruntime", "__init__.py") if site else onnxruntime.__file__
    return SimpleNamespace(__version__=version, __file__=init, get_available_providers=lambda: list(providers))


def test_ort_version_and_fix_texts():
    c = doctor.check_ort_version(fake_ort("1.16.3"))
    assert c.status == "warn" and "older than 1.17" in c.detail and "pip install onnxruntime" in c.fix
    assert doctor.check_ort_version(fake_ort("1.23.2")).status == "ok"
    assert doctor._version_tuple("1.24.0.dev20250101") == (1, 24)
    for text in (doctor.ORT_FIX, doctor.CUDA_FIX):
        assert "onnxruntime-gpu" in text and "source" not in text and "training" not in text


def test_duplicate_ort_distributions_warn(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for name in ("onnxruntime", "onnxruntime_gpu"):
        write(site / f"{name}-1.20.0.dist-info/METADATA",
              f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.20.0\n")
    monkeypatch.syspath_prepend(str(site))
    c = doctor.check_ort_version(fake_ort("1.20.0", site=site))
    assert c.status == "warn" and "onnxruntime==1.20.0, onnxruntime-gpu==1.20.0" in c.detail
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in c.fix


def test_providers_cuda_missing_points_to_nvidia_wheel():
    jetson = SimpleNamespace(execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    c = doctor.check_providers(fake_ort("1.23.2"), jetson)
    assert c.status == "warn" and "CUDAExecutionProvider missing" in c.detail
    assert c.fix == doctor.CUDA_FIX and "Jetson Zoo" in c.fix
    c = doctor.check_providers(fake_ort("1.23.2", ["CUDAExecutionProvider", "CPUExecutionProvider"]), jetson)
    assert c.status == "ok"
    c = doctor.check_providers(fake_ort("1.23.2", ["AzureExecutionProvider"]), jetson)
    assert c.status == "fail"


@pytest.mark.parametrize("module, code", [("torch", "torch"), ("onnxruntime.training", "onnxruntime.training")])
def test_runtime_check_fails_when_forbidden_module_is_loaded(module, code, tmp_path, monkeypatch):
    # a sitecustomize that plants the module, as if the runtime had imported it
    write(tmp_path / "sitecustomize.py", f"import sys, types; sys.modules[{module!r}] = types.ModuleType({module!r})\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    c = doctor.check_runtime()
    assert c.status == "fail" and f"loaded {code}" in c.detail, c.detail
