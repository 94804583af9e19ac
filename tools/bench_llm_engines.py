"""The causal-LM bench's engines (tools/bench_llm.py runs each in its own process): TaskEdge's step
graph on plain onnxruntime, ORT-training's own API (LoRA r=8, full fine-tuning) and PyTorch (+ peft
LoRA r=8, full fine-tuning) on the same model, the same batches and the same schedule.

Each engine has `step(batch, lr) -> loss`, `answer_logits(batch) -> [K, V]` (the logits at the
labelled positions, runtime/lm.py's metrics read them), `trainable` and `update_bytes` (float32
bytes of what the run trained: TaskEdge's selected entries, LoRA's A/B factors, every weight).

ORT-training's artifacts are built from the bundle's own forward graph (base_model.onnx): LoRA
with export/baselines.py's rewrite on every MatMul/Gemm but the embedding and the tied head (the
210 projections TaskEdge adapts), full fine-tuning on every float weight (the embedding too, as
PyTorch's full FT); both with the bundle's answer-only head and sequence loss
(export/causal_lm.py). `build` runs in a process of its own: the builder's peak is not the step's.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import List

import numpy as np

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ORT_KINDS = {"ort-lora-r8": "lora", "ort-full": "full"}


def build(bundle: Path, kind: str, out: Path) -> dict:
    """ORT-training artifacts (training/eval/optimizer model, checkpoint) for `kind` (lora | full)."""
    import onnx
    from taskedge.export.artifacts import generate_ort_artifacts, prepare_for_training
    from taskedge.export.baselines import add_lora, full_ft_trainable
    from taskedge.export.causal_lm import HEAD, answer_head, sequence_loss
    from taskedge.runtime import bundle as B
    t = time.perf_counter()
    man = B.load_bundle(bundle, verify=False)
    model = onnx.load(str(bundle / B.BASE_MODEL))            # weights from weights.bin (external data)
    if kind == "lora":
        frozen = {n.input[0 if n.op_type == "Gather" else 1] for n in model.graph.node
                  if n.op_type == "Gather" or n.name == HEAD + "/logits2d"}          # the embedding, the tied head
        table = add_lora(model, 8, 16.0, seed=0, exclude=frozen, conv=False)
        trainable = sorted(p for row in table for p in row["params"])
    else:
        trainable = full_ft_trainable(model)
    loss = sequence_loss(answer_head(model))
    prepare_for_training(model)
    out.mkdir(parents=True, exist_ok=True)
    generate_ort_artifacts(model, trainable, out, loss, [man.logits])
    n = int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name in set(trainable)))
    return {"kind": kind, "trainable": n, "tensors": len(trainable), "build_seconds": round(time.perf_counter() - t, 1)}


class TaskEdge:
    def __init__(self, bundle: Path, threads: int):
        from taskedge.runtime import bundle as B
        from taskedge.runtime.trainer import Trainer, TrainState
        man = B.load_bundle(bundle)
        self.tr = Trainer(bundle, man, TrainState.initial(bundle, man), threads=threads)
        self.trainable = int(man.update_params)
        self.update_bytes = int(sum(a.nbytes for a in self.tr.state.params.values()))

    def step(self, batch, lr: float) -> float:
        loss = self.tr.train_step(batch)[0]
        self.tr.lr = lr
        self.tr.optimizer_step()
        return loss

    def answer_logits(self, batch) -> np.ndarray:
        return self.tr.eval_step(batch)[1]


class OrtTraining:
    def __init__(self, artifacts: Path, threads: int):
        from taskedge.tools.ort_training import open_artifacts
        self.ck, self.tr = open_artifacts(artifacts, threads)
        self.names = self.tr.input_names(True)
        self.trainable = self.tr.trainable_size()
        self.update_bytes = 4 * self.trainable

    def _feeds(self, batch) -> List[np.ndarray]:
        by_name = dict(zip(("input_ids", "attention_mask", "labels"), batch))
        return [by_name[n] for n in self.names]

    def step(self, batch, lr: float) -> float:
        loss = float(self.tr.train_step(self._feeds(batch))[0])
        self.tr.lr = lr
        self.tr.optimizer_step()
        return loss

    def answer_logits(self, batch) -> np.ndarray:
        return self.tr.eval_step(self._feeds(batch))[-1]


class Torch:
    def __init__(self, folder: str, threads: int, lora: bool):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        if lora:
            from peft import LoraConfig, get_peft_model
            self.model = get_peft_model(self.model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = int(sum(p.numel() for p in params))
        self.update_bytes = 4 * self.trainable
        self.opt = self.torch.optim.AdamW(params, lr=0.0)

    def _logits(self, batch):
        ids, mask, _ = (self.torch.from_numpy(np.ascontiguousarray(a)) for a in batch)
        return self.model(input_ids=ids, attention_mask=mask).logits

    def step(self, batch, lr: float) -> float:
        self.model.train()
        logits = self._logits(batch)
        labels = self.torch.from_numpy(np.ascontiguousarray(batch[2]))
        loss = self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                      ignore_index=-100)
        loss.backward()
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)

    def answer_logits(self, batch) -> np.ndarray:
        from taskedge.runtime.lm import at_labels
        self.model.eval()
        with self.torch.no_grad():
            return at_labels(self._logits(batch).numpy(), batch[2])


def make(engine: str, bundle: Path, folder: str, work: Path, threads: int):
    if engine == "taskedge":
        return TaskEdge(bundle, threads)
    if engine in ORT_KINDS:
        return OrtTraining(work / engine, threads)
    return Torch(folder, threads, lora=engine == "torch-lora-r8")
