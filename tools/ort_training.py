"""ONNX Runtime's training API (onnxruntime-training, host only): the benchmark's ORT-training
peers (full fine-tuning, LoRA, the floor) and the reference the standard-ONNX step graph is
checked against. The board never uses it (runtime/trainer.py runs plain onnxruntime).

`onnxruntime.training.api` imports torch when torch is installed, so this adapter uses the
pybind layer directly, exactly as ORT's own thin wrappers (Module, Optimizer,
CheckpointState) do.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import taskedge.runtime.ort  # noqa: F401,I001  (onnxruntime first, without its torch probe)
from onnxruntime.capi import _pybind_state as C
from onnxruntime.capi.onnxruntime_inference_collection import OrtValue, get_ort_device_type

from taskedge.runtime.fsutil import atomic_path

# The files of ORT's training artifacts (export.exporter.generate_ort_artifacts)
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"


def has_training_api() -> bool:
    return hasattr(C, "Module") and hasattr(C, "load_checkpoint")


def _device(device: str = "cpu"):
    kind, _, idx = device.partition(":")
    i = int(idx or 0)
    return C.OrtDevice(get_ort_device_type(kind, i), C.OrtDevice.default_memory(), i)


def _session_options(threads: int = 0):
    so = C.SessionOptions()
    # ORT's buffer reuse raises the training peak: MiniLM batch 16 train step 337 -> 314 MB
    # (ORT full FT 605 -> 568, LoRA 388 -> 319), batch 64 819 -> 741 MB, step time unchanged.
    so.enable_mem_reuse = False
    if threads:
        so.intra_op_num_threads = threads
    return so


class Checkpoint:
    """Parameters (trainable and frozen) and optimizer state, as ORT keeps them."""

    def __init__(self, path):
        self.state = C.load_checkpoint(os.fspath(path))
        self.bound = False      # set by Trainer: ORT 1.19 segfaults on copy_parameter_from before that

    def names(self) -> List[str]:
        return list(self.state.parameter_names())

    def get(self, name: str) -> np.ndarray:
        return self.state.get_parameter(name).data.numpy().copy()

    def requires_grad(self, name: str) -> bool:
        return bool(self.state.get_parameter(name).requires_grad)

    def set(self, name: str, value: np.ndarray) -> None:
        if not self.bound:
            raise RuntimeError("Checkpoint.set before a Trainer exists on this checkpoint (ORT would crash): "
                               "create the Trainer first")
        self.state.copy_parameter_from(name, OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))._ortvalue)

    def save(self, path, include_optimizer_state: bool = True) -> None:
        """Atomic: written to a temp name, fsynced, renamed."""
        with atomic_path(path) as tmp:
            C.save_checkpoint(self.state, os.fspath(tmp), include_optimizer_state)


class Trainer:
    """Training module + optimizer over one checkpoint (ORT's Module/Optimizer)."""

    def __init__(self, training_model, eval_model, optimizer_model, checkpoint: Checkpoint,
                 device: str = "cpu", threads: int = 0, profile_prefix: Optional[str] = None):
        """`profile_prefix`: ORT's profiler on the training session; it writes PREFIX*.json
        when the module is released."""
        dev = _device(device)
        self.checkpoint = checkpoint
        checkpoint.bound = True
        so = _session_options(threads)
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        self.module = C.Module(os.fspath(training_model), checkpoint.state, os.fspath(eval_model), dev, so)
        self.optimizer = C.Optimizer(os.fspath(optimizer_model), checkpoint.state, dev, _session_options(threads))

    @staticmethod
    def _run(fn, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        out = C.OrtValueVector()
        fn([np.ascontiguousarray(x) for x in inputs], out)
        return [out[i].numpy() for i in range(len(out))]

    def train_step(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Forward + backward; gradients accumulate until `optimizer_step`."""
        return self._run(self.module.train_step, inputs)

    def eval_step(self, inputs: Sequence[np.ndarray]) -> List[np.ndarray]:
        return self._run(self.module.eval_step, inputs)

    def optimizer_step(self) -> None:
        self.optimizer.optimizer_step()
        self.module.lazy_reset_grad()

    @property
    def lr(self) -> float:
        return float(self.optimizer.get_learning_rate())

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer.set_learning_rate(float(value))

    def input_names(self, training: bool = True) -> List[str]:
        return list(self.module.input_names(training))

    def trainable_size(self) -> int:
        return int(self.module.get_parameters_size(True))



def open_artifacts(folder, threads: int = 0, profile_prefix: Optional[str] = None):
    """(Checkpoint, Trainer) over the ORT training artifacts in `folder`."""
    folder = Path(folder)
    ck = Checkpoint(folder / CHECKPOINT)
    return ck, Trainer(folder / TRAINING_MODEL, folder / EVAL_MODEL, folder / OPTIMIZER_MODEL, ck,
                       threads=threads, profile_prefix=profile_prefix)
