"""The bench's PyTorch engine: the same pretrained body and new head in torch, trained as full
FT, peft LoRA, or TaskEdge's delta (W + scatter_add(delta) at the bundle's allocation indices).
Implements engine.py's interface; only torch-* workers import this file."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .engine import Engine
from .worker import load_npz
from .variants import LR


def torch_model(spec: dict) -> nn.Module:
    """The demo model's body + the bench's new head (the same init as the ONNX graphs' head)."""
    from taskedge.tools import demo_models

    body, _, _ = getattr(demo_models, spec["factory"].split(":")[1])()
    head_np = load_npz(spec["head"])
    w, b = head_np["taskedge_head.weight"], head_np["taskedge_head.bias"]
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    vision = spec["model"] == "vision"

    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = body, head

        def forward(self, *xs):
            f = self.body.embed(*xs) if vision else self.body(*xs)
            return self.head(f)

    return WithHead()


def weight_modules(body):
    """Linear / Conv2d modules of the body in definition (= forward) order; vision: features only."""
    root = body.features if hasattr(body, "features") else body
    prefix = "features." if hasattr(body, "features") else ""
    return [(prefix + n, m) for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def map_allocation(mods, bundle: Path) -> list:
    """Pair each allocated ONNX weight with its torch module: exact value match (W or W^T), else
    the next unmatched module of the same rows x cols in forward order (BN-folded convs).
    Returns (name, module, indices [rows, k], the rows that train or None for all)."""
    import onnx
    from onnx import numpy_helper
    from taskedge.runtime import bundle as B

    man = B.load_bundle(bundle)
    alloc = load_npz(bundle / B.ALLOCATION)
    inits = {t.name: t for t in onnx.load(str(bundle / B.BASE_MODEL)).graph.initializer}
    rows_view = [(n, m, m.weight.detach().reshape(m.weight.shape[0], -1).numpy()) for n, m in mods]
    used, pairs = set(), []
    for layer in man.layers:
        w = numpy_helper.to_array(inits[layer.weight])
        wr = layer.rows_view(w)
        hit = next((i for i, (_, _, r) in enumerate(rows_view) if i not in used and r.shape == wr.shape
                    and np.array_equal(r, wr)), None)
        if hit is None:
            hit = next((i for i, (_, _, r) in enumerate(rows_view) if i not in used and r.shape == wr.shape), None)
        if hit is None:
            raise RuntimeError(f"no torch module matches {layer.weight} {wr.shape}")
        used.add(hit)
        pairs.append((rows_view[hit][0], rows_view[hit][1], alloc[layer.weight], layer.trained_rows))
    return pairs


class SparseDelta(nn.Module):
    """W -> W + scatter_add(delta) at each training row's allocated columns (a weight
    parametrisation). `rows`: the rows that train (a budget below one entry per neuron, as the
    bundle's `trained_rows`); None: every row."""

    def __init__(self, idx, shape, rows=None):
        super().__init__()
        rows = np.arange(idx.shape[0]) if rows is None else np.asarray(rows, np.int64)
        flat = rows[:, None] * int(np.prod(shape[1:])) + idx[rows].astype(np.int64)    # into W's rows view
        self.register_buffer("flat", torch.from_numpy(flat.reshape(-1)))
        self.delta = nn.Parameter(torch.zeros((len(rows), idx.shape[1]), dtype=torch.float32))
        self.shape = shape

    def forward(self, w):
        return w.reshape(-1).scatter_add(0, self.flat, self.delta.reshape(-1)).reshape(self.shape)


class TorchEngine(Engine):
    """PyTorch: AdamW (betas 0.9/0.999, eps 1e-6, no decay) with the body and the head as two
    parameter groups; trainable names are those of the update file (TaskEdge: delta0..)."""

    @staticmethod
    def setup(spec: dict, v: dict) -> None:
        torch.set_num_threads(spec["threads"])
        torch.set_num_interop_threads(1)
        torch.manual_seed(spec["seed"])
        if v["family"] == "lora":
            import peft  # noqa: F401  (peft imports transformers; part of what this baseline costs)

    def __init__(self, spec: dict, v: dict, profile_prefix: Optional[str]):
        from torch.nn.utils import parametrize

        model = self.model = torch_model(spec)
        model.eval()                       # same graph as the ONNX export: BN running stats, no dropout
        fam = v["family"]
        if fam == "full":
            body = dict(model.body.named_parameters())
        elif fam == "lora":
            from peft import LoraConfig, inject_adapter_in_model
            targets = [n for n, m in weight_modules(model.body) if isinstance(m, nn.Linear) or m.groups == 1]
            cfg = LoraConfig(r=v["options"]["rank"], lora_alpha=v["options"]["alpha"], lora_dropout=0.0,
                             target_modules=targets, bias="none")
            inject_adapter_in_model(cfg, model.body)
            for n, p in model.body.named_parameters():
                p.requires_grad_("lora_" in n)
            body = {n: p for n, p in model.body.named_parameters() if "lora_" in n}
        else:
            for p in model.body.parameters():
                p.requires_grad_(False)
            body = {}
            for _, m, idx, rows in map_allocation(weight_modules(model.body), Path(v["bundle"])):
                parametrize.register_parametrization(m, "weight", SparseDelta(idx, tuple(m.weight.shape), rows))
                m.parametrizations.weight.original.requires_grad_(False)
                body[f"delta{len(body)}"] = m.parametrizations.weight[0].delta
        self.params = {**body, "head.weight": model.head.weight, "head.bias": model.head.bias}
        self.lrs = [v["lr"], LR["head"]]
        self.opt = torch.optim.AdamW([{"params": list(body.values()), "lr": self.lrs[0]},
                                      {"params": list(model.head.parameters()), "lr": self.lrs[1]}],
                                     betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
        self.input_names = list(spec["input_names"])
        self.trainable = list(self.params)
        self.n_trainable = sum(p.numel() for p in self.params.values())

    def step(self, batch, lrs) -> float:
        *xs, y = [torch.from_numpy(a) for a in batch]
        for g, lr in zip(self.opt.param_groups, lrs):
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(*xs), y)
        loss.backward()
        self.opt.step()
        return float(loss)

    def eval_step(self, batch):
        with torch.no_grad():
            logits = self.model(*[torch.from_numpy(a) for a in batch[:-1]])
        return None, logits.numpy()

    def get(self, name: str) -> np.ndarray:
        return self.params[name].detach().numpy().copy()

    def size(self, name: str) -> int:
        return self.params[name].numel()
