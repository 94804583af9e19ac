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
    records: Optional[np.ndarray] = None     # where each record came from: row / line number / image index
    unit: str = "record"                     # "record" (npz row), "line" (JSONL, 1-based), "image"
    files: Optional[List[str]] = None        # image folders: the file of each image index

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def describe(self, i: int) -> str:
        """Where record `i` of this dataset came from, for error messages: 'FILE: record 12'."""
        r = int(self.records[i]) if self.records is not None else int(i)
        if self.files is not None:
            return self.files[r]
        return f"{self.source}: {self.unit} {r}"

    def take(self, idx: np.ndarray, skipped: int = 0) -> "Dataset":
        return Dataset({k: v[idx] for k, v in self.inputs.items()}, self.labels[idx], self.source, skipped,
                       None if self.records is None else self.records[idx], self.unit, self.files)

    def batch(self, idx: np.ndarray) -> List[np.ndarray]:
        """Inputs in model order followed by labels, for the ORT training graph."""
        return [a[idx] for a in self.inputs.values()] + [self.labels[idx]]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self), batch_size):
            yield np.arange(start, min(start + batch_size, len(self)))


def _check_labels(labels: np.ndarray, source: str) -> np.ndarray:
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
            skip_bad: bool, records: Optional[np.ndarray] = None, unit: str = "record",
            files: Optional[List[str]] = None) -> Dataset:
    full = Dataset(inputs, labels, source, 0, np.arange(len(labels)) if records is None else records, unit, files)
    bad = _bad_records(inputs, labels, num_classes)
    if bad and not skip_bad:
        i = min(bad)
        raise UserError(f"{full.describe(i)}: {bad[i]} ({len(bad)} bad records in all); fix the data or "
                        "pass --skip-bad to skip and count them")
    keep = np.array([i for i in range(len(labels)) if i not in bad], dtype=np.int64)
    if keep.size == 0:
        raise UserError(f"{source}: every record is bad ({full.describe(min(bad))}: {bad[min(bad)]} ...)")
    return full.take(keep, skipped=len(bad))


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
    labels = _check_labels(arrays[LABELS_INPUT], str(path))
    n = len(labels)
    if n == 0:
        raise UserError(f"{path}: no records")
    for s in manifest.inputs:
        if len(arrays[s.name]) != n:
            raise UserError(f"{path}: {s.name!r} has {len(arrays[s.name])} records but 'labels' has {n}")
    return _screen(cast_to_specs(manifest.inputs, arrays), labels, manifest.num_classes, str(path), skip_bad)


def numbered_lines(path: Path) -> List[tuple]:
    """[(1-based line number, raw bytes)] of a text file; UserError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return list(enumerate(f, 1))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


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
    texts, labels, line_nos, skipped = [], [], [], 0
    for line_no, raw in numbered_lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if skip_bad:
                skipped += 1
                continue
            raise UserError(f"{path}:{line_no}: not UTF-8 text ({e}); pass --skip-bad to skip and count") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise TypeError(f"a JSON {type(rec).__name__}, not an object")
            text, label = rec["text"], rec["label"]
            if isinstance(label, bool) or not isinstance(label, (int, float)) \
                    or (isinstance(label, float) and not label.is_integer()):
                raise TypeError(f"label {label!r} is not an integer")
            label = int(label)
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
        line_nos.append(line_no)
    if not texts:
        raise UserError(f"{path}: no records" + (f" ({skipped} bad lines skipped)" if skipped else ""))
    tok.enable_truncation(max_len)
    tok.enable_padding(length=max_len)
    enc = tok.encode_batch(texts)
    arrays = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
              "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
              "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
    arrays = {s.name: arrays[s.name] for s in manifest.inputs if s.name in arrays}
    check_arrays(manifest.inputs, arrays, str(path))
    labels_arr = _check_labels(np.array(labels, dtype=np.int64), str(path))
    ds = _screen(cast_to_specs(manifest.inputs, arrays), labels_arr, manifest.num_classes, str(path), skip_bad,
                 records=np.array(line_nos, dtype=np.int64), unit="line")
    ds.skipped += skipped
    return ds


def load_image_folder(path: Path, manifest: Manifest, skip_bad: bool = False) -> Dataset:
    try:
        from PIL import Image
    except ImportError:
        raise UserError("image folders need Pillow: pip install 'taskedge[data]'") from None
    pre = manifest.preprocessing
    spec = manifest.inputs[0]
    try:
        h, w = (int(x) for x in pre.get("size", spec.shape[-2:]))
    except (TypeError, ValueError):
        raise UserError(f"{path}: the bundle's input {spec.name!r} {spec.shape} has no fixed image size; "
                        "export with preprocessing.size or use .npz data") from None
    mode = pre.get("channels", "RGB" if spec.shape[1] == 3 else "L")
    mean = np.array(pre.get("mean", [0.0]), dtype=np.float32).reshape(-1, 1, 1)
    std = np.array(pre.get("std", [1.0]), dtype=np.float32).reshape(-1, 1, 1)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(classes) > manifest.num_classes or not classes:
        raise UserError(f"{path}: found {len(classes)} class folders, the bundle's head has {manifest.num_classes}")
    images, labels, names, skipped = [], [], [], 0
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
            names.append(str(f))
    if not images:
        raise UserError(f"{path}: no images in the class folders" + (f" ({skipped} bad ones skipped)" if skipped else ""))
    arrays = {spec.name: np.stack(images).astype(np.float32)}
    check_arrays(manifest.inputs, arrays, str(path))
    ds = _screen(arrays, np.array(labels, dtype=np.int64), manifest.num_classes, str(path), skip_bad,
                 unit="image", files=names)
    ds.skipped += skipped
    return ds


def load_dataset(path, manifest: Manifest, bundle_dir, skip_bad: bool = False) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise UserError(f"data not found: {p} (give an .npz, a .jsonl file or an image folder)")
    from .lm import is_causal_lm, load as load_lm
    if is_causal_lm(manifest):                      # prompt/answer records, labels [N, T] (runtime/lm.py)
        return load_lm(p, manifest, Path(bundle_dir), skip_bad)
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
    return ds.take(train, ds.skipped), ds.take(hold)

