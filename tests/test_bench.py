"""`taskedge bench` (tools/bench/) end to end at toy size: every variant in its own subprocess,
MiniLM, batch 4, 3 steps; asserts the report's structure and that every variant trained, never
timing. Plus its parts without workers: the target maths, the Markdown report, the flag checks,
and that it trains on the runtime's schedule, data order and accuracy loop (defined once)."""
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")


def test_bench_module_does_not_import_torch():
    code = "import sys, taskedge.tools.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_lora_rewrite_is_exact_at_init(tmp_path):
    """B = 0 at init, so the LoRA graph's logits equal the base graph's."""
    import onnx
    import torch
    import onnxruntime as ort
    from taskedge.export import baselines as BL
    from taskedge.export.head import add_head

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.randn(2, 8),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    base = onnx.load(str(path))
    m = onnx.load(str(path))
    add_head(m, 3, 0)
    lora = onnx.load(str(path))
    add_head(lora, 3, 0)
    table = BL.add_lora(lora, rank=2, exclude={"taskedge_head.weight"})
    assert len(table) == 1 and table[0]["trainable"] == 2 * (8 + 16)   # the last Linear became the head
    scaled = onnx.load(str(path))
    add_head(scaled, 3, 0)
    assert BL.scale_head(scaled, 10.0) == ["taskedge_head.bias.lr_scaled", "taskedge_head.weight.lr_scaled"]
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    outs = [ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for g in (m, lora, scaled)]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
    np.testing.assert_allclose(outs[2], outs[0], atol=1e-5)
    assert len(BL.full_ft_trainable(m)) == 2 + 2          # first Linear (W, b) + head (W, b)
    del base


def test_floor_probe_reaches_the_first_layer(tmp_path):
    """ort-floor: logits unchanged at init, and the probe bias under the first layer gets a gradient."""
    import onnx
    import torch
    from taskedge.export import baselines as BL
    from taskedge.tools.ort_training import open_artifacts

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 6))
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.randn(2, 8),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    info = BL.build_floor(onnx.load(str(path)), 3, tmp_path / "floor")
    assert info["trainable"][0] == "taskedge_floor.bias" and info["trainable_params"] == 8 + 16 * 3 + 3
    out = tmp_path / "floor"
    ck, tr = open_artifacts(out)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    tr.train_step([x, np.array([0, 1, 2, 0])])
    tr.optimizer_step()
    assert np.abs(ck.get("taskedge_floor.bias")).sum() > 0


def test_bench_tiny_all_variants(tmp_path):
    from taskedge.tools import bench

    r = bench.run_bench("text", quick=True, steps=3, out=str(tmp_path / "out"), workdir=str(tmp_path / "work"),
                        profile=False, plot=True, log=lambda m: None,
                        cfg_override=dict(batch=4, n_train=16, n_test=8, skip=1, warmup=1, rounds=2, timing_steps=2))
    assert set(r["variants"]) == set(bench.VARIANTS)
    for name, v in r["variants"].items():
        for key in ("step_ms_median", "peak_rss_mb", "trainable_params", "optimizer_state_bytes", "update_bytes",
                    "x_ort_full_time", "x_infer_time", "x_ort_full_mem", "x_infer_mem"):
            assert key in v, (name, key)
        assert v["step_ms_median"] > 0 and v["peak_rss_mb"] > 0
        if v["engine"] in ("ort", "infer"):
            assert v["torch_imported"] is False, name          # ORT workers never load torch
        if name == "infer":
            assert v["trainable_params"] == 0
            continue
        assert v["trainable_params"] > 0 and v["optimizer_state_bytes"] == 8 * v["trainable_params"]
        assert v["update_bytes"] > 0 and 0.0 <= v["accuracy"] <= 1.0
        assert v["param_change"] > 0, f"{name} did not train"
    full, te = r["variants"]["ort-full"], r["variants"]["taskedge-0.1%"]
    assert full["trainable_params"] > 20_000_000 > 100 * te["trainable_params"]
    assert r["variants"]["ort-lora8"]["trainable_params"] < full["trainable_params"]
    assert [t["target"] for t in r["targets"]] == [t[0] for t in bench.TARGETS["text"]]
    assert all(t["met"] in (True, False) for t in r["targets"])
    for name, v in r["variants"].items():      # timing rounds: ORT and inference variants, not torch
        assert ("step_ms_rounds" in v) == (bench.VARIANTS[name][0] != "torch"), name
        if "step_ms_rounds" in v:
            assert len(v["step_ms_rounds"]) == 2 and min(v["step_ms_rounds"]) <= v["step_ms_median"]
    out = tmp_path / "out"
    assert (out / "bench.png").stat().st_size > 1000
    md = (out / "bench.md").read_text()
    assert "| variant |" in md and "Targets" in md
    assert json.loads((out / "bench.json").read_text())["variants"].keys() == r["variants"].keys()


