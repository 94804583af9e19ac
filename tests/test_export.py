"""Exporter: scoring, allocation, graph rewrite, ORT artifacts, bundle, bad input."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from taskedge.export import importance as imp
from taskedge.export.calibrate import activation_norms
from taskedge.export.config import ExportConfig
from taskedge.export.exporter import export_bundle
from taskedge.export.live import live_input
from taskedge.export.layers import find_weight_ops
from taskedge.runtime import bundle as B

from conftest import make_task, open_trainer, run_cli, standard_only


def test_importance_matches_numpy_on_a_real_layer(mlp_onnx, mlp_data):
    """Calibrated norms and |W|*||X|| for the first Gemm equal a direct numpy computation."""
    model = onnx.load(str(mlp_onnx))
    ops = find_weight_ops(model)
    x = np.load(mlp_data / "train.npz")["x"]
    norms = activation_norms(model, ops, [{"x": x[:200]}, {"x": x[200:]}])
    first = ops[0]                                       # Gemm(x, W[64,16], transB=1)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == first.weight))
    expected_norm = np.sqrt((x.astype(np.float64) ** 2).sum(0))
    np.testing.assert_allclose(norms["x"], expected_norm, rtol=1e-5)
    scores = imp.importance(first.rows_view(w), first.row_norms(norms["x"]))
    np.testing.assert_allclose(scores, np.abs(w) * expected_norm[None, :], rtol=1e-5)
    # the second layer's input is ReLU(first layer): check it too
    h = np.maximum(x @ w.T + numpy_helper.to_array(model.graph.initializer[1]), 0)
    np.testing.assert_allclose(norms[ops[1].activation], np.sqrt((h.astype(np.float64) ** 2).sum(0)), rtol=1e-4)


def test_allocation_gives_every_row_k_and_the_top_scores():
    rng = np.random.default_rng(0)
    s = rng.random((7, 12)).astype(np.float32)
    idx = imp.select_topk(s, 3)
    assert idx.shape == (7, 3)
    for r in range(7):
        assert set(idx[r]) == set(np.argsort(-s[r])[:3])
    assert imp.per_row_k(1000, [10, 20]) == 33
    assert imp.per_row_k(5, [10, 20]) == 1                   # k >= 1 always
    assert imp.layer_k(33, 12) == 12                         # capped by the row length
    assert imp.layer_k(10, 12, (2, 4)) == 6                  # capped by N:M


def test_nm_never_more_than_n_per_group_and_best_under_constraint():
    rng = np.random.default_rng(1)
    s = rng.random((50, 30)).astype(np.float32)
    idx = imp.select_topk(s, 8, (2, 4))
    assert imp.check_nm(idx, (2, 4)) <= 2
    # brute force for one row: best total score with <= 2 per group of 4
    row = s[0]
    best = sorted((v for g in range(0, 30, 4) for v in sorted(row[g:g + 4])[::-1][:2]), reverse=True)[:8]
    assert np.isclose(row[idx[0]].sum(), sum(best))


@pytest.mark.parametrize("bad", ["2", "4:2", "a:b", "0:4"])
def test_bad_nm_is_rejected(bad):
    with pytest.raises(ValueError, match="--nm"):
        imp.parse_nm(bad)


def _train(bundle, x, y, steps=40):
    tr = open_trainer(bundle)
    tr.lr = 0.01
    losses = []
    for s in range(steps):
        i = np.arange(s * 32, s * 32 + 32) % len(x)
        losses.append(tr.train_step([x[i], y[i]])[0])
        tr.optimizer_step()
    return tr, losses


@pytest.mark.parametrize("form", ["gather", "gather_rows", "gather_elements", "scatter"])
def test_small_model_trains_and_only_the_update_is_trainable(tmp_path, mlp_onnx, mlp_data, form):
    out = tmp_path / "b"
    m = export_bundle(ExportConfig(model=str(mlp_onnx), out=str(out), calib=str(mlp_data / "train.npz"),
                                   budget=0.05, num_classes=3, formulation={"Gemm": form}), log=lambda s: None)
    x, y = make_task()
    tr, losses = _train(out, x, y)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05
    step = standard_only(out)
    inputs = {i.name for i in step.graph.input}
    live = {l.live for l in m.layers if l.live}           # W' = W + delta, kept by the runtime (export/live.py)
    assert live == ({live_input(l.weight) for l in m.layers} if form == "scatter" else set())
    assert inputs == set(m.trainable_names) | {"x", B.LABELS_INPUT} | live
    if live:                                              # no W' is built in the graph any more
        assert "ScatterElements" not in {n.op_type for n in step.graph.node}
    assert sum(a.size for a in tr.state.params.values()) == m.trainable_params
    assert all(layer.formulation == form for layer in m.layers)


@pytest.mark.parametrize("extra", [{}, {"budget": 0.01, "min_entries": 0}, {"lora_rank": 2}])
def test_live_weights_train_exactly_as_weights_built_in_the_graph(tmp_path, mlp_onnx, mlp_data, extra):
    """export/live.py + runtime/live.py: W' read as an input the runtime keeps gives the same
    losses and the same trained state, step for step, as W' built in the step graph (plain delta,
    a budget below one entry per neuron, sparse LoRA); the base weights file is not written."""
    runs = {}
    for built in (False, True):
        out = tmp_path / f"b{built}"
        m = export_bundle(ExportConfig(model=str(mlp_onnx), out=str(out), calib=str(mlp_data / "train.npz"),
                                       num_classes=3, formulation={"Gemm": "scatter"}, built_weights=built,
                                       **{"budget": 0.05, **extra}), log=lambda s: None)
        assert all(bool(l.live) != built for l in m.layers)
        before = (out / B.WEIGHTS).read_bytes()
        x, y = make_task()
        tr, losses = _train(out, x, y, steps=15)
        assert (out / B.WEIGHTS).read_bytes() == before
        runs[built] = losses, tr.state.params
    assert runs[False][0] == runs[True][0]
    for name, a in runs[True][1].items():
        np.testing.assert_array_equal(runs[False][1][name], a, err_msg=name)


def test_conv_depthwise_and_3d_matmul_bundle_trains_with_nm(tmp_path, cnn_onnx):
    rng = np.random.default_rng(0)
    px = rng.standard_normal((128, 1, 8, 8)).astype(np.float32)
    labels = (px[:, 0, :4].mean((1, 2)) > 0).astype(np.int64) + 2 * (px[:, 0, :, :4].mean((1, 2)) > 0)
    np.savez(tmp_path / "c.npz", pixels=px, labels=labels)
    out = tmp_path / "cnn"
    m = export_bundle(ExportConfig(model=str(cnn_onnx), out=str(out), calib=str(tmp_path / "c.npz"),
                                   budget=0.2, nm="2:4", num_classes=4), log=lambda s: None)
    ops = {l.op for l in m.layers}
    assert ops == {"Conv", "MatMul"}
    dw = next(l for l in m.layers if l.cols == 9)          # depthwise: 1 channel x 3x3 per output
    assert dw.k >= 1
    alloc = np.load(out / B.ALLOCATION)
    for l in m.layers:
        assert imp.check_nm(alloc[l.weight], (2, 4)) <= 2
        assert alloc[l.weight].shape == (l.rows, l.k)
    standard_only(out)
    tr, losses = _train(out, px, labels, steps=30)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_lora_bundle_trains(tmp_path, mlp_onnx, mlp_data):
    out = tmp_path / "lora"
    m = export_bundle(ExportConfig(model=str(mlp_onnx), out=str(out), calib=str(mlp_data / "train.npz"),
                                   budget=0.05, lora_rank=2, num_classes=3), log=lambda s: None)
    assert all(len(l.params) == 2 for l in m.layers)
    assert m.update_params == sum(2 * (l.rows + l.cols) for l in m.layers)
    x, y = make_task()
    _, losses = _train(out, x, y)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_manifest_hashes_and_inspect_json(mlp_bundle):
    man = json.loads((mlp_bundle / B.MANIFEST).read_text())
    assert man["schema_version"] == B.SCHEMA_VERSION
    assert set(man["files"]) >= set(B.REQUIRED_FILES)
    r = run_cli("inspect", mlp_bundle, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    alloc = np.load(mlp_bundle / B.ALLOCATION)          # the entries themselves, counted independently
    assert info["update_params"] == sum(alloc[k].size for k in alloc.files) > 0
    state = np.load(mlp_bundle / B.INITIAL_STATE)
    assert info["update_params"] + info["head_params"] == sum(state[k].size for k in state.files)
    assert info["head_params"] == 64 * 3 + 3
    assert all(l["min_inputs_per_neuron"] >= 1 for l in info["layers"])


def test_corrupted_bundle_file_is_named(tmp_path, mlp_bundle):
    import shutil
    b = tmp_path / "b"
    shutil.copytree(mlp_bundle, b)
    data = bytearray((b / B.ALLOCATION).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / B.ALLOCATION).write_bytes(bytes(data))
    r = run_cli("inspect", b)
    assert r.returncode == 2 and "allocation.npz" in r.stderr and "sha256" in r.stderr


def _no_weight_model(path):
    from onnx import helper, TensorProto
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("case", ["missing", "not_onnx", "no_weights", "bad_shape", "bad_dtype", "budget0",
                                  "budget2", "bad_nm", "budget_nan", "lr_negative"])
def test_bad_input_one_line_exit_2_nothing_left(tmp_path, mlp_onnx, mlp_data, case):
    model, calib, extra = str(mlp_onnx), str(mlp_data / "train.npz"), []
    if case == "missing":
        model = str(tmp_path / "nope.onnx")
    elif case == "not_onnx":
        (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
        model = str(tmp_path / "junk.onnx")
    elif case == "no_weights":
        _no_weight_model(tmp_path / "relu.onnx")
        model = str(tmp_path / "relu.onnx")
        np.savez(tmp_path / "c.npz", x=np.zeros((4, 4), np.float32))
        calib = str(tmp_path / "c.npz")
    elif case == "bad_shape":
        np.savez(tmp_path / "c.npz", x=np.zeros((4, 15), np.float32))
        calib = str(tmp_path / "c.npz")
    elif case == "bad_dtype":
        np.savez(tmp_path / "c.npz", x=np.zeros((4, 16), np.int64))
        calib = str(tmp_path / "c.npz")
    elif case == "budget0":
        extra = ["--budget", "0"]
    elif case == "budget2":
        extra = ["--budget", "2"]
    elif case == "bad_nm":
        extra = ["--nm", "3:2"]
    elif case == "budget_nan":
        extra = ["--budget", "nan"]
    elif case == "lr_negative":
        extra = ["--lr", "-1"]
    out = tmp_path / "out"
    r = run_cli("export", model, "--out", out, "--calib", calib, "--num-classes", "3", *extra)
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("form", ["gather", "gather_rows", "gather_elements", "scatter"])
def test_gemm_alpha_update_matches_merged_weights(tmp_path, form):
    """Gemm(alpha=2): the graph's update term and `merge` (which adds delta to W) must agree."""
    from onnx import TensorProto, helper
    from taskedge.runtime.evaluate import predict_onnx
    from taskedge.runtime.merge import merge

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="g1", transB=1, alpha=2.0),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="g2", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(tmp_path / "m.onnx"))
    x = rng.standard_normal((16, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    out = tmp_path / "b"
    export_bundle(ExportConfig(model=str(tmp_path / "m.onnx"), out=str(out), calib=str(tmp_path / "c.npz"),
                               budget=0.5, num_classes=3, formulation={"Gemm": form}), log=lambda s: None)
    tr = open_trainer(out)
    for name, a in tr.state.params.items():
        tr.state.params[name] = rng.standard_normal(a.shape).astype(np.float32)
    want = tr.eval_step([x, np.zeros(16, np.int64)])[1]
    np.savez(tmp_path / "update.npz", **tr.state.params)
    merge(out, tmp_path / "merged.onnx", update=str(tmp_path / "update.npz"))
    np.testing.assert_allclose(predict_onnx(tmp_path / "merged.onnx", {"x": x}), want, rtol=1e-5, atol=1e-5)


def _mixed_model(path, rng):
    """3-D MatMuls, a Gemm(transB=1, alpha=2) and a Gemm(transB=0): every layout sparse backward handles."""
    from onnx import TensorProto, helper
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (6, 8)), ("w2", (8, 8)), ("w3", (8, 8)), ("w4", (8, 8)), ("w5", (3, 8)))]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="m1"), helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("MatMul", ["ar", "w2"], ["b"], name="m2"),
             helper.make_node("ReduceMean", ["b"], ["bm"], axes=[1], keepdims=0),
             helper.make_node("Gemm", ["bm", "w3"], ["c"], name="g3", transB=1, alpha=2.0),
             helper.make_node("Tanh", ["c"], ["ct"]),
             helper.make_node("Gemm", ["ct", "w4"], ["d"], name="g4"), helper.make_node("Relu", ["d"], ["dr"]),
             helper.make_node("Gemm", ["dr", "w5"], ["y"], name="g5", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.parametrize("lora_rank,budget", [(None, 0.3), (2, 0.3), (None, 0.14)])
def test_sparse_backward_is_exact(tmp_path, lora_rank, budget):
    """The rewritten training graph (export/backward.py) trains exactly like ORT's dense gradient."""
    rng = np.random.default_rng(0)
    _mixed_model(tmp_path / "m.onnx", rng)
    x = rng.standard_normal((32, 4, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 32).astype(np.int64)
    np.savez(tmp_path / "c.npz", x=x)
    runs = {}
    for sparse in (True, False):
        out = tmp_path / f"b{sparse}"
        m = export_bundle(ExportConfig(model=str(tmp_path / "m.onnx"), out=str(out), calib=str(tmp_path / "c.npz"),
                                       budget=budget, num_classes=3, lora_rank=lora_rank, dense_backward=not sparse,
                                       formulation={"MatMul": "scatter", "Gemm": "scatter"}), log=lambda s: None)
        assert {l.backward for l in m.layers} == {"sparse" if sparse else "dense"}
        assert max(l.k for l in m.layers) == (1 if budget < 0.2 else 2)
        if sparse:   # k=1 gathers the few used columns; larger k uses x itself (export/backward.py)
            nodes = {n.name for n in standard_only(out).graph.node}
            assert any(n.endswith("taskedge_sb_x_used") for n in nodes) == (budget < 0.2)
        tr = open_trainer(out)
        tr.lr = 1e-3
        init = np.random.default_rng(1)
        for name in m.trainable_names:   # non-zero deltas, so dx must see the updated weights
            tr.state.params[name] = 0.3 * init.standard_normal(tr.state.params[name].shape).astype(np.float32)
        losses = []
        for i in range(4):
            losses.append(tr.train_step([x[8 * i:8 * i + 8], labels[8 * i:8 * i + 8]])[0])
            tr.optimizer_step()
        runs[sparse] = (losses, dict(tr.state.params))
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for name, value in runs[False][1].items():
        np.testing.assert_allclose(runs[True][1][name], value, rtol=1e-4, atol=1e-6)
    assert len(runs[False][1]) >= 5


def test_sparse_backward_drops_the_dense_weight_gradient(tmp_path):
    rng = np.random.default_rng(0)
    _mixed_model(tmp_path / "m.onnx", rng)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((32, 4, 6)).astype(np.float32))
    out = tmp_path / "b"
    export_bundle(ExportConfig(model=str(tmp_path / "m.onnx"), out=str(out), calib=str(tmp_path / "c.npz"),
                               budget=0.3, num_classes=3, formulation={"MatMul": "scatter", "Gemm": "scatter"}),
                  log=lambda s: None)
    names = {o for n in standard_only(out).graph.node for o in n.output}
    for w in ("w1", "w2", "w3", "w4"):
        assert f"{w}.taskedge_w_scattered_grad" not in names          # no [cols, rows] gradient GEMM
        assert f"{w}.taskedge_sb_grad_used" in names


def test_a_small_model_trains_one_input_per_neuron_at_least(tmp_path, mlp_onnx, mlp_data):
    """0.1 % of the MLP's 5,248 weights is 5 entries: raised to one input in each of its 128 neurons;
    --min-entries 32 raises it to 32 entries only (a quarter of each layer's neurons, the best ones)."""
    for floor, want in ((None, [64, 64]), (32, [16, 16])):
        r = run_cli("export", mlp_onnx, "--out", tmp_path / f"out{floor}", "--calib", mlp_data / "train.npz",
                    "--num-classes", "3", *(["--min-entries", floor] if floor else []), "--json")
        assert r.returncode == 0, r.stderr
        assert f"0.001 of 5248 weights = 5 entries, raised to {sum(want)}" in r.stderr, r.stderr
        info = json.loads(r.stdout)
        assert [l["trainable"] for l in info["layers"]] == want


def test_budget_below_one_entry_per_layer_still_trains_each_layer(tmp_path, mlp_onnx, mlp_data):
    """0.0001 of 5,248 weights is 0 entries: each layer's best neuron trains its best input, with a warning
    (--min-entries 0: the share as given, not raised to one input per neuron)."""
    r = run_cli("export", mlp_onnx, "--out", tmp_path / "out", "--calib", mlp_data / "train.npz", "--num-classes", "3",
                "--budget", "0.0001", "--min-entries", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert "warning: budget 0.0001" in r.stderr and "each layer still trains" in r.stderr
    info = json.loads(r.stdout)
    assert [l["trainable"] for l in info["layers"]] == [1, 1]
