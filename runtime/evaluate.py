"""`taskedge eval`: accuracy of a merged model (plain onnxruntime) or of the bundle with its trained update."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from . import bundle as B
from .data import load_dataset
from .fsutil import UserError


def predict_onnx(model_path, inputs: dict, batch: int = 64) -> np.ndarray:
    """Logits of a plain inference model with onnxruntime (no training build needed)."""
    from .ort import onnxruntime as ort
    try:
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"{model_path}: cannot load the model ({type(e).__name__}: {e})") from None
    names = [i.name for i in sess.get_inputs()]
    n = len(next(iter(inputs.values())))
    outs = [sess.run(None, {k: inputs[k][s:s + batch] for k in names})[0] for s in range(0, n, batch)]
    return np.concatenate(outs)


def evaluate(bundle_dir, data, model: Optional[str] = None, update: Optional[str] = None,
             run_dir: Optional[str] = None) -> dict:
    bundle_dir = Path(bundle_dir)
    manifest = B.load_bundle(bundle_dir)
    ds = load_dataset(data, manifest, bundle_dir)
    from .lm import is_causal_lm
    if is_causal_lm(manifest):
        return _evaluate_lm(bundle_dir, manifest, ds, data, model, update, run_dir)
    if model:
        logits = predict_onnx(model, ds.inputs)
        evaluated = f"merged model {model}"
    else:
        import tempfile
        from .merge import merge
        with tempfile.TemporaryDirectory() as tmp:
            merged = Path(tmp) / "merged.onnx"
            merge(bundle_dir, merged, update=update, run_dir=run_dir)
            logits = predict_onnx(merged, ds.inputs)
        evaluated = "bundle + trained update"
    acc = float((logits.argmax(-1) == ds.labels).mean())
    return {"accuracy": acc, "examples": len(ds), "evaluated": evaluated, "data": str(data)}


def _evaluate_lm(bundle_dir: Path, manifest, ds, data, model, update, run_dir) -> dict:
    """Exact-match accuracy and perplexity of a causal LM's answers (runtime/lm.py), batch by batch
    (the full logits [B, T, V] of a whole set would not fit)."""
    import tempfile
    from .lm import at_labels, metrics
    from .merge import merge
    from .trainer import open_session
    with tempfile.TemporaryDirectory() as tmp:
        path = model
        if not path:
            path = Path(tmp) / "merged.onnx"
            merge(bundle_dir, path, update=update, run_dir=run_dir)
        sess = open_session(path)
        batches = (ds.batch(idx) for idx in ds.batches(8))
        res = metrics((at_labels(sess.run(None, {"input_ids": b[0], "attention_mask": b[1]})[0], b[2]), b[2])
                      for b in batches)
    return {**res, "evaluated": f"merged model {model}" if model else "bundle + trained update", "data": str(data)}