def _row(family, engine, ms, mb, acc=None, upd=0, rounds=None, **kw):
    r = {"family": family, "engine": engine, "step_ms_median": ms, "peak_rss_mb": mb, "accuracy": acc,
         "update_bytes": upd, **kw}
    if rounds:
        r["step_ms_rounds"] = rounds
    return r


def test_targets_and_ratios_from_synthetic_results():
    """targets.py without any worker: within-round time ratios, the met/missed rule per target kind,
    the per-variant comparison fields, the primary variant's fallback."""
    from taskedge.tools.bench import targets as T

    res = {"infer": _row("infer", "infer", 100, 200, rounds=[100, 100, 50]),
           "ort-full": _row("full", "ort", 400, 600, acc=0.80, upd=4000, rounds=[400, 400, 400]),
           "ort-lora8": _row("lora", "ort", 250, 300, acc=0.70, upd=100, rounds=[250, 250, 250]),
           "taskedge-0.1%": _row("taskedge", "step", 200, 300, acc=0.795, upd=10, rounds=[999, 200, 200],
                                 checkpoint_bytes=20)}
    ratio = T.time_ratio(res)
    assert ratio("taskedge-0.1%", "infer") == 3.0            # median of 200/100 and 200/50, first run ignored
    assert ratio("taskedge-0.1%", "ort-full") == 0.5
    del res["infer"]["step_ms_rounds"]
    assert T.time_ratio(res)("taskedge-0.1%", "infer") == 2.0    # no rounds: ratio of the medians
    got = {t["target"]: (t["value"], t["met"]) for t in T.evaluate_targets(res, 4000)}
    assert got == {"time_vs_infer": (2.0, True), "time_vs_lora": (0.8, True), "mem_vs_infer": (1.5, False),
                   "mem_vs_full": (0.5, True), "ckpt_share": (0.005, True), "update_share": (0.0025, True),
                   "acc_vs_full": (-0.005, True), "acc_vs_lora": (0.095, True)}
    T.compare(res, 4000)
    assert res["ort-lora8"]["x_ort_full_time"] == 0.625 and res["ort-lora8"]["x_infer_mem"] == 1.5
    assert res["ort-full"]["update_share_of_model_bytes"] == 1.0
    assert T.primary_variant(res) == "taskedge-0.1%"
    res2 = {"ort-full": res["ort-full"], "taskedge-1%": res["taskedge-0.1%"]}
    assert T.primary_variant(res2) == "taskedge-1%"
    vision = T.evaluate_targets(res2, 4000, "taskedge-1%", model="vision")
    assert [t["met"] for t in vision] == [False, None, None, None, True, True]   # no torch/infer peers: n/a


