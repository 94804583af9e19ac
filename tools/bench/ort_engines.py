"""The bench's onnxruntime engines (engine.py's interface), one per way of running a variant
without torch: ORT-training artifacts (the dense peers), the TaskEdge bundle's step graph on plain
onnxruntime (as on the board), and the plain inference forward (the floor).

onnxruntime is imported the runtime's way (taskedge.runtime.ort, see Engine.setup), never bare:
a bare import on the host pulls in torch through ORT-training's probe, which would distort the
memory numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .engine import Engine, inputs_of


class OrtTrainingEngine(Engine):
    """The ORT-training peers (full FT, LoRA, floor): ORT's training artifacts, host only."""

    def __init__(self, spec: dict, v: dict, profile_prefix: Optional[str]):
        from taskedge.tools.ort_training import open_artifacts
        self.ck, self.trainer = open_artifacts(Path(v["artifacts"]), spec["threads"], profile_prefix)
        self.input_names = inputs_of(self.trainer.input_names(True), v["artifacts"])
        if self.trainer.input_names(False) != self.trainer.input_names(True):
            raise RuntimeError(f"{v['artifacts']}: the eval graph's inputs differ from the training graph's")
        self.lrs = [v["lr"]]                # one AdamW lr; the head's own lr is its s * W' scale
        self.head_lr_scale = v.get("head_lr_scale", 1.0)
        self.trainable = [n for n in self.ck.names() if self.ck.requires_grad(n)]
        self.n_trainable = self.trainer.trainable_size()

    def step(self, batch, lrs) -> float:
        loss = float(self.trainer.train_step(batch)[0])
        self.trainer.lr = lrs[0]
        self.trainer.optimizer_step()
        return loss

    def eval_step(self, batch):
        out = self.trainer.eval_step(batch)
        return float(out[0]), out[-1]

    def get(self, name: str) -> np.ndarray:
        return self.ck.get(name)

    def update(self) -> Dict[str, np.ndarray]:
        from taskedge.export.baselines import unscale_update
        arrays = super().update()
        return unscale_update(arrays, self.head_lr_scale) if self.head_lr_scale != 1.0 else arrays

    def close(self) -> None:
        del self.trainer.optimizer, self.trainer.module     # writes the profile, if one was asked for
        self.trainer = None


class StepEngine(Engine):
    """TaskEdge as the board runs it: the bundle's standard-ONNX step graph on plain onnxruntime,
    driven by the runtime's Trainer."""

    def __init__(self, spec: dict, v: dict, profile_prefix: Optional[str]):
        from taskedge.runtime import bundle as B
        from taskedge.runtime.trainer import Trainer, TrainState
        folder = Path(v["artifacts"])
        man = B.load_bundle(folder)
        self.trainer = Trainer(folder, man, TrainState.initial(folder, man), threads=spec["threads"],
                               profile_prefix=profile_prefix)
        self.input_names = inputs_of(self.trainer.data_names, v["artifacts"])
        self.lrs = [v["lr"]]                # delta and head share one lr
        self.trainable = list(man.trainable_names)
        self.n_trainable = sum(a.size for a in self.trainer.state.params.values())

    def step(self, batch, lrs) -> float:
        loss = self.trainer.train_step(batch)[0]
        self.trainer.lr = lrs[0]
        self.trainer.optimizer_step()
        return loss

    def eval_step(self, batch):
        return self.trainer.eval_step(batch)

    def close_eval(self) -> None:
        self.trainer.close_eval()

    def get(self, name: str) -> np.ndarray:
        return self.trainer.state.params[name].copy()

    def extra(self) -> dict:
        """What the board's checkpoint holds: the trainable state only."""
        return {"checkpoint_bytes": len(self.trainer.state.to_bytes())}

    def close(self) -> None:
        if self.trainer.session.get_session_options().enable_profiling:
            self.trainer.session.end_profiling()
        self.trainer = None


class InferEngine(Engine):
    """The floor: the base model + new head, forward only, in a plain InferenceSession."""
    trains = False

    def __init__(self, spec: dict, v: dict, profile_prefix: Optional[str]):
        from taskedge.runtime.ort import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = spec["threads"]
        self.sess = ort.InferenceSession(v["model"], so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def step(self, batch, lrs) -> None:
        self.sess.run(None, dict(zip(self.input_names, batch)))      # the labels (last) are not fed
        return None
