"""Demo models and data: weights load strictly and compute the right thing, the digits CNN
really pretrains, and the data splits are disjoint with the promised shapes and dtypes."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from taskedge.tools import demo_data, demo_models  # noqa: E402

torch.set_num_threads(2)


def _rows(a):
    return {r.tobytes() for r in a.reshape(len(a), -1)}


def test_minilm_strict_keys_and_sentence_similarity():
    from safetensors import safe_open

    model = demo_models.load_minilm()
    with safe_open(str(demo_data.MINILM_DIR / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    # every checkpoint tensor but the pooler's is a parameter (position_ids: a constant buffer)
    assert set(model.model.state_dict()) | demo_models.MINILM_UNUSED_KEYS == file_keys - {"embeddings.position_ids"}
    # sentence-transformers' quickstart gives 0.6660 / 0.1046 / 0.1411 for these three.
    e = demo_models.sentence_embeddings(model, ["The weather is lovely today.", "It's so sunny outside!",
                                                "He drove to the stadium."])
    np.testing.assert_allclose([e[0] @ e[1], e[0] @ e[2], e[1] @ e[2]], [0.6660, 0.1046, 0.1411], atol=2e-3)
    e = demo_models.sentence_embeddings(model, ["A man is playing a guitar.", "Someone plays the guitar.",
                                                "The stock market fell sharply today."])
    assert e[0] @ e[1] > 0.8 and abs(e[0] @ e[2]) < 0.3 and abs(e[1] @ e[2]) < 0.3


def _reference_minilm(state, ids, mask, layers=6, heads=12, eps=1e-12):
    """The demo's encoder before it used transformers: BERT written out on the checkpoint's
    tensors (padding as an additive -1e4 bias), mean-pooled over the real tokens."""
    import math
    F = torch.nn.functional
    lin = lambda x, p: x @ state[p + ".weight"].T + state[p + ".bias"]  # noqa: E731
    norm = lambda x, p: F.layer_norm(x, x.shape[-1:], state[p + ".weight"], state[p + ".bias"], eps)  # noqa: E731
    b, t = ids.shape
    x = norm(state["embeddings.word_embeddings.weight"][ids] + state["embeddings.position_embeddings.weight"][:t]
             + state["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    bias = (1.0 - mask.float())[:, None, None, :] * -1e4
    for i in range(layers):
        p = f"encoder.layer.{i}."
        d = x.shape[-1]
        q, k, v = (lin(x, p + "attention.self." + n).view(b, t, heads, d // heads).transpose(1, 2)
                   for n in ("query", "key", "value"))
        a = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads) + bias, -1) @ v).transpose(1, 2)
        x = norm(lin(a.reshape(b, t, d), p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        x = norm(lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense") + x, p + "output.LayerNorm")
    m = mask.float()[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)


def test_minilm_matches_the_written_out_encoder():
    """transformers' BertModel in the demo gives the embeddings of the hand-written encoder it
    replaced (to 1e-5), on padded batches of uneven lengths."""
    from safetensors.torch import load_file

    state = load_file(str(demo_data.MINILM_DIR / "model.safetensors"))
    ids, mask = demo_data.tokenize(["A three-hour cinema master class.", "Dull.", "What a fine film it was, "
                                    "with a cast that never once puts a foot wrong in two long hours."])
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    assert 0 < int(mask.sum(1).min()) < int(mask.sum(1).max()) < ids.shape[1]
    with torch.no_grad():
        got, want = demo_models.load_minilm()(ids, mask), _reference_minilm(state, ids, mask)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_minilm_factory_inputs():
    module, example, meta = demo_models.minilm_sentiment()
    assert set(example) == {"input_ids", "attention_mask"}
    assert all(v.dtype == torch.int64 and v.shape[1] == demo_models.MAX_LEN for v in example.values())
    with torch.no_grad():
        assert module(**example).shape == (2, 384)
    assert meta["preprocessing"]["max_len"] == demo_models.MAX_LEN and meta["tokenizer"].endswith("tokenizer.json")


def test_digits_cnn_pretrains_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKEDGE_CACHE", str(tmp_path))
    model, example, _ = demo_models.digits_cnn()
    test = demo_data.digits_pretrain()["test"]
    with torch.no_grad():
        acc = (model(torch.from_numpy(test["pixels"])).argmax(1).numpy() == test["labels"]).mean()
    assert acc > 0.9
    assert len(list(tmp_path.glob("digits_cnn-*.pt"))) == 1
    cached = demo_models.pretrain_digits("cnn")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), cached.state_dict().values()))
    assert example["pixels"].shape == (2, 1, 16, 16)


def test_text_splits_disjoint():
    d = demo_data.text_sentiment(200, 100, seed=1)
    assert not set(d["texts_train"]) & set(d["texts_test"])
    for part, n in (("train", 200), ("test", 100)):
        arrays = d[part]
        assert arrays["input_ids"].shape == arrays["attention_mask"].shape == (n, demo_data.MAX_LEN)
        assert all(a.dtype == np.int64 for a in arrays.values())
        assert set(np.unique(arrays["labels"])) == {0, 1}
        assert (arrays["input_ids"][:, 0] == 101).all()          # [CLS]


@pytest.mark.parametrize("task,channels,size,classes", [("shift", 1, 16, 5), ("new-classes", 1, 16, 5),
                                                        ("imagenet", 3, 32, 10)])
def test_vision_splits(task, channels, size, classes):
    d = demo_data.vision_digits(task, seed=0, size=size)
    for part in ("train", "test"):
        x, y = d[part]["pixels"], d[part]["labels"]
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape[1:] == (channels, size, size) and len(x) == len(y)
        assert set(np.unique(y)) == set(range(classes))
    assert not _rows(d["train"]["pixels"]) & _rows(d["test"]["pixels"])


def test_pretrain_and_adaptation_pools_disjoint():
    pre, adapt = demo_data._pools()
    assert not set(pre) & set(adapt) and len(pre) + len(adapt) == (demo_data._digits()[1] < 5).sum()


def test_atomic_writers(tmp_path):
    demo_data.write_npz(tmp_path / "a.npz", {"x": np.arange(3)})
    demo_data.write_jsonl(tmp_path / "a.jsonl", ["good", "bad \"one\""], np.array([1, 0]))
    assert np.load(tmp_path / "a.npz")["x"].tolist() == [0, 1, 2]
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(s) for s in lines] == [{"text": "good", "label": 1}, {"text": 'bad "one"', "label": 0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.npz"]


# ImageNet indices: 483 castle, 497 church, 538 dome, 663 monastery, 668 mosque, 698 palace,
# 832 stupa, 858 tile roof, 442 bell cote.
PLAUSIBLE = {483, 497, 538, 663, 668, 698, 832, 858, 442}


def test_mobilenet_strict_weights_and_china_photo():
    pytest.importorskip("PIL", reason="sklearn needs Pillow to decode china.jpg")
    from sklearn.datasets import load_sample_image

    model = demo_models.load_mobilenet_v2()
    assert len(model.state_dict()) == 314
    img = torch.from_numpy(load_sample_image("china.jpg").astype(np.float32) / 255).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(img, size=(224, 336), mode="bilinear", antialias=True)[..., 56:280]
    x = (x - torch.tensor(demo_data.IMAGENET_MEAN)[:, None, None]) / torch.tensor(demo_data.IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        top5 = set(model(x)[0].topk(5).indices.tolist())
    assert top5 & PLAUSIBLE


def test_mobilenet_factory_shapes():
    module, example, meta = demo_models.mobilenet_v2_digits()
    s = demo_models.IMAGE_SIZE
    assert example["pixels"].shape == (2, 3, s, s) and meta["preprocessing"]["size"] == [s, s]
    with torch.no_grad():
        assert module(**example).shape == (2, 1000)
