"""Cases 4-6 — bad data is named (file + record) or skipped and counted; memory pressure steps the
micro-batch down; a full or read-only disk leaves the previous checkpoint intact and names the path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from taskedge.runtime import bundle as B
from taskedge.runtime.fsutil import UserError

from .conftest import (adapt_args, adapt_ok, cli_cmd, committed_checkpoints_load, load_update, one_line_error,
                       run, same_update, temp_files, wait_for)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


X = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
Y = np.arange(64) % 3

NPZ_CASES = {
    # name: (arrays, text the one-line error must contain, skippable per record)
    "wrong shape": (dict(x=X[:, :15], labels=Y), "dimension 1 must be 16", False),
    "wrong rank": (dict(x=X[:, :, None], labels=Y), "rank", False),
    "wrong dtype (str)": (dict(x=X.astype(str), labels=Y), "dtype", False),
    "labels float": (dict(x=X, labels=Y.astype(np.float32)), "integer", False),
    "labels scalar": (dict(x=X, labels=np.array(3)), "1-D", False),
    "label out of range": (dict(x=X, labels=np.where(np.arange(64) == 9, 5, Y)), "record 9: label 5", True),
    "NaN in input": (dict(x=np.where(np.arange(64)[:, None] == 4, np.nan, X).astype(np.float32), labels=Y),
                     "record 4: NaN/Inf", True),
    "float64 overflow to Inf": (dict(x=np.where(np.arange(64)[:, None] == 6, 1e300, X), labels=Y),
                                "record 6: NaN/Inf", True),
    "length mismatch": (dict(x=X[:10], labels=Y), "records", False),
    "zero records": (dict(x=X[:0], labels=Y[:0]), "no records", False),
    "no labels": (dict(x=X), "'labels'", False),
    "missing input": (dict(z=X, labels=Y), "'x'", False),
    "object array (pickle)": (dict(x=np.array([object()] * 64, dtype=object), labels=Y), "allow_pickle", False),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_bad_npz_is_named_or_skipped(mlp_bundle, tmp_path, record, case):
    arrays, want, skippable = NPZ_CASES[case]
    f = _npz(tmp_path / "bad.npz", **arrays)
    r = run(*adapt_args(mlp_bundle, f, tmp_path / "run", "--steps", "2"))
    line = one_line_error(r, "bad.npz", want)
    seen = "named: " + line.split("bad.npz")[-1].strip(": ")[:60]
    if skippable:
        rep, _ = adapt_ok(mlp_bundle, f, tmp_path / "run2", "--steps", "2", "--skip-bad")
        assert rep["skipped_records"] == 1
        seen += f"; --skip-bad: skipped {rep['skipped_records']}, trained"
    record(f"bad npz: {case}", "exit 2 naming file+record" + (" / skip+count" if skippable else ""), seen)


def test_empty_and_garbage_files(mlp_bundle, tmp_path, record):
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip" * 20)
    (tmp_path / "data.csv").write_text("1,2,3\n")
    for name, want in (("empty.npz", "empty file"), ("junk.npz", "not a readable .npz"),
                       ("data.csv", "unknown data format"), ("missing.npz", "data not found")):
        r = run(*adapt_args(mlp_bundle, tmp_path / name, tmp_path / "run", "--steps", "2"))
        one_line_error(r, name, want)
    record("bad data: empty / garbage / unknown / missing file", "exit 2 naming the file", "4/4 named, no traceback")


# -- images and JSONL need a manifest with the right inputs; the loaders run for real -------------------

def _manifest(inputs, num_classes, pre=None):
    return B.Manifest(model_name="t", inputs=inputs, logits="y", num_classes=num_classes, num_weights=1,
                      method={}, layers=[], update_params=0, preprocessing=pre or {})


def test_images_that_fail_to_decode(tmp_path, record):
    pytest.importorskip("PIL", reason="image folders need Pillow (pip install pillow)")
    from PIL import Image
    from taskedge.runtime.data import load_dataset
    m = _manifest([B.TensorSpec("pixels", "float32", ["b", 1, 8, 8])], 2)
    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 10), 40 * i, np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    good = (tmp_path / "img" / "dog" / "0.png").read_bytes()
    (tmp_path / "img" / "dog" / "torn.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "img" / "cat" / "noise.jpg").write_bytes(os.urandom(300))
    with pytest.raises(UserError) as e:
        load_dataset(tmp_path / "img", m, tmp_path)
    assert "noise.jpg" in str(e.value) and "cannot decode" in str(e.value)
    ds = load_dataset(tmp_path / "img", m, tmp_path, skip_bad=True)
    assert len(ds) == 6 and ds.skipped == 2
    record("bad images: undecodable + truncated PNG", "error naming the file / skip+count",
           f"named {Path(str(e.value).split(':')[0]).name}; --skip-bad kept {len(ds)}, skipped {ds.skipped}")


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory):
    """A tiny real tokenizer (WordLevel) in a folder, and a manifest for 8-token inputs."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("good bad movie plot the a very".split())}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("text")
    tok.save(str(d / B.TOKENIZER))
    return d, _manifest([B.TensorSpec("input_ids", "int64", ["b", 8]),
                         B.TensorSpec("attention_mask", "int64", ["b", 8])], 2)


