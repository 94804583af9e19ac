"""The two adaptation scenarios of the CNN bench, after "From LLMs to Edge" (arXiv 2507.23536),
on scikit-learn's 8x8 digits upsampled to the model's input side (nothing downloaded):

- `shift` (distribution shift, same classes): the deployed model is the pretrained body + a
  10-class head fitted on CLEAN digits (logistic regression on the frozen features, half of the
  digits); it adapts to the other half, rotated 15-35 degrees, low-contrast and noisy
  (demo_data._shift, a transform neither the body's pretraining nor the head ever saw). Every
  variant starts from that fitted head.
- `new-classes` (unseen classes, new head): digits 5-9 (relabelled 0-4), clean, with a new
  5-class head initialised as export.head.add_head does (the same values in every variant).

Each adaptation set is split 60 / 15 / 25 (stratified): train, val (picks the learning rate of
the sweep) and test (the reported accuracy).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

SCENARIOS = ("shift", "new-classes")
# the CNNs (bench/cnn_nets.py): factory, input side, depthwise-separable?, title
CNNS = {
    "mobilenet_v2": dict(factory="taskedge.tools.bench.cnn_nets:mobilenet_v2", size=64, depthwise=True,
                         title="ImageNet MobileNetV2 (depthwise-separable), 64x64"),
    "onet": dict(factory="taskedge.tools.bench.cnn_nets:onet", size=48, depthwise=False,
                 title="MTCNN O-Net (standard convs, face-pretrained), 48x48"),
}
CLASSES = {"shift": 10, "new-classes": 5}
SPLIT_SEED = 0


def _split3(n_labels: np.ndarray, seed: int):
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(n_labels))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=n_labels, random_state=seed)
    va, te = train_test_split(rest, test_size=0.625, stratify=n_labels[rest], random_state=seed)
    return tr, va, te


def scenario_data(scenario: str, model: str, size: int, seed: int = 0, limit: Optional[int] = None) -> dict:
    """{train, val, test: {pixels, labels}} and, for `shift`, `prefit: {pixels, labels}` (clean)."""
    from sklearn.model_selection import train_test_split
    from taskedge.tools import demo_data as D
    from .cnn_nets import normalise

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: use {', '.join(SCENARIOS)}")
    x, y = D._digits()
    rng = np.random.default_rng(seed)
    out = {}
    if scenario == "shift":
        pre, adapt = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=SPLIT_SEED)
        out["prefit"] = {"pixels": normalise(D._resize(x[pre], size), model), "labels": y[pre]}
        grey, labels = D._shift(D._resize(x[adapt], size), rng), y[adapt]
    else:
        high = np.flatnonzero(y >= 5)
        grey, labels = D._resize(x[high], size), y[high] - 5
    pixels = normalise(grey, model)
    for part, idx in zip(("train", "val", "test"), _split3(labels, SPLIT_SEED)):
        idx = idx[:limit] if limit else idx
        out[part] = {"pixels": pixels[idx], "labels": labels[idx].astype(np.int64)}
    return out


def prefit_head(features: np.ndarray, labels: np.ndarray, classes: int) -> Dict[str, np.ndarray]:
    """The deployed head of the `shift` scenario: multinomial logistic regression on frozen
    features (scikit-learn, lbfgs, C=1) -> {weight [classes, F], bias [classes]} float32."""
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(max_iter=500, C=1.0).fit(features, labels)
    w = np.zeros((classes, features.shape[1]), np.float32)
    b = np.zeros(classes, np.float32)
    w[clf.classes_] = clf.coef_
    b[clf.classes_] = clf.intercept_
    return {"weight": w, "bias": b, "train_accuracy": float(clf.score(features, labels))}
