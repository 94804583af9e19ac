"""`taskedge bench`: TaskEdge against the usual ways to fine-tune, in one sitting.

Same pretrained model (default all-MiniLM-L6-v2 -> Rotten Tomatoes; `--model vision` =
ImageNet MobileNetV2 -> digits), same base ONNX graph, same new head init, same data order,
batch, step count, CPU execution provider and thread count (2). Every variant runs in its own
fresh subprocess (`python -m taskedge.tools.bench --worker NAME --spec spec.json`, one JSON line);
ORT workers never import torch.

Variants
  infer               plain onnxruntime forward pass of the base model (the floor)
  ort-full            ORT training, full fine-tuning (every float initializer + head)
  ort-lora8           ORT training, LoRA r=8 (alpha 16) on every MatMul/Gemm weight op + head
  ort-floor           ORT training with no weight gradient: a zero bias under the first adapted
                      layer + head; forward + backward-to-inputs, ORT's floor for any method
                      that adapts every layer
  taskedge-0.1%       TaskEdge bundle: its standard-ONNX step graph on plain onnxruntime with the
                      runtime's Trainer (as on the board), budget 0.1 %   (the primary variant)
  taskedge-1%         budget 1 %
  taskedge-0.1%-2:4   budget 0.1 %, --nm 2:4
  taskedge-1%-2:4     budget 1 %, --nm 2:4
  taskedge-slora4     budget 0.1 %, sparse LoRA r=4
  torch-full          PyTorch full fine-tuning
  torch-lora8         PyTorch + peft LoRA r=8 (alpha 16), same layers
  torch-taskedge-0.1% PyTorch, W + scatter_add(delta) at the bundle's allocation indices

Learning rates (cosine decay after a linear warm-up, as adapt runs; AdamW betas 0.9/0.999,
eps 1e-6, no weight decay = what ORT's generated AdamW does, and the runtime's): TaskEdge 1e-2
(delta and head share one lr), LoRA 2e-3, full FT 1e-4; the new head 1e-2 everywhere (ORT
baselines: head reparametrised as s * W', see export/baselines.py; torch: a parameter group).
"""
# The files, in the order a run uses them:
#   variants.py      the registry: models, variants, learning rates, run sizes
#   build.py         data, base ONNX, bundles and baseline artifacts -> spec.json (host: torch, onnx)
#   run.py           run_bench: one subprocess per variant, timing rounds, profiles, the report dict
#   worker.py        one variant in one process: timed steps, accuracy, update size, peak memory
#   engine.py        the engine interface the worker drives
#   ort_engines.py   ORT-training, the step graph on plain onnxruntime, inference (never torch)
#   torch_engine.py  PyTorch full FT / peft LoRA / TaskEdge delta
#   targets.py       ratios between variants, the targets met or missed
#   report.py        bench.json, bench.md, bench.png
#   cli.py           `taskedge bench` and `python -m taskedge.tools.bench` (__main__.py)
#   ablation.py      --selection-ablation: each --selection rule exported and adapted at the same budget,
#                    steps and lr trials over seeds (issue 19); ablation_report.py its .md/.png/.json,
#                    ablation_cli.py its flags
# Importing the package loads neither torch nor onnxruntime.
from __future__ import annotations

from .cli import main, register
from .run import run_bench
from .targets import TARGETS
from .variants import VARIANTS

__all__ = ["TARGETS", "VARIANTS", "main", "register", "run_bench"]
