"""The CNN bench's PyTorch rows (engine "torch" of cnn_worker.py): the same bodies (cnn_nets.py),
head values and data order, trained in eager PyTorch with hand-written adapters that follow
cnn_peers.py's formulas (peft's LoRA/DoRA layers are not used: peft has no depthwise rank-r rule
to match ours). The optimizers are the step-graph rows' own numpy code (runtime.optim.AdamW,
galore.GaLoreAdamW) run on the parameters' memory, so only the graph differs.

Batch norm is folded into the convs before adapting, as the ONNX export folds it (fold_batch_norm):
with BN kept as a module, full FT trained the unfolded kernels and BN's affine values at the folded
graph's rate, and Adam's per-value step on an unfolded kernel moves the folded one gamma/sigma times
as far (MobileNetV2 new classes, one rate: torch full FT 0.391 vs 0.898 on the step graph). FLOPs are counted by torch.utils.flop_counter over one
forward + backward (its rule: 2 per multiply-accumulate of conv / matmul ops, as flops.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .cnn_peers import SCALE
from .cnn_worker import HostOptimizer
from .worker import load_npz


class LowRankWeight(nn.Module):
    """Parametrisation W -> W + SCALE * reshape(B @ A) (LoRA) or m * V / ||V|| (DoRA), rows = dim 0."""

    def __init__(self, w: torch.Tensor, rank: int, dora: bool, gen: torch.Generator):
        super().__init__()
        rows, cols = w.shape[0], w[0].numel()
        r = min(rank, rows, cols)
        self.A = nn.Parameter((torch.rand(r, cols, generator=gen) * 2 - 1) / cols ** 0.5)
        self.B = nn.Parameter(torch.zeros(rows, r))
        self.m = nn.Parameter(w.detach().reshape(rows, -1).norm(dim=1)) if dora else None

    def forward(self, w):
        v = w + SCALE * (self.B @ self.A).reshape(w.shape)
        if self.m is None:
            return v
        n = v.reshape(v.shape[0], -1).norm(dim=1)
        return v * (self.m / n).reshape(-1, *([1] * (w.dim() - 1)))


class ConvLoRA(nn.Module):
    """peft's activation path for a groups-1 conv: y = conv(x) + SCALE * B(A(x))."""

    def __init__(self, conv: nn.Conv2d, rank: int, gen: torch.Generator):
        super().__init__()
        cols = conv.weight[0].numel()
        self.conv = conv
        self.A = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                           bias=False)
        self.B = nn.Conv2d(rank, conv.out_channels, 1, bias=False)
        with torch.no_grad():
            self.A.weight.copy_((torch.rand(self.A.weight.shape, generator=gen) * 2 - 1) / cols ** 0.5)
            self.B.weight.zero_()

    def forward(self, x):
        return self.conv(x) + SCALE * self.B(self.A(x))


