"""AdamW on the trainable state (kilobytes: numpy is plenty).

The math and defaults are those of the optimizer ORT's `generate_artifacts` builds (onnxblock
`AdamW`: betas 0.9/0.999, eps 1e-6, weight decay 0, bias correction on, `adam_mode=1`, the
Hugging Face variant; kernel orttraining/training_ops/cpu/optimizer/adamw), so a run here follows
the ORT-training path step for step. The t-th update uses t (1-based) in the bias correction.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np


@dataclass
class AdamW:
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0

    def to_dict(self) -> dict:
        return {"name": "adamw", **asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, d: dict) -> "AdamW":
        d = d or {}
        if d.get("name", "adamw") != "adamw":
            raise ValueError(f"unknown optimizer {d.get('name')!r}")
        return cls(betas=tuple(d.get("betas", (0.9, 0.999))), eps=float(d.get("eps", 1e-6)),
                   weight_decay=float(d.get("weight_decay", 0.0)))

    def step(self, params: Dict[str, np.ndarray], grads: Dict[str, np.ndarray], m: Dict[str, np.ndarray],
             v: Dict[str, np.ndarray], t: int, lr: float) -> None:
        """One update in place; `t` is the 1-based number of this update."""
        b1, b2 = self.betas
        lr_c = np.float32(lr * np.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t))   # bias correction folded into lr
        f = np.float32
        for name, p in params.items():
            g = grads[name]
            m[name] = f(b1) * m[name] + f(1.0 - b1) * g
            v[name] = f(b2) * v[name] + f(1.0 - b2) * (g * g)
            p -= lr_c * m[name] / (np.sqrt(v[name]) + f(self.eps))
            if self.weight_decay:
                p -= f(lr * self.weight_decay) * p                        # decoupled, after the step
