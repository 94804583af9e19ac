"""Causal-LM data and metrics on the board (bundles with `task: causal_lm`).

Data: JSONL records `{"prompt": str, "answer": str}`, encoded with the bundle's tokenizer.json
(the small `tokenizers` package; no transformers, no template engine): the chat template is the
text the exporter recorded around one user message (manifest preprocessing: prefix, suffix,
answer_end), so a record is `prefix + prompt + suffix` then `answer + answer_end`. Or an .npz with
input_ids, attention_mask and labels, all [N, T] (labels[t] = the token after t where it is
trained, -100 elsewhere). Rows are right-padded; a batch is trimmed to its longest row.

A bundle is a causal LM's when its preprocessing is of kind "chat" (export/causal_lm.py writes it).

Metrics: exact match (every answer token is the model's top token given the true prefix, which is
the same as "greedy decoding writes exactly the answer and stops") and perplexity
(exp of the mean cross-entropy over answer tokens).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .bundle import LABELS_INPUT, TOKENIZER, Manifest
from .data import Dataset, numbered_lines
from .fsutil import UserError

IGNORE = -100
INPUTS = ("input_ids", "attention_mask")


def is_causal_lm(manifest: Manifest) -> bool:
    return manifest.preprocessing.get("kind") == "chat"


class Encoder:
    """Prompt and answer texts -> token ids, as the exporter recorded the chat template."""

    def __init__(self, tokenizer_path, pre: Dict[str, object]):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("prompt/answer text needs the 'tokenizers' package: pip install 'taskedge[data]'") from None
        self.tok = Tokenizer.from_file(str(tokenizer_path))
        self.tok.no_truncation()
        self.tok.no_padding()
        self.pre = pre
        self.max_len = int(pre.get("max_len", 256))
        self.eos, self.pad = int(pre["eos_id"]), int(pre["pad_id"])

    def prompt(self, text: str) -> List[int]:
        return self.tok.encode(f"{self.pre['prefix']}{text}{self.pre['suffix']}", add_special_tokens=False).ids

    def answer(self, text: str) -> List[int]:
        return self.tok.encode(f"{text}{self.pre['answer_end']}", add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos])


def encode(enc: Encoder, pairs: Sequence[Tuple[List[int], List[int]]]) -> Dict[str, np.ndarray]:
    """(prompt ids, answer ids) pairs -> right-padded input_ids, attention_mask, labels [N, T]."""
    t = max(len(p) + len(a) for p, a in pairs)
    ids = np.full((len(pairs), t), enc.pad, np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, IGNORE)
    for i, (p, a) in enumerate(pairs):
        seq = p + a
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
        labels[i, len(p) - 1:len(seq) - 1] = a            # position t predicts token t + 1
    return {"input_ids": ids, "attention_mask": mask, LABELS_INPUT: labels}


class LMDataset(Dataset):
    """A Dataset whose batches are trimmed to their longest row (rows are right-padded)."""

    def batch(self, idx: np.ndarray) -> List[np.ndarray]:
        t = max(1, int(self.inputs["attention_mask"][idx].sum(1).max()))
        return [a[idx][:, :t] for a in self.inputs.values()] + [self.labels[idx][:, :t]]

    def take(self, idx: np.ndarray, skipped: int = 0) -> "LMDataset":
        d = super().take(idx, skipped)
        return LMDataset(d.inputs, d.labels, d.source, d.skipped, d.records, d.unit, d.files)


def load_jsonl(path: Path, enc: Encoder, skip_bad: bool = False) -> LMDataset:
    pairs, lines, skipped = [], [], 0
    for line_no, raw in numbered_lines(path):
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) \
                    or not isinstance(rec.get("answer"), str) or not rec["answer"]:
                raise ValueError('want {"prompt": str, "answer": non-empty str}')
            p, a = enc.prompt(rec["prompt"]), enc.answer(rec["answer"])
            if len(p) + len(a) > enc.max_len:
                raise ValueError(f"prompt + answer is {len(p) + len(a)} tokens, more than the bundle's {enc.max_len}")
        except (UnicodeDecodeError, ValueError) as e:      # JSONDecodeError is a ValueError
            if skip_bad:
                skipped += 1
                continue
            raise UserError(f"{path}:{line_no}: bad record ({type(e).__name__}: {e}); pass --skip-bad to skip "
                            "and count") from None
        pairs.append((p, a))
        lines.append(line_no)
    if not pairs:
        raise UserError(f"{path}: no records" + (f" ({skipped} bad lines skipped)" if skipped else ""))
    arrays = encode(enc, pairs)
    labels = arrays.pop(LABELS_INPUT)
    return LMDataset(arrays, labels, str(path), skipped, np.array(lines, np.int64), "line")


def load_npz(path: Path, manifest: Manifest) -> LMDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
        raise UserError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    missing = [n for n in (*INPUTS, LABELS_INPUT) if n not in arrays]
    if missing:
        raise UserError(f"{path}: no {missing[0]!r} array; a causal-LM .npz holds input_ids, attention_mask and "
                        "labels, all [N, T]")
    shapes = {n: arrays[n].shape for n in (*INPUTS, LABELS_INPUT)}
    if len(set(shapes.values())) != 1 or len(shapes["labels"]) != 2 or any(a.dtype.kind not in "iu" for a in
                                                                            (arrays[n] for n in shapes)):
        raise UserError(f"{path}: input_ids, attention_mask and labels must be integer arrays of one shape [N, T] "
                        f"(got {shapes})")
    ids, labels = arrays["input_ids"].astype(np.int64), arrays[LABELS_INPUT].astype(np.int64)
    v = manifest.num_classes
    bad = np.flatnonzero(((ids < 0) | (ids >= v)).any(1) | (((labels < 0) | (labels >= v)) & (labels != IGNORE)).any(1)
                         | ~(labels != IGNORE).any(1))
    if bad.size:
        raise UserError(f"{path}: record {int(bad[0])}: a token id outside 0..{v - 1} or no trained label "
                        f"({bad.size} bad records)")
    return LMDataset({"input_ids": ids, "attention_mask": arrays["attention_mask"].astype(np.int64)}, labels,
                     str(path), 0, np.arange(len(ids)), "record")


def load(path: Path, manifest: Manifest, bundle_dir: Path, skip_bad: bool = False) -> LMDataset:
    """A causal-LM bundle's data: .jsonl prompt/answer records or a pre-tokenised .npz."""
    if not path.is_file() or path.stat().st_size == 0:
        raise UserError(f"{path}: not a data file (or empty); give .jsonl prompt/answer records or an .npz")
    if path.suffix == ".npz":
        return load_npz(path, manifest)
    if path.suffix in (".jsonl", ".json"):
        return load_jsonl(path, Encoder(Path(bundle_dir) / TOKENIZER, manifest.preprocessing), skip_bad)
    raise UserError(f"{path}: a causal-LM bundle reads .jsonl ({{\"prompt\", \"answer\"}} per line) or .npz")


