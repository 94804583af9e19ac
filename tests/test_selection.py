"""`--selection`: the ablation rules pick what they say, with the same per-neuron k."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from taskedge.runtime import bundle as B
from taskedge.runtime.fsutil import UserError


def _export(tmp_path, mlp_onnx, mlp_data, selection, **kw):
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    out = tmp_path / selection
    man = export_bundle(ExportConfig(model=str(mlp_onnx), out=str(out), calib=str(mlp_data / "train.npz"),
                                     budget=0.05, num_classes=3, selection=selection, **kw), log=lambda m: None)
    alloc = np.load(out / B.ALLOCATION)
    return man, {k: alloc[k].astype(np.int64) for k in alloc.files}


def _weights(mlp_onnx):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(mlp_onnx)).graph.initializer}


def test_every_rule_gives_the_same_budget_and_its_own_choice(tmp_path, mlp_onnx, mlp_data):
    picks, ks = {}, set()
    for rule in ("taskedge", "magnitude", "activation", "random"):
        man, picks[rule] = _export(tmp_path, mlp_onnx, mlp_data, rule)
        assert man.method["selection"] == rule
        ks.add(tuple(l.k for l in man.layers))
    assert len(ks) == 1 and min(next(iter(ks))) >= 2                  # the same per-neuron k for every rule
    w = _weights(mlp_onnx)
    for layer, idx in picks["magnitude"].items():                       # Gemm transB: W is [rows, cols]
        top = np.sort(np.argsort(-np.abs(w[layer]), axis=1, kind="stable")[:, :idx.shape[1]], axis=1)
        assert np.array_equal(idx, top), layer
    for idx in picks["activation"].values():                            # one ranking of the inputs for all rows
        assert (idx == idx[0]).all()
    assert not all(np.array_equal(picks["random"][k], picks["taskedge"][k]) for k in picks["taskedge"])


def test_gradient_rule_is_gps_on_the_calibration_data(tmp_path, mlp_onnx, mlp_data):
    """Top-k of sum |dL/dW| over the calibration batches, checked against PyTorch autograd on the
    same weights, the same new head and the same batches."""
    torch = pytest.importorskip("torch")
    man, picks = _export(tmp_path, mlp_onnx, mlp_data, "gradient", calib_batches=4, batch_size=50)
    w = _weights(mlp_onnx)
    head = np.load(tmp_path / "gradient" / B.INITIAL_STATE)
    names = [l.weight for l in man.layers]
    lin = [torch.nn.Parameter(torch.from_numpy(w[n].copy())) for n in names]
    bias = [torch.from_numpy(w[n.replace("weight", "bias")]) for n in names]
    hw, hb = (torch.from_numpy(head[p]) for p in man.head["params"])
    z = np.load(mlp_data / "train.npz")
    total = [torch.zeros_like(p) for p in lin]
    for s in range(0, 200, 50):
        h = torch.from_numpy(z["x"][s:s + 50])
        for p, b in zip(lin, bias):
            h = torch.relu(h @ p.T + b)
        loss = torch.nn.functional.cross_entropy(h @ hw.T + hb, torch.from_numpy(z["labels"][s:s + 50]))
        grads = torch.autograd.grad(loss, lin)
        total = [t + g.abs() for t, g in zip(total, grads)]
    for n, t in zip(names, total):
        top = np.sort(np.argsort(-t.numpy(), axis=1, kind="stable")[:, :picks[n].shape[1]], axis=1)
        agree = (picks[n] == top).all(1).mean()
        assert agree > 0.95, (n, agree)                  # float32 near-ties may swap a few rows' last pick


def test_gradient_rule_needs_labels(tmp_path, mlp_onnx, mlp_data):
    z = np.load(mlp_data / "train.npz")
    np.savez(tmp_path / "nolabels.npz", x=z["x"])
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    with pytest.raises(UserError, match="needs labels"):
        export_bundle(ExportConfig(model=str(mlp_onnx), out=str(tmp_path / "b"), calib=str(tmp_path / "nolabels.npz"),
                                   budget=0.05, num_classes=3, selection="gradient"), log=lambda m: None)
    assert not (tmp_path / "b").exists()
