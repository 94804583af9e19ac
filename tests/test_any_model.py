"""Models this repo did not write: several outputs, [batch, seq, F] features, tensors that
torch.onnx merged because they were identical. Each goes export -> adapt -> merge (parity with
the bundle's eval graph to 1e-5) with no graph editing by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from taskedge.runtime import bundle as B
from taskedge.runtime.fsutil import UserError

from conftest import open_trainer, run_cli

torch = pytest.importorskip("torch")


class Encoder(torch.nn.Module):
    """Token ids -> four outputs, as sentence-embedding exports ship them: the ids passed through
    (int64), the mask (int64), token embeddings [batch, seq, 16] and the pooled embedding [batch, 16]."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.mix = torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        tokens = torch.tanh(self.mix(self.emb(input_ids)))
        m = attention_mask.unsqueeze(-1).float()
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return input_ids, attention_mask, tokens, pooled


def _export_torch(module, example: dict, path, outputs):
    torch.manual_seed(0)
    axes = {n: {0: "batch"} for n in list(example) + outputs}
    torch.onnx.export(module.eval(), tuple(example.values()), str(path), dynamo=False, input_names=list(example),
                      output_names=outputs, dynamic_axes=axes, opset_version=17)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (160, 8)).astype(np.int64)
    mask = (np.arange(8)[None] < rng.integers(3, 9, (160, 1))).astype(np.int64)
    labels = (ids[:, 0] % 2).astype(np.int64)
    np.savez(d / "train.npz", input_ids=ids, attention_mask=mask, labels=labels)
    _export_torch(Encoder(), {"input_ids": torch.from_numpy(ids[:2]), "attention_mask": torch.from_numpy(mask[:2])},
                  d / "enc.onnx", ["output", "mask", "token_embeddings", "sentence_embedding"])
    return d


def _export(tmp_path, model, data, **kw):
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    out = tmp_path / "bundle"
    man = export_bundle(ExportConfig(model=str(model), out=str(out), calib=str(data), num_classes=2,
                                     budget=kw.pop("budget", 0.05), **kw), log=lambda m: None)
    return out, man


