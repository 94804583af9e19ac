"""A tiny random-initialised Llama checkpoint (word-level tokenizer, chat template) exported as a
causal-LM bundle, with prompt/answer JSONL: the fixture of the causal-LM tests (`make_tiny`)."""
from __future__ import annotations

import json

import numpy as np
import transformers

from taskedge.export.config import ExportConfig
from taskedge.export.exporter import export_bundle

WORDS = "the a film was is good bad great dull fun plot cast review positive negative".split()
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _records(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        pos = bool(rng.integers(2))
        words = " ".join(rng.choice(WORDS[:12], rng.integers(2, 8)))
        out.append({"prompt": f"review: {words} {'good' if pos else 'bad'}", "answer": "positive" if pos else "negative"})
    return out


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_tiny(root):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    folder = root / "tiny-llama"
    special = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(special + ["user", "assistant", ":"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():                   # trained norms are not all ones (identical ones get merged)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "unk_token": "<unk>", "chat_template": TEMPLATE}))
    train = _write_jsonl(root / "train.jsonl", _records(96, 0))
    test = _write_jsonl(root / "test.jsonl", _records(24, 1))
    bundle = root / "bundle"
    export_bundle(ExportConfig(model=f"hf:{folder}", out=str(bundle), calib=str(train), budget=0.05, batch_size=16),
                  log=lambda m: None)
    return {"root": root, "folder": folder, "train": train, "test": test, "bundle": bundle, "torch": model}
