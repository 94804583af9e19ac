"""Causal language models (Llama family: SmolLM2, TinyLlama, ...) -> ONNX for next-token training.

Sources: `hf:FOLDER` whose config names a `...ForCausalLM` architecture, or a GGUF file
(`--gguf FILE`, de-quantised to float32 by transformers with the `gguf` package).

forward graph   input_ids, attention_mask [B, T] -> logits [B, T, V]   (base_model.onnx; merge; generate)
training graph  + labels [B, T] (labels[t] = the token after t on answer tokens, -100 elsewhere):
                the head runs only on the labelled positions -> logits [K, V]; loss = mean cross-entropy
                (SequenceLoss), so prompt and padding cost no head GEMM and no [B, T, V] softmax.

The wrapper builds the positions (cumsum(mask) - 1, so right padding for training and left padding
for batched generation both work) and the additive causal mask itself: transformers' mask code
exports `aten::diff`, which the TorchScript exporter lacks. The LM head is appended in ONNX as
Gemm(transB=1) on the embedding matrix when the two are tied (one 113 MB tensor, not two); it and
the embedding stay frozen (`FROZEN` in the source's meta). The chat template is recorded as the
text around one user message (`chat_preprocessing`), so the board encodes prompts with the small
`tokenizers` package and no template engine.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from taskedge.runtime.fsutil import UserError

from .graph import Emitter, GraphEdit

NEG = -1e9                      # finite "masked" (no NaN in fully padded rows)
MAX_LEN = 256                   # longest record the board accepts (prompt + answer), capped by the model's
HEAD = "taskedge_lm_head"
SENTINEL = "\u2063TASKEDGE_PROMPT\u2063"
LABELS = "labels"
IGNORE = -100


def is_causal_lm(folder: Path) -> bool:
    import json
    try:
        arch = (json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or [""])[0]
    except (OSError, ValueError):
        return False
    return isinstance(arch, str) and arch.endswith("ForCausalLM")


def load(folder: Path, gguf: Optional[str] = None):
    """(model in eval mode, float32, eager attention; its tokenizer) from a checkpoint folder or a GGUF file."""
    import transformers as T
    from .hf import quiet_transformers
    kw = dict(local_files_only=True, **({"gguf_file": gguf} if gguf else {}))
    with quiet_transformers(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")      # (and the GGUF converter's own progress bar)
        try:
            model = T.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                           attn_implementation="eager", **kw)
            tok = T.AutoTokenizer.from_pretrained(str(folder), **kw)
        except ImportError as e:
            raise UserError(f"--gguf needs the gguf package ({e}): pip install 'taskedge[host]'") from None
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{folder}{'/' + gguf if gguf else ''}: cannot load the causal LM "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if gguf:      # de-quantised weights in a model still flagged "quantized": re-home them in a plain one
        cfg = model.config
        cfg.quantization_config = None
        if hasattr(cfg, "_pre_quantization_dtype"):
            del cfg._pre_quantization_dtype
        plain = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
        plain.load_state_dict(model.state_dict())
        plain.tie_weights()
        model = plain
    return model.eval(), tok


def save_folder(folder: Path, gguf: str, out: Path) -> Path:
    """A GGUF file as a float32 checkpoint folder (safetensors + tokenizer): later loads take seconds."""
    model, tok = load(folder, gguf)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


class CausalLM(torch.nn.Module):
    """input_ids, attention_mask [B, T] -> final hidden state [B, T, H] (the head is added in ONNX)."""

    def __init__(self, lm):
        super().__init__()
        self.body = lm.model

    def forward(self, input_ids, attention_mask):
        b = self.body
        t = input_ids.shape[1]
        h = b.embed_tokens(input_ids)
        pos = (torch.cumsum(attention_mask, -1) - 1).clamp(min=0)
        causal = torch.tril(torch.ones(t, t, dtype=torch.float32))
        allowed = causal[None, None] * attention_mask.to(torch.float32)[:, None, None, :]
        mask = (1.0 - allowed) * NEG
        cos_sin = b.rotary_emb(h, pos)
        for layer in b.layers:
            out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out
        return b.norm(h)


def chat_preprocessing(tok, max_len: int) -> Dict[str, object]:
    """The chat template as plain text around one user message (rendered once with a sentinel), and
    the ids the board needs: records become prefix + prompt + suffix, then answer + answer_end."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": SENTINEL}], add_generation_prompt=True,
                                       tokenize=False)
        prefix, suffix = text.split(SENTINEL)
        end = tok.eos_token or ""
    except (ValueError, AttributeError, TypeError):     # no chat template: plain prompt + newline
        prefix, suffix, end = "", "\n", tok.eos_token or ""
    eos = tok.convert_tokens_to_ids(end) if end else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if eos is None or pad is None:
        raise UserError("the tokenizer has no end-of-sequence token; a causal-LM answer needs one to end on")
    return {"kind": "chat", "prefix": prefix, "suffix": suffix, "answer_end": end, "eos_id": int(eos),
            "pad_id": int(pad), "max_len": int(max_len)}


