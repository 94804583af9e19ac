"""`adapt --task NEW --init gates[:A,B]`: X-PEFT-style, train only a gate per stored task and layer
(issue 12, step 6), plus NEW's fresh head.

    W' = W + sum_t g[t, l] * delta_t        for each adapted layer l, t over the stored tasks

The stored tasks' deltas sit at different entries of W (each export calibrated on its own data), so
NEW must be exported with `--union-of` those tasks (export/compose.py): its allocation then holds
every entry of theirs, and each stored delta, carried over to NEW's allocation (runtime/compose.py),
is exact. The step graph is NEW's own: its delta input is the mix above, computed in numpy each step,
and the gates' gradient is the chain rule through that linear map, dL/dg[t, l] = <dL/d delta_l,
delta_t,l>, with dL/d delta_l the graph's own gradient output (exact; tests/test_compose.py checks it
against finite differences of the graph's loss). A checkpoint holds the gates and the head; the task
state written after the run is the mixed delta, so merge, predict and packs take the task as any other.

The gates start at 0 (NEW starts as the base with a fresh head, as `--init zero` does) and step
GATE_LR times the run's learning rate: a gate is a whole task's delta per unit, and at the
delta's own rate (1e-3..1e-2 per step) it would barely move in a short run.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import bundle as B
from .fsutil import UserError
from .trainer import Trainer

GATES = "taskedge.gates"          # [tasks, layers] in the state and its checkpoints
GATE_LR = 10.0
CONTAINED = 1.0 - 1e-6            # share of a stored delta NEW's allocation must hold to mix it exactly


class Mix:
    """The stored deltas carried over to NEW's allocation: per layer, a [tasks, ...delta shape] stack."""

    def __init__(self, tasks: List[str], manifest: B.Manifest, carried: List[Dict[str, np.ndarray]]):
        self.tasks = tasks
        self.deltas = [la.params[0] for la in manifest.layers]
        self.head = list(manifest.head["params"]) if manifest.head else []
        self.stacks = {p: np.stack([c[p] for c in carried]).astype(np.float32) for p in self.deltas}

    @property
    def names(self) -> List[str]:
        """The state's tensors: the gates, then the head."""
        return [GATES] + self.head

    def initial(self, bundle_initial: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        out = {GATES: np.zeros((len(self.tasks), len(self.deltas)), np.float32)}
        out.update({n: bundle_initial[n] for n in self.head})
        return out

    def inner(self, params: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The step graph's trainable inputs for these gates: each layer's mixed delta, and the head."""
        g = params[GATES]
        out = {p: np.tensordot(g[:, j], self.stacks[p], axes=1).astype(np.float32)
               for j, p in enumerate(self.deltas)}
        out.update({n: params[n] for n in self.head})
        return out

    def outer_grads(self, grads: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The graph's gradients (per delta and head tensor) -> the state's (gates and head)."""
        g = np.empty((len(self.tasks), len(self.deltas)), np.float32)
        for j, p in enumerate(self.deltas):
            stack = self.stacks[p]
            g[:, j] = (stack.reshape(len(self.tasks), -1) @ grads[p].reshape(-1).astype(np.float32))
        out = {GATES: g}
        out.update({n: grads[n] for n in self.head})
        return out


class GatedTrainer(Trainer):
    """The Trainer of a gates run: the state is the gates and the head; the graph sees the mix."""

    def __init__(self, *args, mix: Mix, **kwargs):
        self.mix = mix
        super().__init__(*args, **kwargs)

    def trained_params(self) -> Dict[str, np.ndarray]:
        return self.mix.inner(self.state.params)

    def _state_grads(self, outputs: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        return self.mix.outer_grads(dict(zip(self.names, outputs)))

    def _lr_groups(self) -> List[Tuple[Dict[str, np.ndarray], float]]:
        p = self.state.params
        return [({GATES: p[GATES]}, self.lr * GATE_LR), ({n: a for n, a in p.items() if n != GATES}, self.lr)]


def build(store, task: str, names: List[str], carried) -> Tuple[Mix, dict]:
    """The Mix of the stored tasks `names` for `task`; `carried(donor) -> (tensors, kept share)`.
    Refuses a task whose delta NEW's allocation does not hold whole."""
    folder = store.task_dir(task)
    manifest = B.read_manifest(folder)
    if any(len(la.params) != 1 or la.trained_rows is not None for la in manifest.layers):
        raise UserError(f"task {task!r}: --init gates needs a plain delta in every layer (export it with "
                        "--union-of, without --lora-rank)")
    states, kept = [], {}
    for n in names:
        params, kept[n] = carried(n)
        if kept[n] < CONTAINED:
            raise UserError(f"--init gates: {task!r}'s allocation holds only {100 * kept[n]:.1f} % of task {n!r}'s "
                            f"delta; export {task!r} with --union-of that task (`taskedge export ... --union-of "
                            f"BUNDLE_OR_PACK_OF_{n}`) or leave {n!r} out")
        states.append(params)
    return Mix(names, manifest, states), {"from": "gates", "tasks": names, "gates": [len(names), len(manifest.layers)],
                                          "gate_lr_scale": GATE_LR}
