"""Ingest: an ONNX file, a PyTorch module from `package.module:factory`, or a Hugging Face
checkpoint folder `hf:PATH` (export/hf.py; causal LMs and GGUF files: export/causal_lm.py).

A factory returns `(module, example)` or `(module, example, meta)`: `example` is a
tensor, a tuple of tensors, or a dict {input name: tensor}; `meta` may carry
`name`, `tokenizer` (path to a tokenizer.json) and `preprocessing` (a dict).
"""
from __future__ import annotations

import importlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import onnx
from google.protobuf.message import DecodeError

from taskedge.runtime.fsutil import UserError

OPSET = 17


@dataclass
class Source:
    model: onnx.ModelProto
    name: str
    meta: Dict[str, object] = field(default_factory=dict)
    example: Optional[Dict[str, object]] = None      # numpy arrays, from a factory


def load_onnx(path) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p} (give an .onnx file, package.module:factory or hf:FOLDER)")
    try:
        model = onnx.load(str(p))
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise UserError(f"{p}: not an ONNX model ({type(e).__name__}); give an .onnx file "
                        "or package.module:factory") from None
    if not model.graph.node:
        raise UserError(f"{p}: not an ONNX model (no graph nodes); give an .onnx file or package.module:factory")
    if model.ir_version > 10:
        model.ir_version = 10   # ORT-training 1.19 reads IR <= 10; the ops are unchanged
    return model


def _to_numpy(x):
    return x.detach().cpu().numpy()


def export_factory(spec: str) -> Source:
    import torch  # host only

    mod_name, _, fn_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load factory {spec!r}: {e} (expected package.module:function on sys.path)") from None
    result = factory()
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise UserError(f"factory {spec!r} must return (module, example) or (module, example, meta)")
    module, example = result[0], result[1]
    meta = dict(result[2]) if len(result) == 3 else {}
    if isinstance(example, dict):
        names, args = list(example), tuple(example.values())
    elif isinstance(example, (tuple, list)):
        names = [f"input_{i}" for i in range(len(example))] if len(example) > 1 else ["input"]
        args = tuple(example)
    else:
        names, args = ["input"], (example,)
    module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with torch.no_grad():
            torch.onnx.export(module, args, path, dynamo=False, input_names=names, output_names=["output"],
                              dynamic_axes={n: {0: "batch"} for n in names} | {"output": {0: "batch"}},
                              opset_version=OPSET, do_constant_folding=True)
        model = onnx.load(path)
    return Source(model, meta.get("name", spec), meta, {n: _to_numpy(a) for n, a in zip(names, args)})


def export_hf(spec: str, gguf: Optional[str] = None) -> Source:
    from .causal_lm import export_causal_lm, is_causal_lm
    from .hf import export_hf as export
    folder = Path(spec[len("hf:"):]).expanduser()
    if gguf or is_causal_lm(folder):          # causal LMs: next-token training (export/causal_lm.py)
        if not folder.is_dir():
            raise UserError(f"{spec}: folder not found (give the folder holding the checkpoint or the GGUF file)")
        if gguf and not (folder / gguf).is_file():
            raise UserError(f"--gguf {gguf}: no such file in {folder}")
        model, name, meta, example = export_causal_lm(folder, gguf, OPSET)
    else:
        model, name, meta, example = export(spec[len("hf:"):], OPSET)
    return Source(model, name, meta, example)


def ingest(spec: str, gguf: Optional[str] = None) -> Source:
    if spec.startswith("hf:"):
        return export_hf(spec, gguf)
    if gguf:
        raise UserError(f"--gguf {gguf}: give the folder holding it as hf:FOLDER (got {spec!r})")
    if spec.endswith(".onnx") or os.path.sep in spec or os.path.exists(spec) or ":" not in spec:
        return Source(load_onnx(spec), Path(spec).stem)
    return export_factory(spec)
