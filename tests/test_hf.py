"""`taskedge export hf:FOLDER` on tiny random-initialised transformers checkpoints (BERT encoder with
its tokenizer, BERT with a sequence-classification head, ViT, ResNet, ConvNeXt): export -> the step
graph's gradients equal ORT-training's -> adapt with the board CLI -> merge, whose logits equal the
bundle's eval graph; preprocessing and tokenizer recorded; one-line errors for what cannot work.
ViT's trainable patch embedding (ConcatTraining's lengths output) and ConvNeXt's channels-first
LayerNorm (weights onnxruntime's transpose optimizer rewrites are not shared) are covered."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from taskedge.export.config import ExportConfig  # noqa: E402
from taskedge.export.exporter import export_bundle  # noqa: E402
from taskedge.export.ingest import ingest  # noqa: E402
from taskedge.runtime import bundle as B  # noqa: E402
from taskedge.runtime.fsutil import UserError  # noqa: E402

from conftest import open_trainer, run_cli, standard_only  # noqa: E402

WORDS = "the a film was is good bad great dull long short and not very fun plot cast ##s ##ly".split()
TEXTS = ["the film was good", "a dull plot", "not very fun", "great cast and a good plot", "the plot was long",
         "short and fun", "bad", "the cast was not good"]
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=40)


def _tokenizer(folder):
    """A lower-casing WordPiece tokenizer saved as save_pretrained would (tokenizer.json + config)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 24,
                                                              "tokenizer_class": "BertTokenizer"}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch
    T = transformers
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    models = {
        "bert": T.BertModel(T.BertConfig(**BERT)),
        "bert-cls": T.BertForSequenceClassification(T.BertConfig(**BERT, num_labels=3)),
        "vit": T.ViTModel(T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64)),
        "resnet": T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                               layer_type="basic")),
        "convnext": T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                     image_size=24)),
    }
    for name, model in models.items():
        with torch.no_grad():       # trained checkpoints' norms and biases are not 1 and 0
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.2 * torch.randn_like(p))
        model.save_pretrained(root / name)
    _tokenizer(root / "bert")
    (root / "vit" / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 16, "width": 16}}))
    (root / "resnet" / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, **IMAGENET, "size": {"shortest_edge": 32}, "crop_pct": 0.875}))
    return root


def _task_data(src, classes, n=48, seed=0):
    """Random data shaped like the model's inputs: token ids within the vocabulary, [CLS] first,
    ragged padding; labels in [0, classes)."""
    rng = np.random.default_rng(seed)
    data = {}
    for name, x in src.example.items():
        if name == "pixel_values":
            data[name] = rng.standard_normal((n, *x.shape[1:])).astype(np.float32)
        elif name == "input_ids":
            data[name] = rng.integers(5, BERT["vocab_size"], (n, x.shape[1]))
            data[name][:, 0] = 2
        elif name == "attention_mask":
            data[name] = (np.arange(x.shape[1])[None] < rng.integers(3, x.shape[1], (n, 1))).astype(np.int64)
        else:
            data[name] = np.zeros((n, x.shape[1]), dtype=np.int64)
    if "attention_mask" in data:
        data["input_ids"] *= data["attention_mask"]
    data["labels"] = rng.integers(0, classes, n).astype(np.int64)
    return data


CASES = [   # name, --num-classes, --exclude, preprocessing kind
    pytest.param("bert", 4, [], "text", id="bert"),
    pytest.param("bert-cls", None, [], "text", id="bert-cls"),   # trains the checkpoint's own classifier
    pytest.param("vit", 4, [], "image", id="vit"),          # the patch embedding trains too (ConcatTraining lengths)
    pytest.param("resnet", 4, [], "image", id="resnet"),
    pytest.param("convnext", 4, [], "image", id="convnext"),  # LayerNorm scales after a Transpose: not shared
]


