"""Shared fixtures: small real ONNX models built with torch.onnx, and their bundles."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m taskedge.runtime.cli ARGS` in a fresh process; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "taskedge.runtime.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def open_trainer(bundle, checkpoint=None):
    """The runtime's Trainer on a bundle: its initial state, or a checkpoint's."""
    from taskedge.runtime import bundle as B
    from taskedge.runtime.trainer import Trainer, TrainState
    man = B.load_bundle(bundle)
    state = TrainState.initial(bundle, man) if checkpoint is None else \
        TrainState.from_file(checkpoint, man.trainable_names)
    return Trainer(bundle, man, state)


def standard_only(bundle):
    """The step graph runs in plain onnxruntime: standard ops plus contrib ops of every build; the
    trainable state is its input, the frozen weights are initializers stored once in weights.bin."""
    import onnx
    from taskedge.export.lower import runs_on_plain_ort
    from taskedge.runtime import bundle as B
    step = onnx.load(str(bundle / B.STEP_MODEL), load_external_data=False)
    odd = {n.op_type for n in step.graph.node if not runs_on_plain_ort(n)}
    assert not odd, odd
    return step


def make_task(n=512, d=16, classes=3, seed=0):
    """A learnable 3-class problem on 16 features."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, classes)).astype(np.float32)
    y = (x @ w).argmax(1).astype(np.int64)
    return x, y


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="host-only fixture (the board venvs have no torch)")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 5))
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    torch.onnx.export(m, (torch.randn(2, 16),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return path


@pytest.fixture(scope="session")
def cnn_onnx(tmp_path_factory):
    """Conv + depthwise conv + pointwise conv + a MatMul on 3-D activations (a token mixer)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = torch.nn.Conv2d(8, 16, 1)
            self.tok = torch.nn.Linear(16, 16)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.c1(x))))))
            t = self.tok(h.flatten(2).transpose(1, 2))          # [B, HW, 16] -> MatMul
            return self.fc(t.mean(1))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "cnn.onnx"
    torch.onnx.export(Net(), (torch.randn(2, 1, 8, 8),), str(path), dynamo=False, input_names=["pixels"],
                      output_names=["y"], dynamic_axes={"pixels": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return path


@pytest.fixture(scope="session")
def mlp_data(tmp_path_factory):
    x, y = make_task()
    d = tmp_path_factory.mktemp("data")
    np.savez(d / "train.npz", x=x[:400], labels=y[:400])
    np.savez(d / "test.npz", x=x[400:], labels=y[400:])
    return d


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory, mlp_onnx, mlp_data):
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    out = tmp_path_factory.mktemp("bundles") / "mlp"
    export_bundle(ExportConfig(model=str(mlp_onnx), out=str(out), calib=str(mlp_data / "train.npz"),
                               budget=0.05, num_classes=3, lr=0.01), log=lambda m: None)
    return out
