"""The causal LM's KV-cache decode graph (export/lm_decode.py) on a tiny random Llama: without a
cache it is the forward graph; fed its own cache it gives the logits a full recompute gives; merge
writes it (the update folded in) and generate decodes with it, the same tokens as without it.
With --runslow: the LLM bench's rows (tools/bench_llm.py) on the same tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from taskedge.runtime import bundle as B, lm  # noqa: E402
from taskedge.runtime.generate import PAST, PRESENT, _left_padded, greedy_ids  # noqa: E402
from taskedge.runtime.trainer import open_session  # noqa: E402

from tiny_llama import make_tiny  # noqa: E402

PROMPTS = ["review: the film was good", "review: a dull plot and a bad cast was bad", "review: fun"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("lmcache"))


def cli(capsys, *args) -> str:
    from taskedge.runtime.cli import main
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def _encoder(bundle):
    return lm.Encoder(bundle / B.TOKENIZER, B.load_bundle(bundle).preprocessing)


def test_cached_steps_give_the_logits_of_a_full_recompute(tiny):
    b = tiny["bundle"]
    assert B.DECODE_MODEL in B.load_bundle(b).files
    dec, base = open_session(b / B.DECODE_MODEL), open_session(b / B.BASE_MODEL)
    ids, mask = _left_padded([_encoder(b).prompt(p) for p in PROMPTS], 2)     # rows of 3 lengths, left-padded
    full = base.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    logits, past = dec.run(None, {"input_ids": ids, "attention_mask": mask})      # the default: an empty cache
    assert np.array_equal(logits, full) and past.shape[:5] == (2, 2, 3, 2, ids.shape[1])
    rng = np.random.default_rng(0)
    for _ in range(3):                               # arbitrary next tokens, not only the argmax
        new = rng.integers(0, 32, (3, 1))
        ids, mask = np.concatenate([ids, new], 1), np.concatenate([mask, np.ones_like(new)], 1)
        logits, past = dec.run(None, {"input_ids": new, "attention_mask": mask, PAST: past})
        full = base.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        assert logits.shape == (3, 1, 32) and np.abs(logits[:, 0] - full[:, -1]).max() < 1e-4


def test_merge_writes_the_decode_graph_and_generate_decodes_with_its_cache(tiny, capsys):
    b, root = tiny["bundle"], tiny["root"]
    cli(capsys, "adapt", b, "--data", tiny["train"], "--steps", "4", "--batch-size", "8", "--lr", "0.05", "--quiet",
        "--json", "--run-dir", root / "run")
    merged = root / "adapted.onnx"
    cli(capsys, "merge", b, "--out", merged, "--run-dir", root / "run")
    sess = open_session(merged)
    assert [o.name for o in sess.get_outputs()] == ["logits", PRESENT]
    r1 = json.loads(cli(capsys, "eval", b, "--data", tiny["test"], "--model", merged, "--json"))
    r2 = json.loads(cli(capsys, "eval", b, "--data", tiny["test"], "--run-dir", root / "run", "--json"))
    assert r1["accuracy"] == r2["accuracy"] and abs(r1["perplexity"] - r2["perplexity"]) < 1e-4
    enc = _encoder(b)
    assert greedy_ids(sess, enc, PROMPTS, 5, 2) == greedy_ids(sess, enc, PROMPTS, 5, 2, cache=False)
    out = {flag: json.loads(cli(capsys, "generate", b, "--model", merged, "--prompts", tiny["test"], "--max-new-tokens",
                                "3", "--json", *([flag] if flag else []))) for flag in ("", "--no-cache")}
    assert out[""]["kv_cache"] and not out["--no-cache"]["kv_cache"]
    assert out[""]["answers"] == out["--no-cache"]["answers"] and out[""]["new_tokens"] > 0


@pytest.mark.slow
def test_bench_llm_rows(tiny, capsys):
    pytest.importorskip("peft")
    from taskedge.tools import bench_llm
    t = tiny
    assert bench_llm.main([str(t["bundle"]), str(t["folder"]), "--train", str(t["train"]), "--test", str(t["test"]),
                           "--domain", str(t["test"]), "--work", str(t["root"] / "work"), "--steps", "2",
                           "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["engine"]: r for r in res["rows"]}
    assert set(rows) == set(bench_llm.ENGINES) and all("error" not in r for r in rows.values()), rows
    assert rows["taskedge"]["trainable"] < rows["ort-lora-r8"]["trainable"] == rows["torch-lora-r8"]["trainable"] \
        < rows["ort-full"]["trainable"] == rows["torch-full"]["trainable"]
    assert all(r["peak_rss_mb"] > 0 and r["step_ms"] > 0 and 0 <= r["exact_match"] <= 1 and r["domain_perplexity"] > 1
               for r in rows.values())
    assert rows["taskedge"]["base"]["answer_perplexity"] > 1
