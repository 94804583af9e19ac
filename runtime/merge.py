"""Fold a trained sparse update into the base weights: a plain inference model.

Runs on the board without the `onnx` package: the base graph's structure is copied as it is
(its initializers dropped) and every weight is appended from weights.bin, the selected ones
with the update added (onnx_wire.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from . import bundle as B
from . import onnx_wire
from .checkpoints import CheckpointStore
from .fsutil import UserError, atomic_path
from .trainer import TrainState, map_weights

# Above this, the merged weights go to `<out>.data` beside the model (protobuf's 2 GB limit).
INLINE_LIMIT = 1 << 30


def load_update(bundle_dir: Path, manifest: B.Manifest, update: Optional[str] = None,
                run_dir: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Trained tensors from an update.npz, else from the newest good checkpoint of the run."""
    if update is None:
        store = CheckpointStore(run_dir or bundle_dir / "run")
        found = store.latest()
        if found is None:
            raise UserError(f"no trained update: {store.dir} has no checkpoint; run `taskedge adapt` first "
                            "or pass --update update.npz")
        return TrainState.from_file(found[0], manifest.trainable_names).params
    try:
        with np.load(update, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise UserError(f"{update}: not a readable update .npz ({type(e).__name__}: {e})") from None
    missing = [n for n in manifest.trainable_names if n not in arrays]
    if missing:
        raise UserError(f"{update}: missing trained tensor {missing[0]!r}; is it from this bundle?")
    return arrays


def dense_delta(layer: B.LayerAllocation, params: Dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """The [rows, k] values added at the selected entries."""
    if len(layer.params) == 2:                      # sparse LoRA: (B @ A) at the mask, only there
        a, b = params[layer.params[0]], params[layer.params[1]]
        return np.einsum("or,rok->ok", b, a[:, idx])
    if layer.trained_rows is not None:              # only some rows train; the others add zero
        full = np.zeros(idx.shape, np.float32)
        full[layer.trained_rows] = params[layer.params[0]]
        return full
    return params[layer.params[0]]


def merged_weights(manifest: B.Manifest, weights: Dict[str, np.ndarray], alloc: Dict[str, np.ndarray],
                   params: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The weights the update changes: each selected weight plus its delta, and the trained head."""
    out = {}
    for layer in manifest.layers:
        w = weights[layer.weight].astype(np.float32, copy=True)
        rows = layer.rows_view(w)
        idx = alloc[layer.weight].astype(np.int64)
        rows[np.arange(layer.rows)[:, None], idx] += dense_delta(layer, params, idx)
        out[layer.weight] = w
    if manifest.head:
        for name in manifest.head["params"]:
            out[name] = np.asarray(params[name], dtype=np.float32)
    return out


def merge(bundle_dir, out, update: Optional[str] = None, run_dir: Optional[str] = None) -> dict:
    bundle_dir = Path(bundle_dir)
    manifest = B.load_bundle(bundle_dir)
    params = load_update(bundle_dir, manifest, update, run_dir)
    graph = B.DECODE_MODEL if B.DECODE_MODEL in manifest.files else B.BASE_MODEL    # a causal LM's KV-cache graph
    entries = [e for e in manifest.weights if e.base or e.name.startswith("decode/")]
    weights = map_weights(bundle_dir, entries)
    with np.load(bundle_dir / B.ALLOCATION, allow_pickle=False) as z:
        alloc = {k: z[k] for k in z.files}
    weights.update(merged_weights(manifest, weights, alloc, params))
    out = Path(out)
    external = sum(a.nbytes for a in weights.values()) > INLINE_LIMIT
    data_path = out.with_name(out.name + ".data")
    tensors = []
    if external:
        with atomic_path(data_path) as tmp, open(tmp, "wb") as f:
            for name, a in weights.items():
                f.write(b"\0" * ((-f.tell()) % 4096))
                tensors.append(onnx_wire.tensor(name, a, external=(data_path.name, f.tell())))
                f.write(np.ascontiguousarray(a).tobytes())
    else:
        tensors = [onnx_wire.tensor(name, a) for name, a in weights.items()]
    skeleton = onnx_wire.strip_initializers((bundle_dir / graph).read_bytes(), set(weights))
    with atomic_path(out, suffix=".onnx") as tmp:
        tmp.write_bytes(onnx_wire.with_initializers(skeleton, tensors))
    return {"out": str(out), "bytes": out.stat().st_size, "layers_merged": len(manifest.layers),
            "head": bool(manifest.head), "external_data": str(data_path) if external else None}