def adapt_merge_parity(bundle, data, tmp_path, steps=5):
    """adapt a few steps, merge, and check the merged model's logits equal the eval graph's."""
    run = tmp_path / "run"
    r = run_cli("adapt", bundle, "--data", data, "--run-dir", run, "--steps", steps, "--batch-size", 16,
                "--lr", "0.01", "--quiet", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["steps"] == steps and np.isfinite(rep["loss"]["last10_mean"])
    merged = tmp_path / "merged.onnx"
    r = run_cli("merge", bundle, "--run-dir", run, "--out", merged)
    assert r.returncode == 0, r.stderr[-2000:]
    from taskedge.runtime.evaluate import predict_onnx
    man = B.load_bundle(bundle)
    z = np.load(data)
    batch = [z[s.name][:32] for s in man.inputs] + [z["labels"][:32]]
    want = open_trainer(bundle, run / f"ckpt-{steps:08d}").eval_step(batch)[1]
    got = predict_onnx(merged, {s.name: z[s.name][:32] for s in man.inputs})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return rep


def test_several_outputs_the_one_feature_output_is_picked(encoder, tmp_path):
    bundle, man = _export(tmp_path, encoder / "enc.onnx", encoder / "train.npz")
    assert man.head["features"] == 16
    import onnx
    base = onnx.load(str(bundle / B.BASE_MODEL), load_external_data=False)
    assert [o.name for o in base.graph.output] == [man.logits]          # the other outputs are dropped
    adapt_merge_parity(bundle, encoder / "train.npz", tmp_path)


@pytest.mark.parametrize("pool", ["mean", "cls", "max"])
def test_token_output_pooled(encoder, tmp_path, pool):
    bundle, man = _export(tmp_path, encoder / "enc.onnx", encoder / "train.npz", output="token_embeddings", pool=pool)
    assert man.head["features"] == 16
    if pool == "mean":                  # masked mean == the model's own pooled output: the head sees the same features
        import onnxruntime as ort
        z = np.load(encoder / "train.npz")
        feed = {"input_ids": z["input_ids"][:8], "attention_mask": z["attention_mask"][:8]}
        want = ort.InferenceSession(str(encoder / "enc.onnx")).run(["sentence_embedding"], feed)[0]
        trainer = open_trainer(bundle)
        w, b = (trainer.state.params[n] for n in man.head["params"])
        got = trainer.eval_step([feed["input_ids"], feed["attention_mask"], z["labels"][:8]])[1]
        np.testing.assert_allclose(got, want @ w.T + b, rtol=1e-4, atol=1e-5)
    adapt_merge_parity(bundle, encoder / "train.npz", tmp_path)


@pytest.mark.parametrize("kw, message", [
    (dict(output="nope"), "--output 'nope': not a float output"),
    (dict(output="token_embeddings"), "give --pool mean|cls|max"),
    (dict(output="sentence_embedding", pool="mean"), "already [batch, features]"),
    (dict(pool="avg"), "bad --pool 'avg'"),
])
def test_output_errors_name_the_fix(encoder, tmp_path, kw, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("|", r"\|")):
        _export(tmp_path, encoder / "enc.onnx", encoder / "train.npz", **kw)
    assert not (tmp_path / "bundle").exists()


def test_two_feature_outputs_are_listed(tmp_path):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Linear(6, 8)
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.trunk(x))
            return self.a(h), self.b(h)

    x = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=(x[:, 0] > 0).astype(np.int64))
    model = _export_torch(Two(), {"x": torch.from_numpy(x[:2])}, tmp_path / "two.onnx", ["first", "second"])
    with pytest.raises(UserError, match=r"2 float outputs \(first \[32, 4\], second \[32, 3\]\): pick"):
        _export(tmp_path, model, tmp_path / "d.npz")
    bundle, man = _export(tmp_path, model, tmp_path / "d.npz", output="second")
    assert man.head["features"] == 8                  # the head replaces `second`'s own classifier layer
    assert [l.weight for l in man.layers] == ["trunk.weight"]   # `first`'s layer is dropped with its output
    adapt_merge_parity(bundle, tmp_path / "d.npz", tmp_path)


def test_weights_only_in_ops_it_cannot_adapt_are_named(tmp_path):
    """An LSTM with a classifier: the classifier is replaced by the new head, the LSTM's weights are
    not adaptable; the error says so (and the way out), not "nothing left after --include/--exclude"."""
    class Rnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = torch.nn.LSTM(6, 8, batch_first=True), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    x = np.random.default_rng(0).standard_normal((16, 5, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=(x[:, 0, 0] > 0).astype(np.int64))
    model = _export_torch(Rnn(), {"x": torch.from_numpy(x[:2])}, tmp_path / "rnn.onnx", ["y"])
    with pytest.raises(UserError, match=r"adapts MatMul, Gemm and Conv weights; this model's other weights are in "
                                        r"LSTM nodes \(the new head alone trains with --head-only\)"):
        _export(tmp_path, model, tmp_path / "d.npz")
    assert not (tmp_path / "bundle").exists()


def test_fresh_transformer_encoder_with_merged_identical_tensors(tmp_path):
    """torch.onnx stores identical tensors once (every LayerNorm of a fresh nn.TransformerEncoder
    shares one weight; layer 2's weights are Identity nodes of layer 1's). ORT's gradient builder
    failed on that ("Duplicate definition of name ..._grad"); each consumer now has its own copy."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Linear(8, 32)
            layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x):
            return self.enc(self.emb(x)).mean(1)

    x = np.random.default_rng(0).standard_normal((96, 5, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=(x.mean((1, 2)) > 0).astype(np.int64))
    model = _export_torch(Net(), {"x": torch.from_numpy(x[:2])}, tmp_path / "tenc.onnx", ["y"])
    bundle, man = _export(tmp_path, model, tmp_path / "d.npz")
    assert len(man.layers) == 9                       # emb + 4 weight ops in each of the two layers
    adapt_merge_parity(bundle, tmp_path / "d.npz", tmp_path)
