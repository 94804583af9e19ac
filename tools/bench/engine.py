"""The interface every bench engine implements (ort_engines.py: ORT-training, the step graph,
inference; torch_engine.py: PyTorch). worker.py drives an engine through it:

  trains             class attribute: False for the inference floor (no accuracy, no update)
  setup(spec, v)     static: what the engine imports before the worker's memory sampler starts
  input_names        the model inputs, in feed order (a batch is these + the labels, last)
  lrs                the base learning rate of each parameter group
  trainable          names of the trained tensors; get(name) a copy, size(name) its element count
  n_trainable        how many values train
  step(batch, lrs)   one timed training step at these learning rates -> loss (None: no loss)
  eval_step(batch)   -> (loss, logits), close_eval(): the runtime Trainer's eval interface, so
                     the runtime's accuracy loop (adapt.accuracy) runs on any engine
  update()           the trained tensors as the model uses them (what the update file holds)
  extra()            engine-specific fields of the result record
  close()            release the sessions (writes an ORT profile, if one was asked for)
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from taskedge.runtime.bundle import LABELS_INPUT


def inputs_of(names: List[str], what: str) -> List[str]:
    """The model inputs of a graph's feed names, which must end with the labels."""
    if not names or names[-1] != LABELS_INPUT:
        raise RuntimeError(f"{what}: expected the inputs followed by {LABELS_INPUT!r}, got {names}")
    return names[:-1]


class Engine:
    """Defaults shared by every engine."""
    trains = True
    input_names: List[str] = []
    lrs: List[float] = []
    trainable: List[str] = []
    n_trainable = 0

    @staticmethod
    def setup(spec: dict, v: dict) -> None:
        """What this engine imports before the memory sampler starts."""
        import taskedge.runtime.ort  # noqa: F401  (onnxruntime with the torch probe blocked)

    def get(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def size(self, name: str) -> int:
        return int(self.get(name).size)

    def eval_step(self, batch: Sequence[np.ndarray]):
        raise NotImplementedError(f"{type(self).__name__} has no eval graph")

    def close_eval(self) -> None:
        pass

    def update(self) -> Dict[str, np.ndarray]:
        return {n: self.get(n) for n in self.trainable}

    def extra(self) -> dict:
        return {}

    def close(self) -> None:
        pass
