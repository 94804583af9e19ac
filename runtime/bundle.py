"""The bundle: the only contract between the host exporter and the board.

A bundle is a folder:

    manifest.json          this schema (version, model, method, I/O spec, allocation table, sha256s)
    step_model.onnx        standard ONNX: (inputs, labels, trainable state, live W') -> loss, logits, gradients
    eval_model.onnx        standard ONNX: the step graph's forward, (the same inputs) -> loss, logits
                           (live W': W + delta of the layers marked `live`, kept by runtime/live.py)
    base_model.onnx        the frozen base inference model (with the new head, if any)
    weights.bin            the pretrained model's frozen weights, shared by all three graphs (ONNX
                           external data, page-aligned); the same bytes for every task of one model
    task_weights.bin       the task's own constants of the graphs (selected indices, the head's
                           initial values, sparse-backward positions); schema 3 on
    initial_state.npz      the trainable tensors' starting values (deltas, LoRA factors, head)
    allocation.npz         per layer: the selected input indices `<weight>` -> [rows, k]
    tokenizer.json         optional, for JSONL text data on the board

Base and task (schema 3). `weights.bin` and `tokenizer.json` are the *base*: they depend on the
pretrained model only, so every task exported from one model shares them. The base is named by
its content, `base_id(manifest)` (sha256 over the base files' sha256s, which the manifest
already lists). Everything else is the *task* (KB to MB); a task pack (tools/taskpack.py) is a
bundle without its base files, and a board stores each base once (runtime/store.py).

Task state (TASK_STATE, `state.npz`): what a trained task is, reusable by any consumer that
holds the same allocation (a fleet round, another board, a backup). One .npz of plain arrays (no Python objects):
    <trainable name>      float32, one array per name of `Manifest.trainable_names`, the trained
                          values (deltas / LoRA factors / head) -- the same arrays as update.npz
    taskedge.allocation   0-d unicode string: `allocation_digest(manifest)` of the bundle it was
                          trained on; two states can be averaged/swapped iff their digests match
Read and write it with `read_task_state` / `task_state_bytes` only.

Both sides import this module; it is defined once, here.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .fsutil import UserError, atomic_write_text, sha256_file

SCHEMA = "taskedge.bundle"
SCHEMA_VERSION = 4
# Bundles written with these schema versions can be read by this runtime. Version 1 bundles held
# ORT training artifacts (they needed onnxruntime-training on the board): export them again.
# Version 2 kept the task's constants in weights.bin too (no base/task split: no task packs).
# Version 4 added live layers (LayerAllocation.live: W' is a graph input the runtime keeps).
COMPATIBLE_SCHEMA_VERSIONS = (2, 3, 4)

MANIFEST = "manifest.json"
STEP_MODEL = "step_model.onnx"
EVAL_MODEL = "eval_model.onnx"
BASE_MODEL = "base_model.onnx"
DECODE_MODEL = "decode_model.onnx"       # a causal LM's KV-cache graph (optional; runtime/generate.py)
WEIGHTS = "weights.bin"
TASK_WEIGHTS = "task_weights.bin"
INITIAL_STATE = "initial_state.npz"
ALLOCATION = "allocation.npz"
TOKENIZER = "tokenizer.json"
LABELS_INPUT = "labels"
# Files the board opens by name: each must be listed (and hashed) in the manifest.
REQUIRED_FILES = (STEP_MODEL, EVAL_MODEL, BASE_MODEL, WEIGHTS, TASK_WEIGHTS, INITIAL_STATE, ALLOCATION)
# The base: files that depend only on the pretrained model (never in a task pack).
BASE_FILES = (WEIGHTS, TOKENIZER)
TASK_STATE = "state.npz"
ALLOCATION_KEY = "taskedge.allocation"
# The manifest's own checksum: sha256 of its canonical JSON without this key. Optional (older
# bundles lack it); when present a bit flip anywhere in the manifest is detected.
SELF_HASH = "manifest_sha256"


def manifest_digest(raw: dict) -> str:
    body = {k: v for k, v in raw.items() if k != SELF_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass
class TensorSpec:
    name: str
    dtype: str                      # numpy dtype name, e.g. "float32", "int64"
    shape: List[object]             # ints, or strings for symbolic dims ("batch")


@dataclass
class WeightEntry:
    """One tensor in weights.bin or task_weights.bin (`file`; little-endian, C order)."""
    name: str
    dtype: str
    shape: List[int]
    offset: int
    nbytes: int
    base: bool = False              # an initializer of base_model.onnx (merge rebuilds the model from these)
    share: bool = True              # a weight-op weight: sessions share it (add_initializer); the rest each
                                    # session reads from weights.bin itself (see stepgraph.store_weights)
    file: str = WEIGHTS             # WEIGHTS (the base) or TASK_WEIGHTS (the task's own)


@dataclass
class StepSpec:
    """The step graph's outputs: loss, logits, then one gradient per trainable tensor, in
    `Manifest.trainable_names` order; and the optimizer the runtime applies to them."""
    loss: str
    logits: str
    grads: List[str]
    lowered_ops: Dict[str, int] = field(default_factory=dict)     # training op -> count (export/lower.py)
    optimizer: Dict[str, object] = field(default_factory=dict)    # {"name": "adamw", "betas": .., ...}


def rows_view(w: np.ndarray, op: str, row_axis: int) -> np.ndarray:
    """A weight as [rows, cols], rows being output neurons (a view of `w` where numpy can):
    Conv [Cout, Cin/groups * kh * kw]; MatMul/Gemm W when rows are axis 0, else W^T."""
    if op == "Conv":
        return w.reshape(w.shape[0], -1)
    return w if row_axis == 0 else w.T


@dataclass
class LayerAllocation:
    """One selected weight and the update path inserted for it."""
    layer: str                      # node name in the base graph
    op: str                         # MatMul | Gemm | Conv
    weight: str                     # initializer name in the base graph
    weight_shape: List[int]
    rows: int                       # output neurons
    cols: int                       # inputs per output neuron (Conv: Cin/groups * kh * kw)
    k: int                          # trainable inputs per output neuron
    formulation: str                # gather | gather_rows | gather_elements | scatter
    row_axis: int                   # axis of `weight` that indexes output neurons
    trainable: int                  # trainable parameters of this layer's update
    params: List[str]               # trainable tensors: [delta] or [lora_A, lora_B]
    backward: str = "dense"         # sparse: weight gradient only at the used columns (export/backward.py)
    trained_rows: Optional[List[int]] = None   # budgets below one per neuron: only these rows train (k = 1)
    live: Optional[str] = None      # the step/eval graph input that reads W' = W + delta, which the runtime
                                    # keeps (runtime/live.py); None: the graphs build W' themselves

    def rows_view(self, w):
        return rows_view(w, self.op, self.row_axis)


@dataclass
class Manifest:
    model_name: str
    inputs: List[TensorSpec]
    logits: str                                   # name of the logits output
    num_classes: int
    num_weights: int                              # all float parameters of the base model (head excluded)
    method: Dict[str, object]                     # budget, k, nm, lora_rank, formulations, calibration
    layers: List[LayerAllocation]
    update_params: int                            # trainable entries of the sparse update
    step: Optional[StepSpec] = None
    weights: List[WeightEntry] = field(default_factory=list)  # index of weights.bin and task_weights.bin
    head: Optional[Dict[str, object]] = None      # {"params": [...], "size": n} when a new head was added
    preprocessing: Dict[str, object] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)
    files: Dict[str, Dict[str, object]] = field(default_factory=dict)
    created: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    # -- derived figures ------------------------------------------------------
    @property
    def head_params(self) -> int:
        return int(self.head["size"]) if self.head else 0

    @property
    def trainable_params(self) -> int:
        return self.update_params + self.head_params

    @property
    def update_share(self) -> float:
        return self.update_params / max(1, self.num_weights)

    @property
    def trainable_names(self) -> List[str]:
        names = [p for layer in self.layers for p in layer.params]
        if self.head:
            names += list(self.head["params"])
        return names

    # -- (de)serialisation ----------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = {
            "update_params": self.update_params,
            "head_params": self.head_params,
            "trainable_params": self.trainable_params,
            "update_share_of_weights": self.update_share,
        }
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d.pop("summary", None)
        d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
        d["layers"] = [LayerAllocation(**layer) for layer in d["layers"]]
        d["step"] = StepSpec(**d["step"]) if d.get("step") else None
        d["weights"] = [WeightEntry(**w) for w in d.get("weights", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, folder) -> None:
        d = self.to_dict()
        d[SELF_HASH] = manifest_digest(d)
        # one line of compact JSON: a task pack carries it (MiniLM: 42 kB instead of 66 kB indented)
        atomic_write_text(Path(folder) / MANIFEST, json.dumps(d, separators=(",", ":")) + "\n")


def required_files(manifest: Manifest):
    """The files a bundle of this manifest's schema version must list (version 2 had no task_weights.bin)."""
    return REQUIRED_FILES if manifest.schema_version >= 3 else tuple(n for n in REQUIRED_FILES if n != TASK_WEIGHTS)


