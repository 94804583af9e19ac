"""The decode graph of a causal LM: greedy generation with a KV cache (runtime/generate.py).

    input_ids [B, T], attention_mask [B, P + T], past_key_values [L, 2, B, KVH, P, D]
        -> logits [B, T, V], present_key_values [L, 2, B, KVH, P + T, D]

`past_key_values` is optional: its default (an initializer of the same name) is the empty cache,
P = 0, and then the graph is the forward graph (same inputs, same logits): prefill, and what `eval`
runs on a merged model. With the cache fed back, a new token costs one position's compute, not
the whole prefix's. Positions count real tokens (cumsum of the mask), so left-padded batches work.

Its weights carry the forward graph's names (matched by content: the two TorchScript exports
name their folded constants differently), so the bundle stores them once (weights.bin) and `merge`
folds the update into this graph exactly as into the forward graph. Its own small constants are
renamed `decode/...` (no clash with the forward graph's). Llama-family decoder layers only (q/k/v/o
projections, rotary positions, grouped-query attention): other models get no decode graph, and
`generate` recomputes the prefix for each token.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper

PAST, PRESENT = "past_key_values", "present_key_values"
SUPPORTED = ("llama", "mistral", "qwen2")
NEG = -1e9


def supported(lm) -> bool:
    layer = lm.model.layers[0] if hasattr(lm, "model") and len(getattr(lm.model, "layers", [])) else None
    return getattr(lm.config, "model_type", None) in SUPPORTED and layer is not None and \
        all(hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling"))


class CachedCausalLM(torch.nn.Module):
    """input_ids, attention_mask, past -> final hidden state [B, T, H], present (the head is added in ONNX)."""

    def __init__(self, lm):
        super().__init__()
        self.body = lm.model
        c = lm.config
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def _attention(self, a, y, past, cos, sin, mask):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
        b, t = y.shape[:2]
        q = a.q_proj(y).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = a.k_proj(y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = a.v_proj(y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        groups = self.heads // self.kv_heads
        w = torch.softmax(torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * a.scaling + mask, dim=-1)
        o = torch.matmul(w, repeat_kv(v, groups)).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return a.o_proj(o), torch.stack([k, v])

    def forward(self, input_ids, attention_mask, past):
        body = self.body
        b, t = input_ids.shape
        p = attention_mask.shape[1] - t
        past = past.expand(-1, -1, b, -1, -1, -1)          # the default empty cache has batch 1
        h = body.embed_tokens(input_ids)
        pos = (torch.cumsum(attention_mask, -1) - 1).clamp(min=0)[:, p:]
        causal = (torch.arange(p + t)[None, :] <= torch.arange(t)[:, None] + p).to(torch.float32)
        mask = (1.0 - causal[None, None] * attention_mask.to(torch.float32)[:, None, None, :]) * NEG
        cos, sin = body.rotary_emb(h, pos)
        present = []
        for i, layer in enumerate(body.layers):
            out, kv = self._attention(layer.self_attn, layer.input_layernorm(h), past[i], cos, sin, mask)
            present.append(kv)
            h = h + out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return body.norm(h), torch.stack(present)


def _key(t: onnx.TensorProto) -> Tuple:
    return t.data_type, tuple(t.dims), hashlib.sha1(t.raw_data).hexdigest() if t.raw_data else None


def _rename(model: onnx.ModelProto, forward: onnx.ModelProto) -> int:
    """Give `model`'s initializers the names of `forward`'s equal ones (else `decode/NAME`); returns
    how many matched."""
    by_key: Dict[Tuple, str] = {}
    for t in forward.graph.initializer:
        if t.raw_data:
            by_key.setdefault(_key(t), t.name)
    names, matched = {}, 0
    for t in model.graph.initializer:
        new = by_key.get(_key(t)) if t.raw_data else None
        matched += new is not None
        names[t.name] = new or f"decode/{t.name}"
        t.name = names[t.name]
    for node in model.graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
    return matched


def export_decode(lm, opset: int, forward: onnx.ModelProto, head: str,
                  append_head) -> Optional[onnx.ModelProto]:
    """The decode graph of `lm` (None when its layers are not Llama-like), weights named as in `forward`;
    `append_head(model, head_weight, hidden, keep)` adds the LM head as in the forward graph."""
    if not supported(lm):
        return None
    c = lm.config
    wrapper = CachedCausalLM(lm).eval()
    ids = torch.randint(0, min(1000, c.vocab_size), (2, 4))
    past = torch.zeros(c.num_hidden_layers, 2, 2, wrapper.kv_heads, 3, wrapper.head_dim)
    mask = torch.ones(2, 7, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            PAST: {2: "batch", 4: "past"}, "hidden": {0: "batch", 1: "seq"}, PRESENT: {2: "batch", 4: "total"}}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "decode.onnx")
        with torch.no_grad():
            torch.onnx.export(wrapper, (ids, mask, past), path, dynamo=False, opset_version=opset,
                              do_constant_folding=True, input_names=["input_ids", "attention_mask", PAST],
                              output_names=["hidden", PRESENT], dynamic_axes=axes)
        model = onnx.load(path)
    _rename(model, forward)
    g = model.graph
    if head not in {t.name for t in g.initializer}:          # an untied head: the forward graph's tensor
        g.initializer.append(next(t for t in forward.graph.initializer if t.name == head))
    append_head(model, head, "hidden", keep=PRESENT)
    empty = np.zeros((c.num_hidden_layers, 2, 1, wrapper.kv_heads, 0, wrapper.head_dim), np.float32)
    g.initializer.append(numpy_helper.from_array(empty, PAST))          # the optional input's default
    return model
