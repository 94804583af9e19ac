"""Each lowering in export/lower.py against ORT's own training kernel (the host's onnxruntime-training
build registers them for inference sessions): same inputs, same outputs to float32 precision."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from taskedge.export.lower import LOWERINGS, lower, runs_on_plain_ort

R = np.random.default_rng(0)
MS = "com.microsoft"
F = np.float32


def rnd(*shape):
    return R.standard_normal(shape).astype(F)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return (e / e.sum(axis, keepdims=True)).astype(F)


def _model(op, domain, feeds, n_out, attrs, out_shapes=None, out_type=TensorProto.FLOAT, constants=()):
    vi = lambda n, a: helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
    inits = [onnx.numpy_helper.from_array(feeds[n], n) for n in constants]
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, list(feeds), outs, name=f"{op}_node", domain=domain, **attrs)
    outputs = [helper.make_tensor_value_info(o, out_type, out_shapes[i] if out_shapes else None)
               for i, o in enumerate(outs)]
    g = helper.make_graph([node], "g", [vi(n, a) for n, a in feeds.items() if n not in constants], outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8)


def _run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def check(op, feeds, n_out=1, domain=MS, out_shapes=None, rtol=1e-5, atol=1e-5, out_type=TensorProto.FLOAT,
          constants=(), **attrs):
    model = _model(op, domain, feeds, n_out, attrs, out_shapes, out_type, constants)
    feeds = {n: a for n, a in feeds.items() if n not in constants}
    want = _run(model, feeds)
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    counts = lower(lowered)
    assert counts == {op: 1}
    assert all(runs_on_plain_ort(n) for n in lowered.graph.node), [n.op_type for n in lowered.graph.node]
    got = _run(lowered, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    return got


TESTED = set()


def _t(op):
    TESTED.add(op)
    return op


def test_activations():
    x, dy = rnd(4, 8), rnd(4, 8)
    check(_t("GeluGrad"), {"dy": dy, "x": x})
    check(_t("FastGeluGrad"), {"dy": dy, "x": x})
    check(_t("BiasGeluGrad_dX"), {"dy": dy, "x": x, "b": rnd(8)})
    check(_t("BiasFastGeluGrad_dX"), {"dy": dy, "x": x, "b": rnd(8)})
    check(_t("QuickGeluGrad"), {"dy": dy, "x": x}, alpha=1.702)
    check(_t("ReluGrad"), {"dy": dy, "x": x})
    check(_t("LeakyReluGrad"), {"dy": dy, "y": x}, alpha=0.1)
    y = (1 / (1 + np.exp(-x))).astype(F)
    check(_t("SigmoidGrad"), {"dy": dy, "y": y})
    check(_t("TanhGrad"), {"dy": dy, "y": np.tanh(x).astype(F)})


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_family(axis):
    x, dy = rnd(2, 3, 5), rnd(2, 3, 5)
    check(_t("SoftmaxGrad_13"), {"dy": dy, "y": softmax(x, axis)}, axis=axis)
    check(_t("LogSoftmaxGrad_13"), {"dy": dy, "y": np.log(softmax(x, axis))}, axis=axis)
    # opset < 13 semantics: normalised over every axis from `axis` on
    flat = softmax(x.reshape(2, -1) if axis == 1 else x, -1).reshape(x.shape)
    check(_t("SoftmaxGrad"), {"dy": dy, "y": flat}, axis=axis)
    check(_t("LogSoftmaxGrad"), {"dy": dy, "y": np.log(flat)}, axis=axis)


@pytest.mark.parametrize("axis", [-1, 2])
def test_layer_norm_grads(axis):
    x, dy, scale = rnd(2, 3, 8), rnd(2, 3, 8), rnd(8)
    mean = x.mean(-1, keepdims=True)
    inv = (1 / np.sqrt(x.var(-1, keepdims=True) + 1e-5)).astype(F)
    check(_t("LayerNormalizationGrad"), {"dy": dy, "x": x, "s": scale, "m": mean, "i": inv}, n_out=3, axis=axis,
          epsilon=1e-5)
    rms = (1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)).astype(F)
    check(_t("SimplifiedLayerNormalizationGrad"), {"dy": dy, "x": x, "s": scale, "i": rms}, n_out=2, axis=axis,
          epsilon=1e-5)


@pytest.mark.parametrize("case", ["mean", "sum", "none", "weight", "ignore"])
def test_softmax_cross_entropy_grad(case):
    logits = rnd(6, 4)
    lp = np.log(softmax(logits)).astype(F)
    labels = np.array([0, 1, 2, 3, 2, 1], np.int64)
    feeds = {"dl": np.array(0.7 if case != "none" else R.standard_normal(6), F), "lp": lp, "t": labels}
    attrs = {"reduction": "mean" if case in ("mean", "weight", "ignore") else case}
    if case == "weight":
        feeds["w"] = np.array([0.5, 1.0, 2.0, 1.5], F)
    if case == "ignore":
        attrs["ignore_index"] = 2
    check(_t("SoftmaxCrossEntropyLossGrad"), feeds, **attrs)


def test_conv_grads():
    cases = [  # x shape, w shape, attrs
        ((2, 3, 8, 8), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1], strides=[1, 1])),
        ((2, 3, 8, 8), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 2])),
        ((2, 3, 7, 7), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 2])),
        ((2, 6, 9, 9), (6, 1, 3, 3), dict(pads=[1, 1, 1, 1], strides=[2, 2], group=6)),      # depthwise
        ((2, 4, 9, 9), (6, 2, 3, 3), dict(pads=[2, 2, 2, 2], dilations=[2, 2], group=2)),    # grouped, dilated
        ((2, 8, 5, 5), (16, 8, 1, 1), dict()),                                               # pointwise
    ]
    for xs, ws, attrs in cases:
        x, w = rnd(*xs), rnd(*ws)
        conv = helper.make_model(helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "c",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs), helper.make_tensor_value_info("w", TensorProto.FLOAT, ws)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)])
        y = _run(conv, {"x": x, "w": w})[0]
        full = dict(kernel_shape=list(ws[2:]), strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
        full.update(attrs)
        feeds = {"dy": rnd(*y.shape), "x": x, "w": w}
        check(_t("ConvGrad"), feeds, n_out=3, rtol=1e-4, atol=1e-4, **full)
        if full["group"] == ws[0] and ws[1] == 1:       # depthwise dW: Mul + ReduceSum per offset, no GEMM
            dense = _model("ConvGrad", MS, feeds, 3, full)
            lower(dense)
            assert not [n for n in dense.graph.node if n.op_type == "MatMul"]
        # a constant weight: dX as a plain Conv on the zero-upsampled dy (no dW asked, as in TaskEdge graphs)
        model = _model("ConvGrad", MS, feeds, 1, full, constants=("w",))
        lowered = onnx.ModelProto()
        lowered.CopyFrom(model)
        lower(lowered)
        convt = [n for n in lowered.graph.node if n.op_type == "ConvTranspose"]    # only the 1x1 zero-upsampling
        assert all(list(onnx.helper.get_attribute_value(a)) == [1, 1] for n in convt for a in n.attribute
                   if a.name == "kernel_shape"), convt
        assert len(convt) == (attrs.get("strides", [1, 1]) != [1, 1])
        live = {"dy": feeds["dy"], "x": x}
        np.testing.assert_allclose(_run(lowered, live)[0], _run(model, live)[0], rtol=1e-4, atol=1e-4)


def test_gather_scatter_slice():
    check(_t("GatherElementsGrad"), {"dy": rnd(3, 4), "shape": np.array([3, 5], np.int64),
                                     "i": np.array([[0, 1, 1, 4]] * 3, np.int64)}, axis=1)
    check(_t("GatherGrad"), {"shape": np.array([5, 3], np.int64), "i": np.array([[0, 2], [2, 4]], np.int64),
                             "dy": rnd(2, 2, 3)}, axis=0)
    check("GatherGrad", {"shape": np.array([2, 7], np.int64), "i": np.array([[0, 6], [3, 3], [1, -1]], np.int64),
                         "dy": rnd(2, 3, 2)}, axis=1)                     # LoRA's Gather(A, idx, axis=1)
    check(_t("SliceGrad"), {"dy": rnd(2, 3), "shape": np.array([4, 6], np.int64), "st": np.array([1, -4], np.int64),
                            "en": np.array([3, 5], np.int64), "ax": np.array([0, 1], np.int64)})
    check("SliceGrad", {"dy": rnd(2, 3), "shape": np.array([4, 6], np.int64), "st": np.array([1, -4], np.int64),
                        "en": np.array([3, 5], np.int64), "ax": np.array([0, 1], np.int64),
                        "steps": np.array([1, 1], np.int64)}, constants=("steps",))   # torch.onnx's explicit steps


def test_shape_and_misc():
    check(_t("Scale"), {"x": rnd(2, 3), "s": np.array([4.0], F)}, scale_down=1)
    check(_t("ConcatTraining"), {"a": rnd(2, 3), "b": rnd(2, 2)}, axis=1)
    check(_t("SplitTraining"), {"x": rnd(6, 2), "split": np.array([2, 4], np.int64)}, n_out=2, axis=0)
    check(_t("ReduceSumTraining"), {"x": rnd(2, 3, 4), "axes": np.array([0, 2], np.int64)}, keepdims=1)
    check(_t("BroadcastGradientArgs"), {"a": np.array([2, 1, 3], np.int64), "b": np.array([4, 3], np.int64)}, n_out=2,
          out_type=TensorProto.INT64)
    check(_t("DivGrad"), {"dy": rnd(2, 3), "a": rnd(2, 3), "b": rnd(3) + 3}, n_out=2)
    check(_t("DropoutGrad"), {"dy": rnd(4, 5), "mask": R.random((4, 5)) > 0.3, "ratio": np.array(0.3, F)})


def test_pool_and_batch_norm():
    x = rnd(2, 3, 6, 6)
    pool = helper.make_model(helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])], "p",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("i", TensorProto.INT64, None)]), opset_imports=[helper.make_opsetid("", 17)])
    y, idx = _run(pool, {"x": x})
    check(_t("MaxPoolGrad"), {"dy": rnd(*y.shape), "i": idx}, domain="", out_shapes=[list(x.shape)],
          kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    mean, inv = x.mean((0, 2, 3)), (1 / np.sqrt(x.var((0, 2, 3)) + 1e-5)).astype(F)
    check(_t("BatchNormalizationGrad"), {"dy": rnd(*x.shape), "x": x, "s": rnd(3), "m": mean.astype(F), "i": inv},
          n_out=3, rtol=1e-4, atol=1e-4, epsilon=1e-5)


def test_every_lowering_is_tested():
    """Runs last (file order): a lowering added without a numeric test fails here."""
    assert set(LOWERINGS) <= TESTED, sorted(set(LOWERINGS) - TESTED)
