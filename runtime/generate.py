"""`taskedge generate`: greedy answers of a causal-LM bundle's model to prompts, on plain onnxruntime.

The model is a merged one (`--model adapted.onnx`), the frozen base (`--base`: the bundle's
base_model.onnx, or its decode_model.onnx when it has one), or the bundle with the run's trained update (merged into a temporary
file). Prompts are encoded as in training (runtime/lm.py: the recorded chat template), batched
with left padding (the graph's positions count only real tokens), and decoded greedily until the
end token or --max-new-tokens.

KV cache: a causal LM exported with a decode graph (export/lm_decode.py; the bundle's
decode_model.onnx, and what `merge` writes for such a bundle) takes the previous tokens' keys and
values (`past_key_values`) and returns them extended (`present_key_values`): the prompt runs once,
then each new token is one position's compute. A model without one (the plain forward graph, or
--no-cache) recomputes the whole prefix for every token; the two give the same tokens.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from . import bundle as B
from .flags import add_flags, at_least, flag, from_flags
from .fsutil import UserError

PAST, PRESENT = "past_key_values", "present_key_values"     # export/lm_decode.py


@dataclass
class GenerateOptions:
    bundle: str = flag(help="a causal-LM bundle (taskedge export of hf:FOLDER or --gguf)", positional=True)
    prompt: List[str] = flag(help="a prompt (repeatable)", default_factory=list)
    prompts: Optional[str] = flag(None, "a .jsonl file of {\"prompt\": ...} records (answers are ignored)")
    model: Optional[str] = flag(None, "a merged .onnx (taskedge merge) to answer with")
    base: bool = flag(False, "answer with the frozen base model (before adaptation)")
    update: Optional[str] = flag(None, "update.npz to merge (default: the run's newest checkpoint)")
    run_dir: Optional[str] = flag(None, "the run folder (default BUNDLE/run)")
    max_new_tokens: int = flag(32, "stop each answer after this many tokens", check=at_least(1))
    batch_size: int = flag(8, "prompts per forward pass", check=at_least(1))
    no_cache: bool = flag(False, "recompute the whole prefix for every new token even if the model has a KV cache "
                                 "(for comparison: the same tokens, slower)")


def _left_padded(rows: List[List[int]], pad: int):
    t = max(map(len, rows))
    ids = np.full((len(rows), t), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):                       # left padding: every row ends at the last column
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    return ids, mask


def greedy_ids(sess, enc, prompts: List[str], max_new: int, batch: int = 8, cache: bool = True) -> List[List[int]]:
    """Greedy decoding: each prompt's new token ids (without the end token). `sess` maps input_ids,
    attention_mask [B, T] (+ past_key_values) to logits [B, T, V] (+ present_key_values); with
    `cache` and a model that has one, the cache carries the prefix and each step feeds one token."""
    logits = sess.get_outputs()[0].name
    cached = cache and PRESENT in {o.name for o in sess.get_outputs()}
    wanted = [logits, PRESENT] if cached else [logits]
    result: List[List[int]] = []
    for s in range(0, len(prompts), batch):
        ids, mask = _left_padded([enc.prompt(p) for p in prompts[s:s + batch]], enc.pad)
        out = [[] for _ in ids]
        done = np.zeros(len(ids), bool)
        feeds = {"input_ids": ids, "attention_mask": mask}
        for _ in range(max_new):
            res = sess.run(wanted, feeds)
            nxt = res[0][:, -1].argmax(-1)
            for i in np.flatnonzero(~done):
                if int(nxt[i]) == enc.eos:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
            if done.all():
                break
            new = np.where(done, enc.pad, nxt)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], 1)
            feeds = {"input_ids": new, "attention_mask": mask, PAST: res[1]} if cached else \
                {"input_ids": np.concatenate([feeds["input_ids"], new], 1), "attention_mask": mask}
        result += out
    return result


def greedy(sess, enc, prompts: List[str], max_new: int, batch: int = 8, cache: bool = True) -> List[str]:
    """Greedy answers (text) of each prompt (see greedy_ids)."""
    return [enc.decode(o) for o in greedy_ids(sess, enc, prompts, max_new, batch, cache)]


def _prompts(o: GenerateOptions) -> List[str]:
    prompts = list(o.prompt)
    if o.prompts:
        try:
            lines = Path(o.prompts).read_text(encoding="utf-8").splitlines()
            prompts += [json.loads(line)["prompt"] for line in lines if line.strip()]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--prompts {o.prompts}: want .jsonl records with a \"prompt\" ({type(e).__name__}: "
                            f"{e})") from None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise UserError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE.jsonl")
    return prompts


def generate(o: GenerateOptions) -> dict:
    from .lm import Encoder, is_causal_lm
    from .merge import merge
    from .trainer import open_session
    folder = Path(o.bundle)
    manifest = B.load_bundle(folder)
    if not is_causal_lm(manifest):
        raise UserError(f"{folder}: not a causal-LM bundle (export a ...ForCausalLM hf:FOLDER or --gguf); "
                        "classifiers answer with `taskedge eval`")
    if o.base and (o.model or o.update):
        raise UserError("--base answers with the frozen model: drop --model/--update")
    prompts = _prompts(o)
    enc = Encoder(folder / B.TOKENIZER, manifest.preprocessing)
    with tempfile.TemporaryDirectory() as tmp:
        base = B.DECODE_MODEL if B.DECODE_MODEL in manifest.files else B.BASE_MODEL
        path = o.model or (folder / base if o.base else Path(tmp) / "merged.onnx")
        if not o.model and not o.base:
            merge(folder, path, update=o.update, run_dir=o.run_dir)
        sess = open_session(path)
        t = time.perf_counter()
        new = greedy_ids(sess, enc, prompts, o.max_new_tokens, o.batch_size, cache=not o.no_cache)
        seconds = time.perf_counter() - t
    model = o.model or ("base" if o.base else "bundle + trained update")
    cached = not o.no_cache and PRESENT in {x.name for x in sess.get_outputs()}
    tokens = sum(map(len, new))
    return {"model": str(model), "kv_cache": cached, "new_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 2),
            "answers": [{"prompt": p, "answer": enc.decode(a), "tokens": a} for p, a in zip(prompts, new)]}


def cmd_generate(a) -> int:
    res = generate(from_flags(GenerateOptions, a))
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res["answers"]:
            print(f"> {r['prompt']}\n{r['answer']}\n")
        print(f"{res['new_tokens']} new tokens in {res['seconds']:.2f} s ({res['tokens_per_second']:.1f} tokens/s, "
              f"{'KV cache' if res['kv_cache'] else 'no KV cache: the prefix recomputed per token'})")
    return 0


def register(sub) -> None:
    g = sub.add_parser("generate", help="board: greedy answers of a causal-LM bundle (base, adapted or merged)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_flags(g, GenerateOptions)
    g.add_argument("--json", action="store_true", help="print the answers as JSON")
    g.set_defaults(fn=cmd_generate)