def answer_scores(logits: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, float, int]:
    """From the logits at the labelled positions [K, V] (row-major order of labels != -100) and the
    labels [B, T]: each row's exact match [B], the summed cross-entropy and K."""
    keep = labels != IGNORE
    target = labels[keep]
    z = logits.astype(np.float64)
    z -= z.max(1, keepdims=True)
    nll = float((np.log(np.exp(z).sum(1)) - z[np.arange(len(target)), target]).sum())
    hit = logits.argmax(1) == target
    rows = np.repeat(np.arange(len(labels)), keep.sum(1))
    match = np.bincount(rows, weights=~hit, minlength=len(labels)) == 0
    return match, nll, int(len(target))


def metrics(batches) -> Dict[str, float]:
    """{"accuracy": exact-match rate, "perplexity"} over (logits [K, V], labels [B, T]) batches."""
    matched = n = tokens = 0
    nll = 0.0
    for logits, labels in batches:
        m, s, k = answer_scores(logits, labels)
        matched, n, nll, tokens = matched + int(m.sum()), n + len(m), nll + s, tokens + k
    return {"accuracy": matched / max(1, n), "perplexity": float(np.exp(nll / max(1, tokens))),
            "examples": n, "answer_tokens": tokens}


def at_labels(full_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """An inference model's logits [B, T, V] at the labelled positions: [K, V]."""
    return full_logits[labels != IGNORE]
