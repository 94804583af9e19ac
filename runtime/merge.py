"""Fold a trained sparse update into the base weights: a plain inference model."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from . import bundle as B
from .checkpoints import CheckpointStore
from .fsutil import UserError, atomic_path


def load_update(bundle_dir: Path, manifest: B.Manifest, update: Optional[str] = None,
                run_dir: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Trained tensors from an update.npz, else from the newest good checkpoint of the run."""
    if update is None:
        store = CheckpointStore(run_dir or bundle_dir / "run")
        found = store.latest()
        if found is None:
            raise UserError(f"no trained update: {store.dir} has no checkpoint; run `taskedge adapt` first "
                            "or pass --update update.npz")
        from .ort_train import Checkpoint
        ckpt = Checkpoint(found[0])
        return {n: ckpt.get(n) for n in manifest.trainable_names}
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
    if len(layer.params) == 2:                      # sparse LoRA: (B @ A) at the mask
        a, b = params[layer.params[0]], params[layer.params[1]]
        return np.take_along_axis(b @ a, idx, axis=1)
    return params[layer.params[0]]


def merged_weights(manifest: B.Manifest, base: onnx.ModelProto, alloc: Dict[str, np.ndarray],
                   params: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    inits = {t.name: t for t in base.graph.initializer}
    out = {}
    for layer in manifest.layers:
        w = numpy_helper.to_array(inits[layer.weight]).astype(np.float32, copy=True)
        rows = w.reshape(w.shape[0], -1) if layer.op == "Conv" else (w if layer.row_axis == 0 else w.T)
        idx = alloc[layer.weight].astype(np.int64)
        rows[np.arange(layer.rows)[:, None], idx] += dense_delta(layer, params, idx)
        out[layer.weight] = w
    if manifest.head:
        for name in manifest.head["params"]:
            out[name] = params[name]
    return out


def merge(bundle_dir, out, update: Optional[str] = None, run_dir: Optional[str] = None) -> dict:
    bundle_dir = Path(bundle_dir)
    manifest = B.load_bundle(bundle_dir)
    params = load_update(bundle_dir, manifest, update, run_dir)
    base = onnx.load(str(bundle_dir / B.BASE_MODEL))
    with np.load(bundle_dir / B.ALLOCATION, allow_pickle=False) as z:
        alloc = {k: z[k] for k in z.files}
    new = merged_weights(manifest, base, alloc, params)
    for t in base.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(new[t.name].astype(np.float32), t.name))
    base.doc_string = f"TaskEdge merged model ({manifest.model_name}; update folded into the weights)"
    out = Path(out)
    with atomic_path(out, suffix=".onnx") as tmp:
        onnx.save(base, str(tmp))
    return {"out": str(out), "bytes": out.stat().st_size, "layers_merged": len(manifest.layers),
            "head": bool(manifest.head)}
