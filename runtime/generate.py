"""`taskedge generate`: greedy answers of a causal-LM bundle's model to prompts, on plain onnxruntime.

The model is a merged one (`--model adapted.onnx`), the frozen base (`--base`: the bundle's
base_model.onnx as it is), or the bundle with the run's trained update (merged into a temporary
file). Prompts are encoded as in training (runtime/lm.py: the recorded chat template), batched
with left padding (the graph's positions count only real tokens), and decoded greedily until the
end token or --max-new-tokens.

No KV cache: the inference graph is the training graph's forward (input_ids, attention_mask ->
logits [B, T, V]), so every new token recomputes the whole prefix. For the short answers of the
adaptation tasks (a few tokens) that costs a few forward passes per batch; a cache graph would be
a second export whose weights merge would have to update as well (see the README).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from . import bundle as B
from .flags import add_flags, at_least, flag, from_flags
from .fsutil import UserError


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


def greedy(sess, enc, prompts: List[str], max_new: int, batch: int = 8) -> List[str]:
    """Greedy decoding of each prompt with a session over (input_ids, attention_mask) -> logits [B, T, V]."""
    answers: List[str] = []
    for s in range(0, len(prompts), batch):
        rows = [enc.prompt(p) for p in prompts[s:s + batch]]
        t = max(map(len, rows))
        ids = np.full((len(rows), t), enc.pad, np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):                       # left padding: every row ends at the last column
            ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
        out = [[] for _ in rows]
        done = np.zeros(len(rows), bool)
        for _ in range(max_new):
            nxt = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0][:, -1].argmax(-1)
            for i in np.flatnonzero(~done):
                if int(nxt[i]) == enc.eos:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
            if done.all():
                break
            ids = np.concatenate([ids, np.where(done, enc.pad, nxt)[:, None]], 1)
            mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], 1)
        answers += [enc.decode(o) for o in out]
    return answers


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
        path = o.model or (folder / B.BASE_MODEL if o.base else Path(tmp) / "merged.onnx")
        if not o.model and not o.base:
            merge(folder, path, update=o.update, run_dir=o.run_dir)
        answers = greedy(open_session(path), enc, prompts, o.max_new_tokens, o.batch_size)
    model = o.model or ("base" if o.base else "bundle + trained update")
    return {"model": str(model), "answers": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]}


def cmd_generate(a) -> int:
    res = generate(from_flags(GenerateOptions, a))
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res["answers"]:
            print(f"> {r['prompt']}\n{r['answer']}\n")
    return 0


def register(sub) -> None:
    g = sub.add_parser("generate", help="board: greedy answers of a causal-LM bundle (base, adapted or merged)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_flags(g, GenerateOptions)
    g.add_argument("--json", action="store_true", help="print the answers as JSON")
    g.set_defaults(fn=cmd_generate)