def base_id(manifest: Manifest) -> str:
    """The content name of the manifest's base: sha256 over {base file: its sha256} (canonical JSON)."""
    files = manifest.files if isinstance(manifest.files, dict) else {}
    listed = {n: files[n].get("sha256") for n in BASE_FILES if isinstance(files.get(n), dict)}
    return hashlib.sha256(json.dumps(listed, sort_keys=True).encode("ascii")).hexdigest()


def allocation_digest(folder, manifest: Manifest) -> str:
    """sha256 of what fixes a task state's meaning: each layer's weight, update path and selected
    indices (allocation.npz, as int64), and the trainable tensors' names."""
    h = hashlib.sha256()
    layout = [[la.weight, la.op, la.formulation, la.rows, la.k, la.params, la.trained_rows] for la in manifest.layers]
    h.update(json.dumps([layout, manifest.trainable_names, manifest.head_params]).encode("utf-8"))
    with np.load(Path(folder) / ALLOCATION, allow_pickle=False) as z:
        for name in sorted(z.files):
            h.update(name.encode("utf-8") + b"\0" + np.ascontiguousarray(z[name], dtype="<i8").tobytes())
    return h.hexdigest()


def task_state_bytes(params: Dict[str, "np.ndarray"], manifest: Manifest, digest: str) -> bytes:
    """A task state file (see the module docstring): the trained tensors plus the allocation digest."""
    import io
    arrays = {n: np.asarray(params[n], dtype=np.float32) for n in manifest.trainable_names}
    arrays[ALLOCATION_KEY] = np.array(digest)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_task_state(path, manifest: Manifest, digest: str) -> Dict[str, "np.ndarray"]:
    """The trained tensors of a task state file, refused unless it was trained on this allocation."""
    try:
        with np.load(path, allow_pickle=False) as z:
            found = str(z[ALLOCATION_KEY][()]) if ALLOCATION_KEY in z.files else None
            params = {n: z[n] for n in manifest.trainable_names if n in z.files}
    except Exception as e:          # zipfile.BadZipFile, ValueError, OSError
        raise BundleError(f"{path}: not a readable task state ({type(e).__name__}: {e})") from None
    if found != digest:
        raise BundleError(f"{path}: task state for allocation {str(found)[:12]}, this task's is {digest[:12]}; "
                          "it was trained on another export: adapt this task again or use its own pack")
    missing = [n for n in manifest.trainable_names if n not in params]
    if missing:
        raise BundleError(f"{path}: task state lacks trained tensor {missing[0]!r}; re-export the task")
    return params


