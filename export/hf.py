"""Hugging Face checkpoints: `hf:PATH` (a local folder with config.json and the weights) -> ONNX.

The model class is the classification head the config's `architectures[0]` names, else AutoModel
(other heads, e.g. masked LM: their encoder); nothing is downloaded (`local_files_only`), and
attention is the eager kind (MatMul + Softmax). The ONNX graph returns one plain tensor: a head's
logits (...ForSequenceClassification, ...ForImageClassification), else a pooled feature [batch, F]
for the exporter's --num-classes head: text = attention-mask-weighted mean of the last hidden
state; vision = the model's parameter-free pooled output (ResNet, ConvNeXt, Swin), else the CLS
token (ViT). The tokenizer's or image processor's settings go into the bundle's preprocessing.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from taskedge.runtime.fsutil import UserError

TEXT_MAX_LEN = 128          # sequence length recorded for the board (capped by the model's)
EXAMPLE_TEXTS = ["A short example sentence.", "Another one, a little longer than the first one is."]
HEAD_SUFFIXES = ("ForSequenceClassification", "ForImageClassification")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None


class Pooled(torch.nn.Module):
    """A transformers model over named inputs (positional in `names` order, or by name) returning one
    plain tensor: "logits", "mean" (attention-mask-weighted mean of the last hidden state), "cls" (its
    first token), "pooled" (the model's pooled output, flattened) or "spatial" (mean over H x W)."""

    def __init__(self, model, names, mode):
        super().__init__()
        self.model, self.names, self.mode = model, list(names), mode

    def forward(self, *args, **kwargs):
        inputs = {**dict(zip(self.names, args)), **kwargs}
        out = self.model(**inputs, return_dict=True)
        if self.mode == "logits":
            return out.logits
        if self.mode == "pooled":
            return out.pooler_output.flatten(1)
        h = out.last_hidden_state
        if self.mode == "cls":
            return h[:, 0]
        if self.mode == "spatial":
            return h.flatten(2).mean(-1)
        mask = inputs["attention_mask"].to(h.dtype).unsqueeze(-1)
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@contextlib.contextmanager
def quiet_transformers():
    """transformers without its info logging and progress bars."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load_model(folder: Path):
    """(model in eval mode, its class name) from a checkpoint folder: the classification head class
    the config's `architectures` names, else AutoModel; UserError for what cannot work."""
    try:
        import transformers
    except ImportError:
        raise UserError("hf: models need transformers: pip install 'taskedge[host]' "
                        "(or pip install transformers)") from None
    cfg = _read_json(folder / "config.json")
    arch = (cfg.get("architectures") or [None])[0]
    head = arch and arch.endswith(HEAD_SUFFIXES) and getattr(transformers, arch, None)
    cls = head or transformers.AutoModel         # other heads (masked LM, ...): their encoder
    with quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
            if getattr(config, "is_encoder_decoder", False):
                raise ValueError("encoder-decoder models are not supported")
            model, info = cls.from_pretrained(str(folder), config=config, local_files_only=True,
                                              attn_implementation="eager", output_loading_info=True)
        except (ValueError, KeyError) as e:   # unknown model_type, class not matching the config
            raise UserError(f"{folder}: unsupported architecture {arch or cfg.get('model_type')!r} "
                            f"({str(e).splitlines()[0]})") from None
        except OSError as e:                  # no weights file
            raise UserError(f"{folder}: cannot load the weights ({str(e).splitlines()[0]}); "
                            "save the model there with save_pretrained (model.safetensors)") from None
    missing = sorted(k for k in info.get("missing_keys") or [] if head or not k.startswith("pooler."))
    if missing:                               # (a feature export never reads a learned pooler)
        raise UserError(f"{folder}: the checkpoint lacks {len(missing)} weights of {type(model).__name__} "
                        f"(e.g. {missing[0]}); it was saved from a different architecture")
    return model.eval(), type(model).__name__


def _text_inputs(folder: Path, model, names):
    """Example token ids [2, max_len] (from the folder's tokenizer.json if any) and the preprocessing."""
    import numpy as np
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    positions = getattr(model.config, "max_position_embeddings", None)
    pad = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    if positions and pad is not None:         # RoBERTa family: positions start after the padding index
        positions -= pad + 1
    limits = [TEXT_MAX_LEN, positions, tok_cfg.get("model_max_length")]
    max_len = min(int(x) for x in limits if isinstance(x, (int, float)) and x > 0)
    pre = {"kind": "text", "max_len": max_len, "lowercase": bool(tok_cfg.get("do_lower_case", False))}
    tok_path = folder / "tokenizer.json"
    if tok_path.is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_path))
        tok.enable_truncation(max_length=max_len)
        tok.enable_padding(length=max_len, pad_id=int(getattr(model.config, "pad_token_id", None) or 0))
        enc = tok.encode_batch(EXAMPLE_TEXTS)
        arrays = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                  "token_type_ids": [e.type_ids for e in enc]}
    else:
        rng = np.random.default_rng(0)
        ids = rng.integers(1, model.config.vocab_size, size=(2, max_len))
        mask = np.ones((2, max_len), dtype=np.int64)
        mask[1, max_len // 2:] = 0
        arrays = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    example = {n: np.asarray(arrays[n], dtype=np.int64) for n in names}
    return example, pre, (str(tok_path) if tok_path.is_file() else None)


def _image_inputs(folder: Path, model):
    """Example pixels [2, C, H, W] and the preprocessing from preprocessor_config.json (or the config)."""
    import numpy as np
    proc = _read_json(folder / "preprocessor_config.json")
    size = proc.get("crop_size") if proc.get("do_center_crop") and proc.get("crop_size") else proc.get("size")
    side = getattr(model.config, "image_size", None) or 224
    side = side if isinstance(side, (list, tuple)) else (side, side)
    if isinstance(size, dict):
        size = (size["height"], size["width"]) if "height" in size else (size.get("shortest_edge") or side[0],) * 2
    elif isinstance(size, int):
        size = (size, size)
    h, w = (int(x) for x in (size or side))
    c = int(getattr(model.config, "num_channels", 3))
    pre = {"kind": "image", "size": [h, w], "channels": "RGB" if c == 3 else "L"}
    if proc.get("do_normalize", True) and "image_mean" in proc:
        pre.update(mean=[float(x) for x in proc["image_mean"]], std=[float(x) for x in proc["image_std"]])
    pixels = np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32)
    return {"pixel_values": pixels}, pre


