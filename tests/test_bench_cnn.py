"""The CNN scenario bench (`taskedge bench --scenarios ...`, tools/bench/scenario_*.py): the depthwise
LoRA / DoRA rewrites against their formulas, DoRA's step-graph gradient against finite differences,
the FLOPs count against the conv formula, GaLore's rank, the Pareto front, the flag checks, and a
--quick run end to end (O-Net, one scenario, three variants)."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")


def tiny_cnn(seed=0):
    """x [2, 3, 8, 8] -> conv 3x3 (3->8) -> depthwise 3x3 (8) -> global pool -> flatten [2, 8]."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    wd = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["pixels", "w1"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Conv", ["hr", "wd"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8, name="dw"),
             helper.make_node("GlobalAveragePool", ["d"], ["p"]), helper.make_node("Flatten", ["p"], ["features"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["b", 3, 8, 8])],
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["b", 8])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(wd, "wd")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, w1, wd


def run(model, feeds):
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def with_weights(model, **arrays):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return m


@pytest.mark.parametrize("dora", [False, True])
def test_weight_space_rewrite_matches_its_formula(dora):
    """W' = W + 2 * reshape(B @ A) (LoRA, depthwise only) or m * V / ||V|| (DoRA, every conv), with
    the depthwise kernel read as C x k^2."""
    from taskedge.tools.bench.cnn_peers import weight_space
    base, w1, wd = tiny_cnn()
    m = onnx.ModelProto()
    m.CopyFrom(base)
    table = weight_space(m, rank=2, dora=dora, seed=0, exclude=set(), only_depthwise=not dora)
    assert [r["weight"] for r in table] == (["w1", "wd"] if dora else ["wd"])
    assert [r["cols"] for r in table][-1] == 9 and table[-1]["depthwise"]
    rng = np.random.default_rng(1)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    new = {r["params"][1]: rng.standard_normal(inits[r["params"][1]].shape).astype(np.float32) for r in table}
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = run(with_weights(m, **new), {"pixels": x})[0]

    def formula(w, prefix):
        a, b = inits[prefix + "A"], new[prefix + "B"]
        v = w + 2.0 * (b @ a).reshape(w.shape)
        if not dora:
            return v
        mag = inits[prefix + "m"]
        np.testing.assert_allclose(mag.ravel(), np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(1)), rtol=1e-5)
        return mag * v / np.sqrt((v ** 2).sum(axis=(1, 2, 3), keepdims=True))

    kind = "dora" if dora else "lora"
    want_w1 = formula(w1, f"w1.{kind}_") if dora else w1
    want = run(with_weights(base, w1=want_w1.astype(np.float32), wd=formula(wd, f"wd.{kind}_").astype(np.float32)),
               {"pixels": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dora_step_graph_gradient_matches_finite_differences(tmp_path):
    """The lowered step graph differentiates DoRA's norm: d(loss)/dB and d(loss)/dm by central differences."""
    from taskedge.tools.bench.cnn_peers import build_peer
    base, _, _ = tiny_cnn()
    info = build_peer(base, "dora", 2, 3, 0, tmp_path / "p")
    init = dict(np.load(tmp_path / "p" / "init.npz"))
    rng = np.random.default_rng(2)
    for n in init:
        if n.endswith("_B"):
            init[n] = rng.standard_normal(init[n].shape).astype(np.float32) * 0.1
    step = onnx.load(str(tmp_path / "p" / "step.onnx"))
    feeds = {"pixels": rng.standard_normal((4, 3, 8, 8)).astype(np.float32), "labels": np.array([0, 1, 2, 1]), **init}
    grads = dict(zip(info["trainable"], run(step, feeds)[2:]))
    for name in ("wd.dora_B", "w1.dora_m"):
        i = (0,) * init[name].ndim
        plus, minus = {k: v.copy() for k, v in init.items()}, {k: v.copy() for k, v in init.items()}
        plus[name][i] += 1e-2
        minus[name][i] -= 1e-2
        fd = (run(step, {**feeds, **plus})[0] - run(step, {**feeds, **minus})[0]) / 2e-2
        assert abs(float(fd) - float(grads[name][i])) <= 2e-2 * max(1e-3, abs(float(fd))) + 1e-4, name


def test_flops_follow_the_conv_formula():
    from taskedge.tools.bench.flops import graph_flops
    base, _, _ = tiny_cnn()
    f = graph_flops(base, {"pixels": np.zeros((2, 3, 8, 8), np.float32)})
    assert f["Conv"] == 2 * 2 * 8 * 8 * 8 * (3 * 9) + 2 * 2 * 8 * 8 * 8 * 9 and f["total"] == f["Conv"]


def test_flops_count_a_mul_read_only_by_reduce_sums():
    from taskedge.tools.bench.flops import graph_flops
    nodes = [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("ReduceSum", ["ab"], ["s"], keepdims=0),
             helper.make_node("Mul", ["a", "b"], ["ab2"]), helper.make_node("Relu", ["ab2"], ["r"])]
    vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)       # noqa: E731
    g = helper.make_graph(nodes, "m", [vi("a", [4, 6]), vi("b", [4, 6])], [vi("s", []), vi("r", [4, 6])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    f = graph_flops(m, {"a": np.ones((4, 6), np.float32), "b": np.ones((4, 6), np.float32)})
    assert f == {"Mul": 2 * 24, "total": 2 * 24}


def test_galore_update_has_the_projection_rank():
    from taskedge.tools.bench.galore import GaLoreAdamW
    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "b": np.zeros(16, np.float32)}
    before = p["w"].copy()
    opt = GaLoreAdamW(p, rank=2)
    opt.step(p, {"w": rng.standard_normal(p["w"].shape).astype(np.float32), "b": np.ones(16, np.float32)},
             {"w": 1e-2, "b": 1e-2})
    assert np.linalg.matrix_rank((p["w"] - before).reshape(16, -1), tol=1e-6) == 2
    assert opt.state_values() == 2 * (2 * 27) + 16 * 2 + 2 * 16 and np.all(p["b"] < 0)


def test_sweep_extends_past_the_edge_its_best_rate_sits_on():
    from taskedge.tools.bench.cnn_worker import beyond_edge
    assert beyond_edge([3e-3, 1e-2, 3e-2], 3e-2) == 0.1 and beyond_edge([1e-4, 3e-4, 1e-3], 1e-4) == 3e-5
    assert beyond_edge([3e-3, 1e-2, 3e-2], 1e-2) is None


def test_pareto_front_and_the_taskedge_gap():
    from taskedge.tools.bench.scenario_report import pareto, taskedge_gap
    rows = {"a": {"accuracy": 0.9, "peak_rss_mb": 300}, "b": {"accuracy": 0.8, "peak_rss_mb": 200},
            "taskedge": {"accuracy": 0.7, "peak_rss_mb": 250}, "c": {"accuracy": 0.6, "peak_rss_mb": 150}}
    assert pareto(rows) == ["a", "b", "c"]
    assert taskedge_gap(rows) == "off the front by 10.0 accuracy points at its memory, or 50 MB at its accuracy"
    rows["taskedge"]["accuracy"] = 0.85
    assert taskedge_gap(rows) == "on the front"


def test_scenario_flags_are_checked_where_parsed(tmp_path):
    from conftest import run_cli
    for args, msg in ((["--scenarios", "shift,nope"], "scenario ['nope'] unknown"),
                      (["--scenarios", "shift", "--cnn-variants", "lora-r3"], "variant ['lora-r3'] unknown")):
        r = run_cli("bench", *args, "--out", tmp_path / "o")
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow      # 1-2 min: .ci/run runs it after make test (make test-benches)
def test_quick_scenario_bench_end_to_end(tmp_path):
    """O-Net, new classes, DoRA / TaskEdge at 8 steps: every row trained, counted and plotted."""
    from conftest import run_cli
    r = run_cli("bench", "--scenarios", "new-classes", "--quick", "--cnn-variants", "dora-r4,taskedge",
                "--out", tmp_path / "o", "--quiet", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "o" / "bench-cnn.json").read_text())
    rows = rep["runs"][0]["variants"]
    assert list(rows) == ["dora-r4", "taskedge"] and rep["runs"][0]["model"] == "onet"
    for name, row in rows.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["peak_rss_mb"] > 0 and not row["torch_imported"], name
        assert row["flops"]["step"] >= row["flops"]["forward"] > 0 and len(row["sweep"]) == 1
    assert rows["taskedge"]["flops"]["step"] < rows["dora-r4"]["flops"]["step"]
    assert 256 * 5 + 5 < rows["taskedge"]["trainable_params"] < rows["dora-r4"]["trainable_params"]
    assert (tmp_path / "o" / "bench-cnn.png").stat().st_size > 10_000
    assert "| taskedge |" in (tmp_path / "o" / "bench-cnn.md").read_text()


def test_torch_adapters_follow_the_step_graph_formulas():
    """cnn_torch.adapt: depthwise convs get the weight-space update, groups-1 convs peft's activation path;
    both leave the output unchanged at init (B = 0) and DoRA's magnitude is each kernel's norm."""
    import torch
    from torch import nn
    from taskedge.tools.bench.cnn_torch import ConvLoRA, LowRankWeight, adapt
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    x = torch.randn(2, 3, 8, 8)
    want = body(x).detach()
    adapt(body, "lora", 16, 0)
    assert isinstance(body[0], ConvLoRA) and isinstance(body[2].parametrizations.weight[0], LowRankWeight)
    assert body[2].parametrizations.weight[0].A.shape == (8, 9)          # rank capped at min(C, k^2)
    torch.testing.assert_close(body(x), want)
    dora = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    w = dora.weight.detach().clone()
    adapt(nn.Sequential(dora), "dora", 2, 0)
    torch.testing.assert_close(dora.parametrizations.weight[0].m, w.reshape(8, -1).norm(dim=1))
    torch.testing.assert_close(dora.weight, w)
    assert sorted(n for n, p in dora.named_parameters() if p.requires_grad) == \
        ["parametrizations.weight.0.A", "parametrizations.weight.0.B", "parametrizations.weight.0.m"]


def test_torch_flop_count_divides_a_grouped_conv_weight_gradient_by_its_groups():
    """cnn_torch._conv_backward: dW of a depthwise conv counted once per group, as flops.py counts it."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode
    from taskedge.tools.bench.cnn_torch import _conv_backward
    for groups in (1, 8):
        conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward}) as c:
            conv(torch.randn(2, 8, 6, 6)).sum().backward()
        assert c.get_total_flops() == 2 * (2 * 2 * 8 * 36 * (8 // groups) * 9)      # forward + dW, x needs no grad


def test_torch_rows_fold_batch_norm_as_the_export_does():
    import torch
    from torch import nn
    from taskedge.tools.bench.cnn_torch import fold_batch_norm
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6()).eval()
    body[1].running_var.uniform_(0.01, 0.1)
    body[1].running_mean.normal_()
    x = torch.randn(2, 3, 6, 6)
    want = body(x).detach()
    fold_batch_norm(body)
    assert isinstance(body[1], nn.Identity)
    torch.testing.assert_close(body(x), want, rtol=1e-4, atol=1e-5)