JSONL_BAD = {
    "invalid JSON": ('{"text": "good movie", "label": 1', "JSONDecodeError"),
    "missing label": ('{"text": "good movie"}', "KeyError"),
    "label out of range": ('{"text": "good movie", "label": 4}', "label 4"),
    "label 1.5": ('{"text": "good movie", "label": 1.5}', "not an integer"),
    "not an object": ('["good movie", 1]', "not an object"),
    "text too long": ('{"text": "' + "very " * 12 + 'good", "label": 1}', "longer than the model's 8"),
    "not UTF-8": (b'{"text": "\xff\xfe bad", "label": 0}', "not UTF-8"),
}


@pytest.mark.parametrize("case", list(JSONL_BAD))
def test_bad_jsonl_named_by_line_or_skipped(text_bundle, tmp_path, record, case):
    from taskedge.runtime.data import load_dataset
    d, m = text_bundle
    bad, want = JSONL_BAD[case]
    good = ['{"text": "good movie", "label": 1}', '{"text": "bad plot", "label": 0}', ""]
    f = tmp_path / "t.jsonl"
    lines = [g.encode() for g in good] + [bad if isinstance(bad, bytes) else bad.encode()] + [good[0].encode()]
    f.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UserError) as e:
        load_dataset(f, m, d)
    msg = str(e.value)
    assert want in msg and ("t.jsonl:4" in msg or "t.jsonl: line 4" in msg), msg
    ds = load_dataset(f, m, d, skip_bad=True)
    assert len(ds) == 3 and ds.skipped == 1
    record(f"bad JSONL: {case}", "error naming file:line / skip+count",
           f"named line 4 ({want}); --skip-bad kept 3, skipped 1")


# -- memory pressure ------------------------------------------------------------------------------

def _popen_adapt(bundle, data, run_dir, *extra, env=None):
    return subprocess.Popen(cli_cmd(*adapt_args(bundle, data, run_dir, *extra)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))


