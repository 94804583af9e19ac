"""The board's Flower ClientApp: one round = `adapt` for the round's local steps, starting from the
global state the server sent, under the board's device profile (memory and energy budgets, micro-
batch planning, divergence recovery: everything `taskedge adapt` does). It replies with the
trained state (runtime/fleet/exchange.py) and the round's metrics; the AdamW moments stay on the
board, in its run folder, and carry over to its next round.

The board is configured by its SuperNode's `--node-config` (options.BoardConfig): bundle, data,
profile, work-dir. Started by Flower (`flwr-clientapp`) as `taskedge.runtime.fleet.client:app`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from .. import bundle as B
from ..checkpoints import CheckpointStore
from ..fsutil import UserError, one_line
from ..options import AdaptOptions
from ..train.session import Session
from ..trainer import TrainState
from . import exchange as X, faults
from .options import BoardConfig


class RoundSession(Session):
    """An `adapt` run that starts from the global state (and the board's own AdamW moments) instead
    of the bundle's initial state; a divergence rollback with no checkpoint yet returns to it."""

    def __init__(self, bundle_dir, opts: AdaptOptions, start: TrainState):
        super().__init__(bundle_dir, opts, log=lambda m: print(f"[fleet board] {m}", file=sys.stderr, flush=True))
        self.start = start

    def start_state(self) -> TrainState:
        s = self.start
        self.head_start = "global" if self.manifest.head else None
        return TrainState({k: a.copy() for k, a in s.params.items()}, {k: a.copy() for k, a in s.m.items()},
                          {k: a.copy() for k, a in s.v.items()}, s.updates)


def _start_state(run_dir: Path, names, global_state: Dict[str, np.ndarray]) -> TrainState:
    """The global state with this board's AdamW moments of its previous round (none the first time)."""
    found = CheckpointStore(run_dir).latest(warn=lambda m: None)
    if found is None:
        return TrainState(global_state)
    old = TrainState.from_file(found[0], names)
    return TrainState(global_state, old.m, old.v, old.updates)


def train_round(board: BoardConfig, global_state: Dict[str, np.ndarray], settings: dict) -> Tuple[dict, dict, int]:
    """Run the round's local steps; (trained state, adapt's report, training examples)."""
    manifest = B.load_bundle(board.bundle, verify=False)
    run_dir = Path(board.work_dir) / "run"
    opts = AdaptOptions(data=board.data, eval_data=board.eval_data or None, profile=board.profile,
                        power_mode=board.power_mode,
                        steps=int(settings["local-steps"]), batch_size=int(settings["batch-size"]),
                        lr=float(settings["lr"]), schedule="constant", warmup=0, run_dir=str(run_dir), fresh=True,
                        keep=1, checkpoint_every=10 ** 9, quiet=True, threads=board.threads,
                        seed=int(settings["seed"]) * 1000 + int(settings["round"]))
    session = RoundSession(board.bundle, opts, _start_state(run_dir, manifest.trainable_names, global_state))
    faults.kill_if(faults.client_fault(int(settings["round"])))
    report = session.run()
    return dict(session.trainer.state.params), report, len(session.train_ds)


def reply_content(board: BoardConfig, instruction) -> dict:
    """The reply's records for one train instruction (exchange.py's layout)."""
    from flwr.app import ConfigRecord, MetricRecord
    settings = dict(instruction[X.CONFIG])
    manifest = B.load_bundle(board.bundle, verify=False)
    ours = X.allocation_hash(board.bundle, manifest)
    if settings.get("allocation-hash") != ours:
        raise UserError(f"this board's bundle {board.bundle} has allocation {ours}, the fleet's is "
                        f"{settings.get('allocation-hash')}: copy the fleet's bundle to the board")
    state, report, examples = train_round(board, X.from_record(instruction[X.STATE]), settings)
    kind = faults.client_fault(int(settings["round"]))
    sent_hash = faults.damage(kind, state, ours) if kind else ours
    metrics = {"examples": examples, "steps": report["steps"], "loss-first": report["loss"]["first"],
               "loss-last": report["loss"]["last"], "local-accuracy-before": report["accuracy"]["before"],
               "local-accuracy-after": report["accuracy"]["after"], "seconds": report["time"]["seconds"],
               "energy-j": report["energy"]["joules"], "energy-measured": int(report["energy"]["measured"]),
               "peak-rss-mb": report["memory"]["peak_rss_mb"]}
    return {X.STATE: X.to_record(state),
            X.META: ConfigRecord({"format": X.FORMAT, "allocation-hash": sent_hash, "profile": board.profile,
                                  "energy-source": str(report["energy"]["source"])}),
            X.METRICS: MetricRecord({k: float(v) for k, v in metrics.items() if v is not None})}


def _app():
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.clientapp import ClientApp

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            board = BoardConfig.from_node_config(context.node_config)
            return Message(RecordDict(reply_content(board, msg.content)), reply_to=msg)
        except UserError as e:              # the board's own problem, as one line the server logs
            print(f"[fleet board] error: {one_line(e)}", file=sys.stderr, flush=True)
            return Message(Error(code=2, reason=one_line(e)), reply_to=msg)

    return client


app = _app()
