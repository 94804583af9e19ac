"""RunState: what a checkpoint records about the run and what `--resume` restores.

A checkpoint is the trainable state (TrainState, runtime/trainer.py: the .npz) plus this, the
"state" of its commit record (runtime/checkpoints.py). `to_record()` and `from_record()` walk
the dataclass fields, so a field added here is saved and restored with nothing else to edit.
The record's JSON keys are the field names; a key missing from an older checkpoint takes the
field's default, and a key this version does not know is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional


@dataclass
class RunState:
    flags: Optional[dict] = None          # the run's settings (resume.run_flags), judged by --resume
    step: int = 0                         # optimizer steps done
    plan: Optional[dict] = None           # the micro-batch plan (planner.py); "micro_batch" is the current one
    lr_scale: float = 1.0                 # halved by each divergence rollback (recovery.py)
    energy_j: float = 0.0                 # joules and seconds over every run of this run folder
    seconds: float = 0.0
    losses: List[float] = field(default_factory=list)      # one per step done
    evals: List[list] = field(default_factory=list)        # [step, accuracy] of --eval-every
    accuracy_before: Optional[float] = None
    stepdowns: List[dict] = field(default_factory=list)    # micro-batch step-downs (planner.py)
    divergences: List[dict] = field(default_factory=list)  # rollbacks (recovery.py)
    excluded: List[int] = field(default_factory=list)      # training records dropped by --skip-bad (positions)
    seed: int = 0                                          # the data order seed (also in flags)

    @property
    def micro_batch(self) -> int:
        return int(self.plan["micro_batch"])

    def to_record(self) -> dict:
        """The JSON-ready record (it shares the lists: write it out before the run goes on)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record: dict) -> "RunState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})
