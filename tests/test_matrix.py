"""The generality matrix (README "Models it takes"): each row a model, each checked the same way
-- export with default flags (plus --num-classes/--output/--pool), adapt 20 steps on the board
path, merge parity with the bundle's eval graph to 1e-5, and --resume: 10 steps, then resumed
to 20, equal to the straight run. The opset rows convert one small transformer-style model
(MatMul, LayerNorm or its opset-13 decomposition, Softmax, Gelu/Tanh, Conv) with onnx's own
version converter; the IR rows only change the file's IR version."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from test_any_model import adapt_merge_parity

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")


class Block(torch.nn.Module):
    """conv stem -> tokens -> LayerNorm -> attention-style mixing -> GELU MLP -> mean -> features."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.qk = torch.nn.Linear(8, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, pixels):
        t = self.stem(pixels).flatten(2).transpose(1, 2)                 # [B, 16, 8]
        h = self.norm(t)
        q, k = self.qk(h).chunk(2, dim=-1)
        t = t + torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, -1) @ h
        return (t + self.mlp(self.norm(t))).mean(1)


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    d = tmp_path_factory.mktemp("block")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((160, 1, 8, 8)).astype(np.float32)
    np.savez(d / "train.npz", pixels=x, labels=(x.mean((1, 2, 3)) > 0).astype(np.int64))
    return d


def block_onnx(folder, opset: int):
    """torch.onnx writes opsets up to 20 (LayerNorm decomposed below 17); 21 by onnx's version converter."""
    path = folder / f"block{opset}.onnx"
    torch.manual_seed(0)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32))
    torch.onnx.export(Block().eval(), (x,), str(path), dynamo=False, input_names=["pixels"], output_names=["features"],
                      dynamic_axes={"pixels": {0: "b"}, "features": {0: "b"}}, opset_version=min(opset, 20))
    if opset > 20:
        from onnx import version_converter
        onnx.save(version_converter.convert_version(onnx.load(str(path)), opset), str(path))
    return path


def check_row(model, data, tmp_path, **export_flags):
    """export -> adapt 20 -> merge parity 1e-5 -> resume 10 + 10 == straight 20."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in export_flags.items()]
    r = run_cli("export", model, "--calib", data, "--num-classes", 2, "--out", tmp_path / "bundle", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    adapt_merge_parity(tmp_path / "bundle", data, tmp_path, steps=20)
    common = ["--data", data, "--batch-size", 16, "--lr", "0.01", "--quiet", "--json"]
    r = run_cli("adapt", tmp_path / "bundle", "--run-dir", tmp_path / "resumed", "--steps", 10, *common)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("adapt", tmp_path / "bundle", "--run-dir", tmp_path / "resumed", "--steps", 20, "--resume",
                *common)
    assert r.returncode == 0 and json.loads(r.stdout)["resume"]["from"], r.stderr[-2000:]
    straight, resumed = np.load(tmp_path / "run" / "update.npz"), np.load(tmp_path / "resumed" / "update.npz")
    assert sorted(straight.files) == sorted(resumed.files)
    for k in straight.files:
        assert np.array_equal(straight[k], resumed[k]), k


# opset -> the IR version that opset needs (the pairing onnx's helper uses)
OPSETS = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


@pytest.mark.parametrize("opset", sorted(OPSETS))
def test_opset(block, tmp_path, opset):
    m = onnx.load(str(block_onnx(tmp_path, opset)))
    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == opset
    m.ir_version = OPSETS[opset]
    onnx.save(m, str(tmp_path / "model.onnx"))
    check_row(tmp_path / "model.onnx", block / "train.npz", tmp_path)


def test_ir_version_11(block, tmp_path):
    """IR 11 (onnx >= 1.18 writes it); the host's ORT-training 1.19 reads IR <= 10: export reads it as 10."""
    m = onnx.load(str(block_onnx(tmp_path, 17)))
    m.ir_version = 11
    onnx.save(m, str(tmp_path / "ir11.onnx"))
    check_row(tmp_path / "ir11.onnx", block / "train.npz", tmp_path)


def test_external_data(block, tmp_path):
    """Weights in a separate file (how models over protobuf's 2 GB limit ship), read from beside the model."""
    m = onnx.load(str(block_onnx(tmp_path, 17)))
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 1000
    check_row(tmp_path / "ext.onnx", block / "train.npz", tmp_path)


def test_plain_cnn(cnn_onnx, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((160, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", pixels=x, labels=(x[:, 0, :4].mean((1, 2)) > 0).astype(np.int64))
    check_row(cnn_onnx, tmp_path / "d.npz", tmp_path)


def test_several_outputs_with_pooling(tmp_path):
    from test_any_model import Encoder, _export_torch
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (160, 8)).astype(np.int64)
    mask = (np.arange(8)[None] < rng.integers(3, 9, (160, 1))).astype(np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask, labels=(ids[:, 0] % 2).astype(np.int64))
    model = _export_torch(Encoder(), {"input_ids": torch.from_numpy(ids[:2]), "attention_mask": torch.from_numpy(mask[:2])},
                          tmp_path / "enc.onnx", ["output", "mask", "token_embeddings", "sentence_embedding"])
    check_row(model, tmp_path / "d.npz", tmp_path, output="token_embeddings", pool="mean")
