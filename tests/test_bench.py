"""`taskedge bench` end to end at toy size: every variant in its own subprocess, MiniLM,
batch 4, 3 steps. Asserts the report's structure and that every variant trained; never timing."""
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