def test_memory_budget_lowered_mid_run_and_sigusr1(mlp_bundle, mlp_data, tmp_path, record):
    run_dir = tmp_path / "run"
    p = _popen_adapt(mlp_bundle, mlp_data / "train.npz", run_dir, "--steps", "400", "--checkpoint-every", "2",
                     "--micro-batch", "32", "--batch-size", "32")
    assert wait_for(lambda: (run_dir / "ckpt-00000004.json").exists(), 60)
    p.send_signal(signal.SIGUSR1)                                # halve the micro-batch: 32 -> 16
    assert wait_for(lambda: (run_dir / "ckpt-00000030.json").exists(), 60)
    (run_dir / "control.json").write_text(json.dumps({"memory_budget_mb": 10}))   # below any real RSS
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    rep = json.loads(out)
    downs = rep["memory"]["stepdowns"]
    record("memory: SIGUSR1, then budget 10 MB via control.json", "micro-batch halves each time, run finishes",
           f"micro 32 -> {' -> '.join(str(d['micro_batch']) for d in downs)}; stop={rep['stop_reason']}")
    assert downs[0]["why"] == "SIGUSR1 received" and downs[0]["micro_batch"] == 16
    assert any("budget" in d["why"] for d in downs[1:]) and rep["memory"]["final_micro_batch"] == 1
    assert rep["memory"]["budget_mb"] == 10 and rep["steps"] == 400 and rep["stop_reason"] == "steps"


def test_allocation_failure_steps_down(mlp_bundle, mlp_data, tmp_path, record):
    rep, _ = adapt_ok(mlp_bundle, mlp_data / "train.npz", tmp_path / "run", "--steps", "20", "--micro-batch", "8",
                      "--batch-size", "32", env={"TASKEDGE_FAULT_ALLOC_FAIL_AT_STEP": "5"})
    downs = rep["memory"]["stepdowns"]
    record("memory: allocation fails once at step 5 (test hook)", "micro-batch 8 -> 4, run finishes",
           f"stepdowns {[(d['step'], d['micro_batch']) for d in downs]}; stop={rep['stop_reason']}")
    assert len(downs) == 1 and downs[0]["step"] == 5 and "allocation failed" in downs[0]["why"]
    assert rep["memory"]["final_micro_batch"] == 4 and rep["steps"] == 20


# -- disk full / read-only: a real 1 MB tmpfs ------------------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


DISK = ("--checkpoint-every", "5", "--seed", "2", "--lr", "0.01", "--schedule", "constant", "--warmup", "0")


def test_disk_full_and_read_only(mlp_bundle, mlp_data, tmp_path, tiny_fs, record):
    data, run_dir = mlp_data / "train.npz", tiny_fs / "run"
    ref, _ = adapt_ok(mlp_bundle, data, tmp_path / "ref", "--steps", "20", *DISK)
    adapt_ok(mlp_bundle, data, run_dir, "--steps", "10", *DISK)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name.startswith("ckpt-")}
    # fill the file system
    fd = os.open(tiny_fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError:
        pass
    finally:
        os.close(fd)
    r = run(*adapt_args(mlp_bundle, data, run_dir, "--steps", "20", *DISK, "--resume"))
    one_line_error(r, "ckpt-00000015", "No space left", "previous checkpoint")
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name.startswith("ckpt-")}
    assert after == before and not temp_files(run_dir) and committed_checkpoints_load(run_dir) == [5, 10]
    # read-only
    (tiny_fs / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    r = run(*adapt_args(mlp_bundle, data, run_dir, "--steps", "20", *DISK, "--resume"))
    one_line_error(r, "ckpt-00000015", "Read-only file system")
    assert committed_checkpoints_load(run_dir) == [5, 10]
    subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], check=True)
    rep, _ = adapt_ok(mlp_bundle, data, run_dir, "--steps", "20", *DISK, "--resume")
    identical = same_update(load_update(run_dir), load_update(tmp_path / "ref"))
    record("disk full (512 KB tmpfs filled)", "exit 2 naming the path; previous ckpts intact; resume later",
           "named ckpt-00000015 'No space left'; ckpts 5,10 byte-identical; no temp files")
    record("run dir read-only (tmpfs remount ro)", "exit 2 naming the path; previous ckpts intact",
           "named ckpt-00000015 'Read-only file system'; ckpts 5,10 load")
    record("disk freed, --resume", "finishes; update = uninterrupted run",
           f"{'bit-identical' if identical else 'DIFFERENT'}", "none" if identical else "UPDATE DIFFERS")
    assert identical and rep["steps"] == 20
