"""Export configuration: one dataclass that round-trips to JSON (stored in the manifest)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ExportConfig:
    model: str                                  # .onnx path or package.module:factory
    out: str                                    # bundle folder
    calib: Optional[str] = None                 # .npz with arrays named after the model inputs
    calib_batches: int = 8
    batch_size: int = 32
    budget: float = 0.001                       # share of all weights that may be trained
    nm: Optional[str] = None                    # "2:4"
    lora_rank: Optional[int] = None
    include: List[str] = field(default_factory=list)
    exclude: List[str] = field(default_factory=list)
    num_classes: Optional[int] = None           # new dense head with this many classes
    output: Optional[str] = None                # the model output the head reads (default: the one [batch, F])
    pool: Optional[str] = None                  # mean | cls | max: pool a [batch, seq, F] / [batch, C, H, W] output
    head_only: bool = False                     # train only the new head (linear-probe baseline)
    formulation: dict = field(default_factory=dict)   # per op type: gather | scatter
    sparse_backward: bool = True                # export/backward.py; False keeps ORT's dense weight gradient
    ort_reference: Optional[str] = None         # also write ORT's own training artifacts here (same graph,
                                                # before lowering): the reference the step graph is checked on
    lr: float = 1e-3                            # stored as the default for the board
    seed: int = 0