class LinearLoRA(nn.Module):
    def __init__(self, lin: nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.lin = lin
        self.A = nn.Parameter((torch.rand(rank, lin.in_features, generator=gen) * 2 - 1) / lin.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(lin.out_features, rank))

    def forward(self, x):
        return self.lin(x) + SCALE * (x @ self.A.t()) @ self.B.t()


def fold_batch_norm(body: nn.Module) -> None:
    """Every Conv2d directly followed by a BatchNorm2d in a Sequential becomes the folded conv (eval
    statistics) and the BN an Identity: the parametrisation of the exported graph."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for seq in [m for m in body.modules() if isinstance(m, nn.Sequential)]:
        kids = list(seq.named_children())
        for (name, conv), (bn_name, bn) in zip(kids, kids[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(seq, name, fuse_conv_bn_eval(conv, bn))
                setattr(seq, bn_name, nn.Identity())


def adapt(body: nn.Module, family: str, rank: int, seed: int, bundle=None) -> None:
    """Freeze the body and insert `family`'s trainable tensors (full: unfreeze everything)."""
    gen = torch.Generator().manual_seed(seed + 1)
    for p in body.parameters():
        p.requires_grad_(family in ("full", "galore"))
    if family == "taskedge":
        from .torch_engine import SparseDelta, map_allocation, weight_modules
        for _, m, idx, rows in map_allocation(weight_modules(body), Path(bundle)):
            parametrize.register_parametrization(m, "weight", SparseDelta(idx, tuple(m.weight.shape), rows))
        return
    if family not in ("lora", "dora"):
        return
    for parent in list(body.modules()):
        for name, m in list(parent.named_children()):
            dense = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
            if family == "lora" and dense:
                setattr(parent, name, (LinearLoRA if isinstance(m, nn.Linear) else ConvLoRA)(m, rank, gen))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                parametrize.register_parametrization(m, "weight", LowRankWeight(m.weight, rank, family == "dora", gen))


class TorchCNNEngine:
    def __init__(self, job: dict, lr: float):
        from importlib import import_module
        torch.set_num_threads(job["threads"])
        torch.manual_seed(job["seed"])
        module, fn = job["factory"].split(":")
        body = getattr(import_module(module), fn)()[0].eval()
        fold_batch_norm(body)
        adapt(body, job["family"], job["rank"] or 0, job["seed"], job.get("bundle"))
        h = load_npz(job["head_npz"])
        self.head = nn.Linear(h["weight"].shape[1], h["weight"].shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(h["weight"]))
            self.head.bias.copy_(torch.from_numpy(h["bias"]))
        self.body = body
        self.tensors = {f"body.{n}": p for n, p in body.named_parameters() if p.requires_grad}
        self.tensors.update({"head.weight": self.head.weight, "head.bias": self.head.bias})
        self.params = {n: p.data.numpy() for n, p in self.tensors.items()}       # the optimizer's views
        self.opt = HostOptimizer(self.params, ["head.weight", "head.bias"], job, lr)

    def forward(self, pixels):
        return self.head(self.body(pixels))

    def step(self, batch, scale: float) -> float:
        for p in self.tensors.values():
            p.grad = None
        loss = F.cross_entropy(self.forward(torch.from_numpy(batch[0])), torch.from_numpy(batch[1]))
        loss.backward()
        self.opt.step({n: p.grad.numpy() for n, p in self.tensors.items()}, scale)
        return float(loss.detach())

    def logits(self, pixels, labels):
        with torch.no_grad():
            return self.forward(torch.from_numpy(pixels)).numpy()

    def update(self) -> dict:
        return {n: a.copy() for n, a in self.params.items()}

    def flops(self, batch) -> dict:
        """One forward + backward and the forward alone, counted by torch.utils.flop_counter (with
        the grouped-conv weight gradient divided by the groups, see _conv_backward)."""
        from torch.utils.flop_counter import FlopCounterMode
        x, y = torch.from_numpy(batch[0]), torch.from_numpy(batch[1])
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            self.forward(x)
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward}) as both:
            F.cross_entropy(self.forward(x), y).backward()
        for p in self.tensors.values():
            p.grad = None
        return {"step": int(both.get_total_flops()), "forward": int(fwd.get_total_flops()),
                "counter": "torch.utils.flop_counter"}


def _conv_backward(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding,
                   groups, output_mask, out_shape=None, **kw) -> int:
    """torch's conv_backward_flop with the weight gradient of a grouped conv divided by the groups:
    torch counts it as a groups-1 conv (its docstring: "groups ... I skip those"), a depthwise
    layer's dW C times over (MobileNetV2 full FT: 16.0 GFLOP per step where the step graph's count
    is 2.35). Same terms otherwise: dX as the transposed conv, dW as a conv of x and dy."""
    from torch.utils.flop_counter import conv_flop_count
    t = lambda s: [s[1], s[0]] + list(s[2:])                # noqa: E731  (batch and channels swapped)
    total = conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed) if output_mask[0] else 0
    if output_mask[1]:
        if transposed:
            total += conv_flop_count(t(grad_out_shape), t(x_shape), t(out_shape[1]), transposed=False)
        else:
            total += conv_flop_count(t(x_shape), t(grad_out_shape), t(out_shape[1]), transposed=False) // groups
    return total
