"""The standard-ONNX step graph against ORT-training's own graph, and the sparse conv backward
(export/backward_conv.py) against ORT's dense ConvGrad."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from taskedge.export.config import ExportConfig
from taskedge.export.exporter import export_bundle

from conftest import open_trainer, standard_only


def _reference_outputs(ref, feeds, params):
    """ORT's own training graph (host training build) on the same inputs and trainable state:
    (loss, {param: gradient})."""
    import onnxruntime as ort
    from taskedge.tools.ort_training import open_artifacts
    ck, _ = open_artifacts(ref)
    model = onnx.load(str(ref / "training_model.onnx"))
    full = dict(feeds)
    for vi in model.graph.input:
        n = vi.name
        if n in full:
            continue
        if n == "lazy_reset_grad":
            full[n] = np.array([True])
        elif n.endswith("_grad.accumulation.buffer"):
            full[n] = np.zeros_like(params[n[: -len("_grad.accumulation.buffer")]])
        else:
            full[n] = params[n] if n in params else ck.get(n)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, full)
    return out[0], {p: full[f"{p}_grad.accumulation.buffer"] for p in params}   # accumulated in place


@pytest.mark.parametrize("model,extra", [("cnn", {}), ("cnn", {"dense_backward": True}),
                                         ("strided", {}), ("strided", {"budget": 0.05, "min_entries": 0}),
                                         ("mlp", {"lora_rank": 2}), ("mlp", {"formulation": {"Gemm": "gather"}})])
def test_step_graph_matches_ort_training_graph(tmp_path, cnn_onnx, mlp_onnx, model, extra):
    """The lowered standard-ONNX step graph gives ORT-training's loss and gradients (conv, depthwise,
    strided, ReLU6 (its mask read from the output: export/backward_act.py), a budget below one entry
    per neuron, 3-D MatMul, sparse LoRA, the gather path), with a non-zero trainable state."""
    rng = np.random.default_rng(0)
    if model in ("cnn", "strided"):
        size = 8 if model == "cnn" else 9
        x = {"pixels": rng.standard_normal((8, 1, size, size)).astype(np.float32)}
        path, budget, classes = cnn_onnx if model == "cnn" else _strided_cnn(tmp_path / "s.onnx"), 0.2, 4
    else:
        x = {"x": rng.standard_normal((8, 16)).astype(np.float32)}
        path, budget, classes = mlp_onnx, 0.05, 3
    np.savez(tmp_path / "c.npz", **x)
    out, ref = tmp_path / "b", tmp_path / "ref"
    extra = {"budget": budget, **extra}
    m = export_bundle(ExportConfig(model=str(path), out=str(out), calib=str(tmp_path / "c.npz"),
                                   num_classes=classes, ort_reference=str(ref), **extra), log=lambda s: None)
    standard_only(out)
    if model == "strided":
        assert any(l.trained_rows for l in m.layers) == (extra["budget"] < 0.1)
        ops = {n.op_type for n in onnx.load(str(out / "step_model.onnx"), load_external_data=False).graph.node}
        assert "Clip" in ops and not ops & {"GreaterOrEqual", "LessOrEqual"}         # ReLU6 masks from the output
    tr = open_trainer(out)
    params = {n: (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in tr.state.params.items()}
    tr.state.params.update(params)
    feeds = {**x, "labels": rng.integers(0, classes, 8).astype(np.int64)}
    got = tr.session.run(None, tr.graph_feeds(feeds))          # live layers' W' from these params
    want_loss, want_grads = _reference_outputs(ref, feeds, params)
    np.testing.assert_allclose(got[0], want_loss, rtol=1e-5)
    for name, g in zip(m.trainable_names, got[2:]):
        np.testing.assert_allclose(g, want_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # the eval graph is the step graph's forward (stepgraph.eval_graph): the same loss and logits
    loss, logits = tr.eval_step([feeds[n] for n in tr.data_names])
    np.testing.assert_allclose(loss, got[0], rtol=1e-6)
    np.testing.assert_allclose(logits, got[1], rtol=1e-5, atol=1e-6)
    n_eval = len(onnx.load(str(out / "eval_model.onnx"), load_external_data=False).graph.node)
    assert n_eval < len(onnx.load(str(out / "step_model.onnx"), load_external_data=False).graph.node)


def _strided_cnn(path):
    """Stride-2 full and depthwise convs (odd and even sizes), ReLU6, as MobileNetV2 has them."""
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2, padding=1), torch.nn.ReLU6(),
                              torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), torch.nn.ReLU6(),
                              torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), torch.nn.ReLU6(),
                              torch.nn.Conv2d(8, 12, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(12, 4))
    torch.onnx.export(net.eval(), (torch.randn(2, 1, 9, 9),), str(path), dynamo=False, input_names=["pixels"],
                      output_names=["y"], dynamic_axes={"pixels": {0: "b"}, "y": {0: "b"}}, opset_version=17)
    return path


@pytest.mark.parametrize("model", ["cnn", "strided"])
def test_sparse_conv_backward_equals_dense(tmp_path, cnn_onnx, model):
    """export/backward_conv.py (selected entries by kernel offset; depthwise layers on their constant
    weight) against ORT's dense ConvGrad on the scattered weight."""
    rng = np.random.default_rng(1)
    size = 8 if model == "cnn" else 9
    x = rng.standard_normal((8, 1, size, size)).astype(np.float32)
    np.savez(tmp_path / "c.npz", pixels=x)
    if model == "strided":
        cnn_onnx = _strided_cnn(tmp_path / "strided.onnx")
    grads = {}
    for sparse in (True, False):
        out = tmp_path / f"b{sparse}"
        m = export_bundle(ExportConfig(model=str(cnn_onnx), out=str(out), calib=str(tmp_path / "c.npz"), budget=0.3,
                                       nm="2:4", num_classes=4, dense_backward=not sparse), log=lambda s: None)
        assert {l.backward for l in m.layers if l.op == "Conv"} == {"sparse" if sparse else "dense"}
        tr = open_trainer(out)
        init = np.random.default_rng(2)
        params = {n: (0.3 * init.standard_normal(a.shape)).astype(np.float32) for n, a in tr.state.params.items()}
        tr.state.params.update(params)
        got = tr.session.run(None, tr.graph_feeds({"pixels": x, "labels": np.arange(8) % 4}))
        grads[sparse] = dict(zip(m.trainable_names, got[2:]))
    assert any(l.k > 1 for l in m.layers)
    for name, g in grads[False].items():
        np.testing.assert_allclose(grads[True][name], g, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("model", ["cnn", "strided"])
def test_scheduling_ties_survive_onnxruntimes_optimizer(tmp_path, cnn_onnx, model):
    """Each W' is built just before its layer runs, the layer's used columns are gathered in the
    forward and each ReLU6 mask is cast to float only when the backward reaches it
    (graph.Emitter.tie_after): the ties are data dependencies, so neither ORT-training's gradient
    builder nor a session's constant folding turns them into constants (a Shape-only tie was folded
    away: every W' was built at the start of the step and the MiniLM step kept 50 MB more)."""
    from taskedge.runtime.ort import onnxruntime as ort
    from taskedge.runtime.trainer import session_options
    size = 8 if model == "cnn" else 9
    path = cnn_onnx if model == "cnn" else _strided_cnn(tmp_path / "s.onnx")
    x = np.random.default_rng(0).standard_normal((8, 1, size, size)).astype(np.float32)
    np.savez(tmp_path / "c.npz", pixels=x)
    export_bundle(ExportConfig(model=str(path), out=str(tmp_path / "b"), calib=str(tmp_path / "c.npz"),
                               num_classes=4, budget=0.2), log=lambda s: None)
    so = session_options(1)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "b" / "step_model.onnx"), so, providers=["CPUExecutionProvider"])
    exported = onnx.load(str(tmp_path / "b" / "step_model.onnx"), load_external_data=False).graph
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    want_ties = len([n for n in exported.node if n.op_type in ("ScatterElements", "And")])
    assert want_ties and len(_ties(exported)) >= want_ties
    assert len(_ties(optimized)) == len(_ties(exported))
    if model == "strided":                  # every ReLU6 mask waits for the backward
        ties = {n.input[0] for n in _ties(optimized)}
        assert all(n.output[0] in ties for n in optimized.node if n.op_type == "And")


def _ties(g: onnx.GraphProto) -> list:
    """Reshapes whose shape reads another tensor's data (Concat <- Cast <- Slice): tie_after's form."""
    prod = {o: n for n in g.node for o in n.output}
    kind = lambda name: prod[name].op_type if name in prod else None
    return [n for n in g.node if n.op_type == "Reshape" and kind(n.input[1]) == "Concat"
            and any(kind(i) == "Cast" and kind(prod[i].input[0]) == "Slice" for i in prod[n.input[1]].input)]