def hash_files(folder, names) -> Dict[str, Dict[str, object]]:
    folder = Path(folder)
    return {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size} for n in sorted(names)}


class BundleError(UserError):
    pass


def read_manifest(folder) -> Manifest:
    """Parse and version-check a bundle's manifest (does not hash the files)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"bundle folder not found: {folder} (give the --out folder of `taskedge export`)")
    if not path.is_file():
        raise BundleError(f"{path}: missing; this is not a TaskEdge bundle (re-run `taskedge export`)")
    if path.is_symlink():
        raise BundleError(f"{path}: is a link; a bundle's manifest must be a plain file; refusing it")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: corrupted manifest ({e}); re-copy the bundle from the host") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise BundleError(f"{path}: not a TaskEdge manifest (schema field is {raw.get('schema')!r} if any)")
    version = raw.get("schema_version")
    if version not in COMPATIBLE_SCHEMA_VERSIONS:
        raise BundleError(
            f"{path}: bundle schema version {version} (exporter {raw.get('versions', {}).get('taskedge', '?')}) "
            f"is not supported by this runtime (reads {list(COMPATIBLE_SCHEMA_VERSIONS)}); "
            "export again with a matching taskedge version or upgrade the runtime")
    unknown = sorted(set(raw) - set(Manifest.__dataclass_fields__) - {"summary", SELF_HASH})
    if unknown:
        raise BundleError(f"{path}: corrupted manifest (unknown field {unknown[0]!r}); re-copy the bundle from the host")
    if SELF_HASH in raw and raw[SELF_HASH] != manifest_digest(raw):
        raise BundleError(f"{path}: corrupted manifest (its {SELF_HASH} does not match its content: a bit flip "
                          "or an edit after export); re-copy the bundle from the host")
    try:
        return Manifest.from_dict(raw)
    except (TypeError, KeyError, AttributeError) as e:
        raise BundleError(f"{path}: manifest does not match schema {SCHEMA_VERSION} ({e})") from None


def safe_member(folder: Path, name: str) -> Path:
    """Resolve a file named in a manifest, refusing anything that leaves the bundle folder."""
    if not isinstance(name, str) or not name or "\x00" in name or name.startswith(("/", "\\")) \
            or os.path.isabs(name) or ".." in Path(name).parts or ".." in name.split("\\"):
        raise BundleError(f"bundle names a file outside its folder: {name!r}; refusing it")
    p = folder / name
    root = str(folder.resolve())
    if p.is_symlink() or os.path.commonpath([root, str(p.resolve())]) != root:
        raise BundleError(f"bundle file {name!r} is a link or leaves the bundle folder; refusing it")
    return p


def load_bundle(folder, verify: bool = True) -> Manifest:
    """Read the manifest and verify the sha256 of every file it lists."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not isinstance(manifest.files, dict):
        raise BundleError(f"{folder / MANIFEST}: 'files' must map file names to their sha256")
    names = set(required_files(manifest)) | ({TOKENIZER} if os.path.lexists(folder / TOKENIZER) else set())
    unlisted = sorted(n for n in names if n not in manifest.files)
    if unlisted:
        raise BundleError(f"{folder / MANIFEST}: does not list (and hash) {unlisted[0]!r}; the bundle is "
                          "incomplete or was tampered with; re-export it")
    for name in manifest.files:
        safe_member(folder, name)                 # names that leave the folder or links: refused, always
    if verify:
        for name, meta in manifest.files.items():
            p = safe_member(folder, name)
            if not p.is_file():
                raise BundleError(f"{p}: listed in the manifest but missing; re-copy the bundle")
            try:
                digest = sha256_file(p)
            except OSError as e:
                raise BundleError(f"{p}: cannot read ({e.strerror or e}); re-copy the bundle") from None
            if not isinstance(meta, dict) or digest != meta.get("sha256"):
                raise BundleError(f"{p}: sha256 mismatch (file is corrupted or was changed after export); "
                                  "re-copy the bundle from the host")
    return manifest