def _append_head(model: onnx.ModelProto, head_weight: str, hidden: str, keep: str = "") -> None:
    """hidden [B, T, H] -> logits [B, T, V] = hidden @ W^T, with W the [V, H] head weight: the first
    output (and `keep`, an output kept after it)."""
    kept = [o for o in model.graph.output if o.name == keep]
    edit = GraphEdit(model)
    e = Emitter(edit, HEAD)
    h = model.graph.initializer
    dims = next(t.dims for t in h if t.name == head_weight)
    flat = e.node("Reshape", [hidden, e.c([-1, int(dims[1])])], "/flat")
    logits2d = e.node("Gemm", [flat, head_weight], "/logits2d", transB=1)
    bt = e("Slice", [e("Shape", [hidden]), e.c([0]), e.c([2])])
    e("Reshape", [logits2d, e("Concat", [bt, e.c([-1])], axis=0)], "logits")
    model.graph.node.extend(e.nodes)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", int(dims[0])]))
    model.graph.output.extend(kept)
    edit.commit()


def export_onnx(lm, opset: int) -> Tuple[onnx.ModelProto, Tuple[str, str]]:
    """The forward graph (TorchScript exporter) and the names of its embedding and LM head weights
    (the same name when they are tied)."""
    wrapper = CausalLM(lm).eval()
    ids = torch.randint(0, min(1000, lm.config.vocab_size), (2, 8))
    mask = torch.ones_like(ids)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "model.onnx")
        with torch.no_grad():
            torch.onnx.export(wrapper, (ids, mask), path, dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                            "hidden": {0: "batch", 1: "seq"}})
        model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    emb = next((n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                and list(inits[n.input[0]].dims) == [lm.config.vocab_size, lm.config.hidden_size]), None)
    if emb is None:
        raise UserError("causal LM export: no embedding lookup of shape [vocab, hidden] in the graph")
    head = emb
    if not getattr(lm.config, "tie_word_embeddings", False):
        head = "lm_head.weight"
        model.graph.initializer.append(numpy_helper.from_array(
            lm.lm_head.weight.detach().numpy().astype(np.float32), head))
    _append_head(model, head, model.graph.output[0].name)
    return model, (emb, head)


def export_causal_lm(folder: Path, gguf: Optional[str], opset: int):
    """(onnx model, name, meta, example inputs) for `hf:FOLDER` (causal LM) or `--gguf FILE`."""
    lm, tok = load(folder, gguf)
    limit = getattr(lm.config, "max_position_embeddings", None) or MAX_LEN
    model, frozen = export_onnx(lm, opset)
    from .lm_decode import export_decode
    decode = export_decode(lm, opset, model, frozen[1], _append_head)
    pre = chat_preprocessing(tok, min(MAX_LEN, int(limit)))
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok_json = Path(tmp, "tokenizer.json")
        if not tok_json.is_file():
            raise UserError(f"{folder}: the tokenizer has no tokenizer.json form (a fast tokenizer); the board "
                            "needs one to encode prompts")
        tok_text = tok_json.read_text(encoding="utf-8")
    ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, (2, 8)).astype(np.int64)
    example = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    name = Path(gguf).stem if gguf else folder.resolve().name
    meta = {"name": name, "task": "causal_lm", "frozen": sorted(set(frozen)), "preprocessing": pre,
            "tokenizer_text": tok_text, "vocab_size": int(lm.config.vocab_size),
            **({"decode_model": decode} if decode is not None else {})}
    return model, name, meta, example


def answer_head(model: onnx.ModelProto) -> Dict[str, str]:
    """Training form of the head: a `labels` [B, T] input; the head GEMM runs only on the positions
    whose label is not -100 (output `logits` [K, V]). Returns the names SequenceLoss reads."""
    g = model.graph
    gemm = next(n for n in g.node if n.name == HEAD + "/logits2d")
    edit = GraphEdit(model)
    e = Emitter(edit, "taskedge_answer")
    flat_labels = e.node("Reshape", [LABELS, e.c([-1])], "/labels_flat")
    keep = e("Not", [e("Equal", [flat_labels, e.c(IGNORE)])])
    idx = e.node("Squeeze", [e("NonZero", [keep]), e.c([0])], "/idx")
    picked = e("Gather", [gemm.input[0], idx], axis=0)
    e("Gemm", [picked, gemm.input[1]], "logits", transB=1)
    edit.replace(next(n for n in g.node if "logits" in n.output), e.nodes)
    g.input.append(helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["batch", "seq"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, None]))
    edit.commit()
    return {"labels_flat": flat_labels, "idx": idx}


def sequence_loss(names: Dict[str, str]):
    """ORT-training loss block: mean cross-entropy of the answer logits [K, V] against their labels."""
    from onnxruntime.training import onnxblock

    class SequenceLoss(onnxblock.Block):
        def build(self, logits: str) -> str:
            g = self.base.graph
            g.node.append(helper.make_node("Gather", [names["labels_flat"], names["idx"]], ["taskedge_answer/labels"],
                                           name="taskedge_answer/labels", axis=0))
            g.node.append(helper.make_node("SoftmaxCrossEntropyLoss", [logits, "taskedge_answer/labels"],
                                           ["loss", "loss_log_prob"], name="taskedge_loss", reduction="mean"))
            return "loss"
    return SequenceLoss()
