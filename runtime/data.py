"""Training data on the board: .npz arrays, an image folder, or JSONL text.

Every loader returns a `Dataset` whose arrays are named after the model inputs
and already checked against the bundle's input spec and label range.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

from .bundle import LABELS_INPUT, TOKENIZER, Manifest
from .fsutil import UserError
from .specs import cast_to_specs, check_arrays

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm"}


@dataclass
class Dataset:
    inputs: Dict[str, np.ndarray]
    labels: np.ndarray
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: np.ndarray) -> List[np.ndarray]:
        """Inputs in model order followed by labels, for the ORT training graph."""
        return [a[idx] for a in self.inputs.values()] + [self.labels[idx]]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self), batch_size):
            yield np.arange(start, min(start + batch_size, len(self)))


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"{source}: 'labels' must be a 1-D integer array (got {labels.dtype} {list(labels.shape)})")
    return labels.astype(np.int64)


def _bad_records(inputs: Dict[str, np.ndarray], labels: np.ndarray, num_classes: int) -> Dict[int, str]:
    """Record index -> why it is bad: label out of range, or NaN/Inf in a float input."""
    bad: Dict[int, str] = {}
    for i in np.flatnonzero((labels < 0) | (labels >= num_classes)):
        bad[int(i)] = f"label {int(labels[i])} outside 0..{num_classes - 1}"
    for name, a in inputs.items():
        if a.dtype.kind == "f":
            finite = np.isfinite(a.reshape(len(a), -1)).all(1)
            for i in np.flatnonzero(~finite):
                bad.setdefault(int(i), f"NaN/Inf in {name!r}")
    return bad


def _screen(inputs: Dict[str, np.ndarray], labels: np.ndarray, num_classes: int, source: str,
            skip_bad: bool) -> Dataset:
    bad = _bad_records(inputs, labels, num_classes)
    if bad and not skip_bad:
        i = min(bad)
        raise UserError(f"{source}: record {i}: {bad[i]} ({len(bad)} bad records in all); fix the data or "
                        "pass --skip-bad to skip and count them")
    keep = np.array([i for i in range(len(labels)) if i not in bad], dtype=np.int64)
    if keep.size == 0:
        raise UserError(f"{source}: every record is bad ({bad[min(bad)]} ...)")
    return Dataset({k: v[keep] for k, v in inputs.items()}, labels[keep], source, skipped=len(bad))


def load_npz(path: Path, manifest: Manifest, skip_bad: bool = False) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if LABELS_INPUT not in arrays:
        raise UserError(f"{path}: no 'labels' array; the file needs arrays {[s.name for s in manifest.inputs]} "
                        "plus 'labels'")
    check_arrays(manifest.inputs, arrays, str(path))
    n = len(arrays[LABELS_INPUT])
    if n == 0:
        raise UserError(f"{path}: no records")
    for s in manifest.inputs:
        if len(arrays[s.name]) != n:
            raise UserError(f"{path}: {s.name!r} has {len(arrays[s.name])} records but 'labels' has {n}")
    labels = _check_labels(arrays[LABELS_INPUT], manifest.num_classes, str(path))
    return _screen(cast_to_specs(manifest.inputs, arrays), labels, manifest.num_classes, str(path), skip_bad)


def load_jsonl(path: Path, manifest: Manifest, bundle_dir: Path, skip_bad: bool = False) -> Dataset:
    tok_path = bundle_dir / TOKENIZER
    if not tok_path.is_file():
        raise UserError(f"{path}: JSONL text needs a bundle with a tokenizer (export a text model with one)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("JSONL text needs the 'tokenizers' package: pip install 'taskedge[data]'") from None
    pre = manifest.preprocessing
    max_len = int(pre.get("max_len", 0)) or int(manifest.inputs[0].shape[1])
    truncate = bool(pre.get("truncate", False))
    tok = Tokenizer.from_file(str(tok_path))
    tok.no_truncation()
    tok.no_padding()
    texts, labels, skipped = [], [], 0
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(enumerate(f, 1))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e})") from None
    for line_no, line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text, label = rec["text"], int(rec["label"])
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            n_tok = len(tok.encode(text).ids)
            if n_tok > max_len and not truncate:
                raise ValueError(f"text is {n_tok} tokens, longer than the model's {max_len}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if skip_bad:
                skipped += 1
                continue
            raise UserError(f"{path}:{line_no}: bad record ({type(e).__name__}: {e}); "
                            'want {"text": str, "label": int}; pass --skip-bad to skip and count') from None
        texts.append(text)
        labels.append(label)
    if not texts:
        raise UserError(f"{path}: no records")
    tok.enable_truncation(max_len)
    tok.enable_padding(length=max_len)
    enc = tok.encode_batch(texts)
    arrays = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
              "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
              "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
    arrays = {s.name: arrays[s.name] for s in manifest.inputs if s.name in arrays}
    check_arrays(manifest.inputs, arrays, str(path))
    labels_arr = _check_labels(np.array(labels, dtype=np.int64), manifest.num_classes, str(path))
    ds = _screen(cast_to_specs(manifest.inputs, arrays), labels_arr, manifest.num_classes, str(path), skip_bad)
    ds.skipped += skipped
    return ds


def load_image_folder(path: Path, manifest: Manifest, skip_bad: bool = False) -> Dataset:
    try:
        from PIL import Image
    except ImportError:
        raise UserError("image folders need Pillow: pip install 'taskedge[data]'") from None
    pre = manifest.preprocessing
    spec = manifest.inputs[0]
    h, w = (int(x) for x in pre.get("size", spec.shape[-2:]))
    mode = pre.get("channels", "RGB" if spec.shape[1] == 3 else "L")
    mean = np.array(pre.get("mean", [0.0]), dtype=np.float32).reshape(-1, 1, 1)
    std = np.array(pre.get("std", [1.0]), dtype=np.float32).reshape(-1, 1, 1)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(classes) > manifest.num_classes or not classes:
        raise UserError(f"{path}: found {len(classes)} class folders, the bundle's head has {manifest.num_classes}")
    images, labels, skipped = [], [], 0
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((w, h))
                    a = np.asarray(im, dtype=np.float32) / 255.0
            except Exception as e:
                if skip_bad:
                    skipped += 1
                    continue
                raise UserError(f"{f}: cannot decode image ({type(e).__name__}: {e}); "
                                "pass --skip-bad to skip and count") from None
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            images.append((a - mean) / std)
            labels.append(label)
    if not images:
        raise UserError(f"{path}: no images in the class folders")
    arrays = {spec.name: np.stack(images).astype(np.float32)}
    check_arrays(manifest.inputs, arrays, str(path))
    ds = _screen(arrays, np.array(labels, dtype=np.int64), manifest.num_classes, str(path), skip_bad)
    ds.skipped += skipped
    return ds


def load_dataset(path, manifest: Manifest, bundle_dir, skip_bad: bool = False) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data not found: {p} (give an .npz, a .jsonl file or an image folder)")
    if p.is_dir():
        return load_image_folder(p, manifest, skip_bad)
    if p.stat().st_size == 0:
        raise UserError(f"{p}: empty file")
    if p.suffix == ".npz":
        return load_npz(p, manifest, skip_bad)
    if p.suffix in (".jsonl", ".json"):
        return load_jsonl(p, manifest, Path(bundle_dir), skip_bad)
    raise UserError(f"{p}: unknown data format {p.suffix!r}; use .npz, .jsonl or an image folder")


def split(ds: Dataset, fraction: float, seed: int) -> tuple:
    """Deterministic train/holdout split (used when no --eval-data is given)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds))
    n_hold = max(1, int(len(ds) * fraction))
    hold, train = order[:n_hold], order[n_hold:]
    def take(idx, skipped=0):
        return Dataset({k: v[idx] for k, v in ds.inputs.items()}, ds.labels[idx], ds.source, skipped)
    return take(train, ds.skipped), take(hold)


def optional(path: Optional[str], manifest: Manifest, bundle_dir) -> Optional[Dataset]:
    return load_dataset(path, manifest, bundle_dir) if path else None
