"""CMakeLists.txt: configure (nothing to build: the board runtime needs a plain onnxruntime) and run ctest."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not shutil.which("cmake") or not shutil.which("ctest"), reason="cmake not installed")


def test_configure_and_ctest(tmp_path):
    build = tmp_path / "build"
    r = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100% tests passed, 0 tests failed out of 3" in r.stdout
    assert "smoke_adapt" in r.stdout and "Skipped" not in r.stdout
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "ExternalProject" not in text and "TASKEDGE_BUILD_ORT" not in text  # no ONNX Runtime source build

