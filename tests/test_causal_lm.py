"""Causal LMs (export/causal_lm.py, runtime/lm.py, runtime/generate.py) on a tiny random-initialised
Llama checkpoint with a word-level tokenizer and a chat template: export hf:FOLDER with prompt/answer
JSONL -> the step graph's loss and gradients equal PyTorch autograd's -> adapt (board CLI, Orin Nano
profile), resume, merge (logits equal the eval graph's), eval (exact match, perplexity), generate.
The real SmolLM2 GGUF path runs with --runslow."""
from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from taskedge.runtime import bundle as B, lm  # noqa: E402

from conftest import open_trainer, run_cli, standard_only  # noqa: E402
from tiny_llama import make_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("lm"))


def test_export_records_the_chat_template_and_freezes_the_head(tiny):
    man = B.load_bundle(tiny["bundle"])
    pre = man.preprocessing
    assert (pre["kind"], pre["prefix"], pre["suffix"], pre["answer_end"]) == \
        ("chat", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>")
    assert (tiny["bundle"] / B.TOKENIZER).is_file() and man.num_classes == 32 and man.head is None
    names = {layer.layer.split("/")[-2] for layer in man.layers}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(man.layers) == 14                  # 7 projections x 2 layers; embedding / tied head frozen
    step = standard_only(tiny["bundle"])
    assert [i.name for i in step.graph.input][:3] == ["input_ids", "attention_mask", "labels"]
    # SiLU(gate) is recomputed in the backward (export/backward_act.py), not kept from the forward
    assert sum(n.op_type == "QuickGelu" for n in step.graph.node) == 2 * 2


def test_step_graph_loss_and_gradients_equal_torch(tiny):
    import torch
    man = B.load_bundle(tiny["bundle"])
    ds = lm.load_jsonl(tiny["train"], lm.Encoder(tiny["bundle"] / B.TOKENIZER, man.preprocessing))
    batch = ds.batch(np.arange(8))
    trainer = open_trainer(tiny["bundle"])
    out = trainer.session.run(None, trainer._feeds(batch))
    model = tiny["torch"]
    model.zero_grad()
    ids, mask, labels = (torch.from_numpy(a) for a in batch)
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    assert abs(float(out[0]) - loss.item()) < 1e-5
    assert np.allclose(out[1], logits.detach().numpy()[batch[2] != -100], atol=1e-4)
    params = dict(model.named_parameters())
    with np.load(tiny["bundle"] / B.ALLOCATION) as z:
        alloc = {k: z[k].astype(np.int64) for k in z.files}
    for layer, grad in zip(man.layers, out[2:]):
        torch_name = "model" + layer.layer.rsplit("/", 1)[0].replace("/", ".") + ".weight"
        ref = params[torch_name].grad.numpy()            # [out, in] = the layer's rows view
        want = np.take_along_axis(ref, alloc[layer.weight], 1)
        assert np.allclose(grad, want, rtol=1e-4, atol=1e-6), layer.layer


def test_adapt_resume_merge_eval_generate_on_the_board_cli(tiny, capsys):
    b, root = tiny["bundle"], tiny["root"]
    common = ["--data", tiny["train"], "--eval-data", tiny["test"], "--profile", "jetson-orin-nano-8gb",
              "--batch-size", "8", "--lr", "0.02", "--json", "--quiet", "--run-dir", root / "run"]
    r = run_cli("adapt", b, *common, "--steps", "8", "--fresh")      # within the 10 warm-up steps: the same
    assert r.returncode == 0, r.stderr                                 # rates as a 16-step run's first 8
    rep = json.loads(r.stdout)
    assert rep["steps"] == 8 and rep["loss"]["last"] < rep["loss"]["first"]
    r = run_cli("adapt", b, "--run-dir", root / "run", "--resume", "--steps", "16", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 16
    common[-1] = root / "straight"
    assert run_cli("adapt", b, *common, "--steps", "16").returncode == 0          # 8 + 8 resumed == 16 straight
    with np.load(root / "run" / "update.npz") as resumed, np.load(root / "straight" / "update.npz") as straight:
        assert sorted(resumed.files) == sorted(straight.files)
        assert all(np.array_equal(resumed[k], straight[k]) for k in resumed.files)
    merged = root / "adapted.onnx"
    cli(capsys, "merge", b, "--out", merged, "--run-dir", root / "run")
    # the merged inference model's logits at the answer positions equal the eval graph's
    from taskedge.runtime.checkpoints import CheckpointStore
    from taskedge.runtime.trainer import open_session
    man = B.load_bundle(b)
    ds = lm.load_jsonl(tiny["test"], lm.Encoder(b / B.TOKENIZER, man.preprocessing))
    batch = ds.batch(np.arange(6))
    trainer = open_trainer(b, CheckpointStore(root / "run").latest()[0])
    assert trainer.state.updates == 16
    want = trainer.eval_step(batch)[1]
    full = open_session(merged).run(None, {"input_ids": batch[0], "attention_mask": batch[1]})[0]
    assert np.abs(lm.at_labels(full, batch[2]) - want).max() < 1e-5
    r1 = json.loads(cli(capsys, "eval", b, "--data", tiny["test"], "--model", merged, "--json"))
    r2 = json.loads(cli(capsys, "eval", b, "--data", tiny["test"], "--run-dir", root / "run", "--json"))
    assert r1["accuracy"] == r2["accuracy"] and abs(r1["perplexity"] - r2["perplexity"]) < 1e-4
    assert r1["examples"] == 24 and r1["perplexity"] > 1
    answers = json.loads(cli(capsys, "generate", b, "--model", merged, "--prompt", "review: the film was good",
                             "--prompt", "review: bad", "--max-new-tokens", "3", "--json"))["answers"]
    assert len(answers) == 2 and all(isinstance(a["answer"], str) for a in answers)


def cli(capsys, *args) -> str:
    """`taskedge ARGS` in this process (the board commands import no host code); its stdout."""
    from taskedge.runtime.cli import main
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_generate_is_greedy_decoding_of_the_model(tiny):
    """generate's batched, left-padded decoding equals one-prompt-at-a-time argmax decoding in torch."""
    import torch
    from taskedge.runtime.generate import greedy
    from taskedge.runtime.trainer import open_session
    b = tiny["bundle"]
    man = B.load_bundle(b)
    enc = lm.Encoder(b / B.TOKENIZER, man.preprocessing)
    prompts = ["review: the film was good", "review: a dull plot and a bad cast was bad"]
    got = greedy(open_session(b / B.BASE_MODEL), enc, prompts, 4, batch=2)
    for p, answer in zip(prompts, got):
        ids = torch.tensor([enc.prompt(p)])
        new = []
        for _ in range(4):
            nxt = int(tiny["torch"](input_ids=ids).logits[0, -1].argmax())
            if nxt == enc.eos:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert answer == enc.decode(new)


@pytest.mark.parametrize("line, why", [('{"prompt": "review: good"}', "bad record"),
                                       ('{"prompt": 3, "answer": "positive"}', "bad record"),
                                       ('{"prompt": "' + "good " * 80 + '", "answer": "positive"}', "tokens")])
def test_bad_records_are_one_line_errors(tiny, line, why):
    bad = tiny["root"] / "bad.jsonl"
    bad.write_text(line + "\n")
    r = run_cli("adapt", tiny["bundle"], "--data", bad, "--steps", "1", "--lr", "0.01", "--run-dir",
                tiny["root"] / "bad-run")
    assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_gguf_errors_are_one_line(tiny, tmp_path):
    r = run_cli("export", f"hf:{tiny['folder']}", "--gguf", "nope.gguf", "--out", tmp_path / "b")
    assert r.returncode == 2 and "--gguf nope.gguf: no such file in" in r.stderr, r.stderr
    r = run_cli("export", tiny["train"], "--gguf", "x.gguf", "--out", tmp_path / "b")
    assert r.returncode == 2 and "give the folder holding it as hf:FOLDER" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()