def test_report_renders_profiles_and_skipped(tmp_path):
    """report.py on a made-up report: every section, and the files it writes."""
    from taskedge.tools.bench import report as R

    v = dict(step_ms_median=12.5, x_ort_full_time=None, x_infer_time=1.0, peak_rss_mb=100.0, x_ort_full_mem=None,
             x_infer_mem=1.0, trainable_params=0, optimizer_state_bytes=0, update_bytes=0,
             update_share_of_model_bytes=0.0, accuracy=None, loss_first5_mean=None, loss_last5_mean=None,
             family="infer")
    r = {"title": "t", "quick": True, "seed": 0, "execution_provider": "CPUExecutionProvider", "threads": 2,
         "batch": 4, "max_len": 48, "steps": 5, "measured_steps": 4, "rounds": 2, "timing_steps": 2,
         "n_train": 8, "n_test": 4, "num_weights": 1000, "model_bytes": 4000,
         "machine": {"cpus": 2, "loadavg_start": [1.0], "loadavg_end": [1.0]}, "warmup_lr_steps": 2,
         "lr": {"taskedge": 1e-2, "lora": 2e-3, "full": 1e-4, "head": 1e-2}, "variants": {"infer": v},
         "skipped": {"taskedge-0.1%": "budget too small"}, "primary": "taskedge-0.1%",
         "targets": [{"target": "time_vs_infer", "text": "x", "limit": 2.2, "value": None, "met": None}],
         "profiles": {"infer": [{"op": "MatMul", "ms_per_step": 3.0, "share": 0.5}]}, "wall_seconds": 1.0}
    md = R.format_md(r)
    assert "| infer | 12.5 |" in md and "**n/a** x: -" in md and "`taskedge-0.1%` (budget too small)" in md
    assert "### infer" in md and "| MatMul | 3.0 | 50.0 % |" in md
    R.write(r, tmp_path / "o", plot=False)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["bench.json", "bench.md"]


def test_bench_refuses_bad_flags_before_building_anything(tmp_path):
    from conftest import run_cli
    for args, msg in ((["--variants", "infer,nope"], "'infer,nope' names an unknown variant"),
                      (["--rounds", "0"], "--rounds: '0' must be >= 1"), (["--quick", "--steps", "3"], "--steps 3")):
        r = run_cli("bench", *args, "--out", tmp_path / "o", "--workdir", tmp_path / "w")
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()
    helped = subprocess.run([sys.executable, "-m", "taskedge.tools.bench", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--variants" in helped.stdout and "torch-taskedge-0.1%" in helped.stdout


def test_bench_trains_on_the_runtimes_schedule_data_order_and_eval():
    """Each concept is defined once: the bench's workers use the runtime's lr schedule, batch order
    and accuracy loop and baselines.unscale_update; nothing under tools/bench re-implements them."""
    from pathlib import Path
    import re
    import taskedge.tools.bench as pkg

    src = {p.name: p.read_text() for p in Path(pkg.__file__).parent.glob("*.py")}
    # the CNN study (cnn_*.py, scenario*.py) draws its own shifted data and adapter inits and scores
    # its PyTorch and step-graph twins with one loop of its own; the runtime-row workers may not
    for name, text in src.items():
        own = (r"def \w*accuracy\b", r"argmax") if not name.startswith("cnn_") else ()
        for pattern in (r"def \w*lr_at\b", r"def \w*batch_(idx|indices)\b", *own,
                        r"def \w*unscale\w*", r"\.permutation\(|\.shuffle\(", r"^\s*import onnxruntime",
                        r"^\s*from onnxruntime"):
            assert not re.search(pattern, text, re.M), (name, pattern)
    assert "from taskedge.runtime.adapt import accuracy, batch_indices, lr_at" in src["worker.py"]
    assert "from taskedge.export.baselines import unscale_update" in src["ort_engines.py"]


def test_torch_sparse_delta_trains_only_the_bundles_rows():
    """The torch twin of a bundle trains what the bundle trains: with `trained_rows` (a budget
    below one entry per neuron) only those rows get a delta, at their allocated columns."""
    import torch
    from taskedge.tools.bench.torch_engine import SparseDelta
    idx = np.array([[2], [0], [1], [2]])
    p = SparseDelta(idx, (4, 1, 3), rows=[1, 3])
    assert tuple(p.delta.shape) == (2, 1)
    with torch.no_grad():
        p.delta.copy_(torch.tensor([[5.0], [7.0]]))
    want = np.zeros((4, 3), np.float32)
    want[1, 0], want[3, 2] = 5.0, 7.0
    np.testing.assert_array_equal(p(torch.zeros(4, 1, 3)).detach().reshape(4, 3).numpy(), want)
    assert tuple(SparseDelta(idx, (4, 3)).delta.shape) == (4, 1)