def _feature_mode(model, example) -> str:
    """"pooled" when the model pools without parameters (CNNs), else "cls" (ViT: what its classifier
    reads); "spatial" for a feature map without a pooled output."""
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in example.items()}, return_dict=True)
    pooler = getattr(model, "pooler", None)
    learned = pooler is not None and any(True for _ in pooler.parameters())
    if getattr(out, "pooler_output", None) is not None and not learned:
        return "pooled"
    return "cls" if out.last_hidden_state.dim() == 3 else "spatial"


def export_hf(path: str, opset: int):
    """(onnx model, name, meta, example numpy inputs) for `hf:PATH`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"hf:{path}: folder not found (give a local folder saved with save_pretrained)")
    if not (folder / "config.json").is_file():
        raise UserError(f"hf:{path}: no config.json in the folder (save the model with save_pretrained)")
    model, cls_name = load_model(folder)
    params = inspect.signature(model.forward).parameters
    meta = {"name": folder.resolve().name}
    if "input_ids" in params:
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]
        example, meta["preprocessing"], tok = _text_inputs(folder, model, names)
        if tok:
            meta["tokenizer"] = tok
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
    elif "pixel_values" in params:
        names = ["pixel_values"]
        example, meta["preprocessing"] = _image_inputs(folder, model)
        axes = {"pixel_values": {0: "batch"}}
    else:
        raise UserError(f"hf:{path}: unsupported architecture {cls_name} (takes neither input_ids nor "
                        "pixel_values)")
    if cls_name.endswith(HEAD_SUFFIXES):
        mode = "logits"
    elif names[0] == "input_ids":
        mode = "mean"
    else:
        mode = _feature_mode(model, example)
    module = Pooled(model, names, mode)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")       # tracer warnings about Python control flow on shapes
        out = os.path.join(tmp, "model.onnx")
        try:
            with torch.no_grad():
                features = module(*args).shape[1]
                torch.onnx.export(module, args, out, dynamo=False, input_names=names, output_names=["output"],
                                  dynamic_axes={**axes, "output": {0: "batch"}}, opset_version=opset,
                                  do_constant_folding=True)
        except Exception as e:                # torch and transformers raise many kinds
            raise UserError(f"hf:{path}: {cls_name} does not run or export to ONNX on example inputs "
                            f"{ {n: list(a.shape) for n, a in example.items()} } ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        onnx_model = onnx.load(out)
    onnx_model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = features   # [batch, F], F known
    return onnx_model, meta["name"], meta, example