def _gradients_match_ort(bundle, ref, man, data):
    """The runtime's step session gives ORT-training's own loss and gradients (perturbed state)."""
    from test_stepgraph import _reference_outputs
    trainer = open_trainer(bundle)
    rng = np.random.default_rng(1)
    params = {n: (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32)
              for n, a in trainer.state.params.items()}
    feeds = {**{s.name: data[s.name][:8] for s in man.inputs}, "labels": data["labels"][:8]}
    trainer.state.params.update(params)
    got = trainer.session.run(None, trainer.graph_feeds(feeds))
    want_loss, want = _reference_outputs(ref, feeds, params)
    np.testing.assert_allclose(got[0], want_loss, rtol=1e-5)
    for name, g in zip(man.trainable_names, got[2:]):
        np.testing.assert_allclose(g, want[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name,classes,exclude,kind", CASES)
def test_export_adapt_merge(checkpoints, tmp_path, name, classes, exclude, kind):
    """export (calibrated on task data) -> gradients as ORT-training's -> 20 adapt steps on the board
    CLI -> the merged model's logits equal the eval graph's with the trained state (1e-5) ->
    --resume (10 + 10 steps) gives the straight run's update bit for bit."""
    from taskedge.runtime.evaluate import predict_onnx
    from taskedge.runtime.merge import merge

    src = ingest(f"hf:{checkpoints / name}")
    data = _task_data(src, classes or 3)
    np.savez(tmp_path / "train.npz", **data)
    bundle, ref = tmp_path / "bundle", tmp_path / "ort-reference"
    man = export_bundle(ExportConfig(model=f"hf:{checkpoints / name}", out=str(bundle), budget=0.05,
                                     calib=str(tmp_path / "train.npz"), num_classes=classes, exclude=exclude,
                                     lr=0.01, ort_reference=str(ref)), log=lambda m: None)
    standard_only(bundle)
    assert man.num_classes == (classes or 3) and man.update_params > 0 and man.preprocessing["kind"] == kind
    assert [s.name for s in man.inputs] == list(src.example)
    _gradients_match_ort(bundle, ref, man, data)
    adapt = ["--data", tmp_path / "train.npz", "--batch-size", 8, "--quiet", "--json"]
    r = run_cli("adapt", bundle, *adapt, "--steps", 20, "--run-dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 20
    merge(bundle, tmp_path / "merged.onnx", run_dir=str(tmp_path / "run"))
    trainer = open_trainer(bundle, checkpoint=tmp_path / "run" / "ckpt-00000020")
    assert any(np.abs(trainer.state.params[p]).max() > 0 for p in man.trainable_names if "delta" in p)
    batch = [data[s.name][:16] for s in man.inputs]
    want = trainer.eval_step(batch + [data["labels"][:16]])[1]
    got = predict_onnx(tmp_path / "merged.onnx", {s.name: x for s, x in zip(man.inputs, batch)})
    assert got.shape == (16, classes or 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # --resume: 10 steps, then resumed to 20, equals the straight 20
    assert run_cli("adapt", bundle, *adapt, "--steps", 10, "--run-dir", tmp_path / "r2").returncode == 0
    r = run_cli("adapt", bundle, "--resume", "--steps", 20, "--run-dir", tmp_path / "r2", "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    a, b = np.load(tmp_path / "run" / "update.npz"), np.load(tmp_path / "r2" / "update.npz")
    assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)


def test_preprocessing_and_tokenizer_recorded(checkpoints, tmp_path):
    """The text bundle carries the tokenizer and its settings, so the board reads JSONL text; the
    image bundles carry the processor's size and normalisation (or the config's size)."""
    text = ingest(f"hf:{checkpoints / 'bert'}")
    assert text.meta["preprocessing"] == {"kind": "text", "max_len": 24, "lowercase": True}
    assert list(text.example) == ["input_ids", "attention_mask", "token_type_ids"]
    assert text.example["input_ids"].shape == (2, 24) and (text.example["input_ids"][:, 0] == 2).all()
    cls_pre = ingest(f"hf:{checkpoints / 'bert-cls'}").meta["preprocessing"]     # no tokenizer: the config's
    assert cls_pre["max_len"] == BERT["max_position_embeddings"] and cls_pre["lowercase"] is False
    pre = {n: ingest(f"hf:{checkpoints / n}").meta["preprocessing"] for n in ("vit", "resnet", "convnext")}
    assert pre["vit"] == {"kind": "image", "size": [16, 16], "channels": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert pre["resnet"]["size"] == [32, 32] and pre["resnet"]["mean"] == IMAGENET["image_mean"]
    assert pre["convnext"] == {"kind": "image", "size": [24, 24], "channels": "RGB"}

    lines = [json.dumps({"text": t, "label": i % 4}) for i, t in enumerate(TEXTS * 2)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    bundle = tmp_path / "bundle"
    r = run_cli("export", f"hf:{checkpoints / 'bert'}", "--out", bundle, "--num-classes", 4, "--budget", 0.05)
    assert r.returncode == 0, r.stderr
    assert (bundle / B.TOKENIZER).read_bytes() == (checkpoints / "bert" / "tokenizer.json").read_bytes()
    r = run_cli("adapt", bundle, "--data", tmp_path / "train.jsonl", "--steps", 2, "--batch-size", 8,
                "--run-dir", tmp_path / "run", "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 2


def test_vit_patch_embedding_trains(checkpoints, tmp_path):
    """ViT's [CLS] + patch Concat is differentiated when the patch embedding trains: ConcatTraining
    with its lengths output used, lowered to Concat + the inputs' sizes."""
    np.savez(tmp_path / "c.npz", **ingest(f"hf:{checkpoints / 'vit'}").example)
    man = export_bundle(ExportConfig(model=f"hf:{checkpoints / 'vit'}", out=str(tmp_path / "b"), num_classes=4,
                                     calib=str(tmp_path / "c.npz"), budget=0.05), log=lambda m: None)
    assert any("patch_embeddings" in layer.layer for layer in man.layers)


def _one_line_error(spec, match):
    with pytest.raises(UserError, match=match) as e:
        ingest(spec)
    assert "\n" not in str(e.value)


def test_one_line_errors(checkpoints, tmp_path, monkeypatch):
    _one_line_error(f"hf:{tmp_path / 'nowhere'}", "folder not found")
    (tmp_path / "empty").mkdir()
    _one_line_error(f"hf:{tmp_path / 'empty'}", "no config.json")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "not-a-model",
                                                              "architectures": ["NotAModel"]}))
    _one_line_error(f"hf:{tmp_path / 'odd'}", "unsupported architecture 'NotAModel'")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_bytes((checkpoints / "bert" / "config.json").read_bytes())
    _one_line_error(f"hf:{tmp_path / 'noweights'}", "cannot load the weights")
    monkeypatch.setitem(sys.modules, "transformers", None)       # as if not installed
    _one_line_error(f"hf:{checkpoints / 'bert'}", r"pip install 'taskedge\[host\]'")
