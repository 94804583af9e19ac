"""Export configuration: one dataclass whose fields are also `taskedge export`'s flags
(runtime/flags.py builds the parser from them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from taskedge.runtime.flags import FRACTION, POSITIVE, at_least, flag


def _op_forms(items: List[str]) -> Dict[str, str]:
    return dict(item.partition("=")[::2] for item in items)


@dataclass
class ExportConfig:
    model: str = flag(help="an .onnx file, package.module:factory returning (module, example[, meta]), or "
                           "hf:FOLDER (a Hugging Face checkpoint folder: config.json + safetensors; needs "
                           "transformers; a ...ForCausalLM config or --gguf: next-token training on prompt/answer "
                           "data)", positional=True)
    out: str = flag(help="bundle folder to write (replaced atomically)")
    gguf: Optional[str] = flag(None, "a GGUF file in the hf:FOLDER to load (a causal LM, de-quantised to float32; "
                                     "needs the gguf package)")
    calib: Optional[str] = flag(None, ".npz with arrays named after the model inputs (target-task data)")
    calib_batches: int = flag(8, "calibration batches", check=at_least(1))
    batch_size: int = flag(32, "calibration batch size", check=at_least(1))
    budget: float = flag(0.001, "share of the model's weights to train (0.001 = 0.1 %; below one input per "
                                "neuron, that share of every layer's neurons trains one input each)", check=FRACTION)
    min_entries: int = flag(1024, "a budget below one input per neuron is raised to it, up to this many entries "
                                  "(small models: 0.1 % of 12k weights is 12 entries; 0 keeps the share as given)",
                            check=at_least(0))
    selection: str = flag("taskedge", "how each neuron's inputs are ranked: taskedge |W|*||X||, magnitude |W|, "
                                      "activation ||X||, random, or gradient (GPS: sum |dL/dW| on the calibration "
                                      "data, which needs its labels)",
                          choices=["taskedge", "magnitude", "activation", "random", "gradient"])
    nm: Optional[str] = flag(None, "N:M structure for the update, e.g. 2:4")
    lora_rank: Optional[int] = flag(None, "sparse LoRA: update = (B@A) masked, rank R", check=at_least(1))
    include: List[str] = flag(help="glob on layer/weight names to select (repeatable)", default_factory=list)
    exclude: List[str] = flag(help="glob on layer/weight names to skip (repeatable)", default_factory=list)
    num_classes: Optional[int] = flag(None, "replace/add a dense classification head with C classes",
                                      check=at_least(2))
    output: Optional[str] = flag(None, "the model output the head reads (default: its one float [batch, F] output)")
    pool: Optional[str] = flag(None, "pool a [batch, seq, F] or [batch, C, H, W] output to [batch, F] "
                                     "(mean and max honour an attention_mask input)", choices=["mean", "cls", "max"])
    head_only: bool = flag(False, "train only the new head (linear-probe baseline)")
    union_of: List[str] = flag(help="a stored task's bundle/task folder or pack (repeatable): the allocation holds "
                                    "every entry of theirs, topped up with this task's best, so `adapt --task NEW "
                                    "--init gates` can mix their deltas (export/compose.py)", default_factory=list,
                               metavar="TASK")
    formulation: Dict[str, str] = flag(help="update formulation per op type, e.g. MatMul=gather, Conv=scatter",
                                       metavar="OP=FORM", default_factory=dict, parse=_op_forms)
    dense_backward: bool = flag(False, "keep ORT's dense weight gradient for scatter layers (slower; for comparison)")
    built_weights: bool = flag(False, "build W' = W + delta inside the step graph (twice a step) instead of reading "
                                      "it as an input the runtime keeps (export/live.py); for execution providers "
                                      "that copy graph inputs to a device each run")
    ort_reference: Optional[str] = None         # also write ORT's own training artifacts here (same graph,
                                                # before lowering): the reference the step graph is checked on
    lr: Optional[float] = flag(None, "learning rate stored in the bundle for adapt (default: none -- adapt then "
                                     "picks one by short trials on held-out training data)", check=POSITIVE)
    seed: int = flag(0, "seed of the new head, LoRA factors and --selection random", check=at_least(0))
