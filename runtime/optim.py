"""AdamW on the trainable state (kilobytes: numpy is plenty).

The math is that of ONNX Runtime's `AdamWOptimizer` kernel as `generate_artifacts` configures
it (onnxblock `AdamW`: betas 0.9/0.999, eps 1e-8, weight decay 0.01, bias correction on,
adam_mode 0 = PyTorch's AdamW), so a run here follows the ORT-training path step for step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np


@dataclass
class AdamW:
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def to_dict(self) -> dict:
        return {"name": "adamw", **asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, d: dict) -> "AdamW":
        if d and d.get("name", "adamw") != "adamw":
            raise ValueError(f"unknown optimizer {d.get('name')!r}")
        return cls(betas=tuple(d.get("betas", (0.9, 0.999))), eps=float(d.get("eps", 1e-8)),
                   weight_decay=float(d.get("weight_decay", 1e-2)))

    def step(self, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray], m: Dict[str, np.ndarray],
             v: Dict[str, np.ndarray], t: int, lr: float) -> None:
        """One update in place; `t` is the 1-based number of this update."""
        b1, b2 = self.betas
        c1 = 1.0 - b1 ** t
        c2 = 1.0 - b2 ** t
        for name, p in params.items():
            g = grads[name]
            p *= np.float32(1.0 - lr * self.weight_decay)        # decoupled weight decay, before the step
            m[name] = np.float32(b1) * m[name] + np.float32(1.0 - b1) * g
            v[name] = np.float32(b2) * v[name] + np.float32(1.0 - b2) * (g * g)
            denom = np.sqrt(v[name]) / np.float32(np.sqrt(c2)) + np.float32(self.eps)
            p -= np.float32(lr / c1) * m[name] / denom
