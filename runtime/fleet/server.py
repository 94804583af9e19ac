"""The fleet's Flower ServerApp: rounds of sparse updates over the Message API.

    resume (the newest committed global state in --state-dir, else the bundle's initial state)
    -> per round: wait for --min-clients boards -> send each the global state + round settings
    -> collect replies until all are in or --round-timeout -> reject (and log) failed boards and
    states that do not fit (exchange.check: hash, names, shapes, dtype, NaN/Inf) -> aggregate the
    accepted ones (aggregate.py) -> score the global state on --eval-data -> commit it (runtime/
    checkpoints.py: atomic, hashed; the round's report row rides in the commit record) and write it
    as a task state file, STATE_DIR/state.npz (runtime/bundle.py's format).

A server restarted between rounds resumes after its last committed round, with nothing lost.
Started by Flower (`flwr-serverapp`, via `flwr run`) as `taskedge.runtime.fleet.server:app`.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .. import bundle as B
from ..checkpoints import CheckpointStore
from ..fsutil import UserError, atomic_write_bytes
from ..trainer import TrainState
from . import aggregate, exchange as X, faults
from .options import FleetOptions

POLL_SECONDS = 0.25


LOG = "fleet.log"


class Coordinator:
    """One federation's server side: the global state, its committed history, the round loop."""

    def __init__(self, opts: FleetOptions, grid):
        self.opts, self.grid = opts, grid
        self.manifest = B.load_bundle(opts.bundle)
        self.hash = X.allocation_hash(opts.bundle, self.manifest)
        self.store = CheckpointStore(opts.state_dir, keep=2)
        self.spec = X.expected(X.initial_state(opts.bundle, self.manifest))
        self.sizes = X.comparison_bytes(self.manifest)
        self._eval = None

    def log(self, msg: str) -> None:
        """To the Flower log stream and, durably, to STATE_DIR/fleet.log (what a crash leaves behind)."""
        line = f"[fleet] {time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}"
        print(line, file=sys.stderr, flush=True)
        Path(self.opts.state_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.opts.state_dir) / LOG, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def run(self) -> List[dict]:
        self.store.lock()
        try:
            state, rows = self._resume()
            fresh = not rows
            for r in range(len(rows), self.opts.rounds + 1):
                t0 = time.time()
                state, row = (state, self._row(0, [])) if r == 0 else self._round(r, state)
                row["accuracy"] = self._accuracy(state)
                row["wall_s"] = round(time.time() - t0, 3)
                rows.append(row)
                self.store.save(TrainState(state), {"round": r, "allocation_hash": self.hash, "rows": rows,
                                                    "bytes_per_client": self.sizes}, r)
                atomic_write_bytes(Path(self.opts.state_dir) / B.TASK_STATE, B.task_state_bytes(
                    state, self.manifest, B.allocation_digest(self.opts.bundle, self.manifest)))
                self.log(f"round {r} committed: accuracy {row['accuracy']}, {row['accepted']} accepted, "
                         f"{row['rejected']} rejected, {row['failed']} failed, {row['wall_s']} s")
                faults.server_exit_after(r, fresh)
            return rows
        finally:
            self.store.unlock()

    def _resume(self):
        found = self.store.latest(warn=self.log)
        if found is None:
            return X.initial_state(self.opts.bundle, self.manifest), []
        path, record = found
        if record.get("allocation_hash") != self.hash:
            raise UserError(f"{self.opts.state_dir} holds a fleet of allocation {record.get('allocation_hash')}, "
                            f"this bundle's is {self.hash}: give another --state-dir")
        self.log(f"resuming after committed round {record['round']} ({path.name})")
        return TrainState.from_file(path, self.manifest.trainable_names).params, list(record["rows"])

    # -- one round -------------------------------------------------------------
    def _round(self, r: int, state: Dict[str, np.ndarray]):
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict
        nodes = self._nodes()
        o = self.opts
        settings = {"round": r, "local-steps": o.local_steps, "lr": o.lr, "batch-size": o.batch_size,
                    "seed": o.seed, "allocation-hash": self.hash}
        messages, down = [], {}
        for node in nodes:
            record = X.to_record(state)
            down[node] = X.record_bytes(record)
            messages.append(Message(RecordDict({X.STATE: record, X.CONFIG: ConfigRecord(dict(settings))}),
                                    node, MessageType.TRAIN, group_id=str(r)))
        self.log(f"round {r}: sent the global state ({down[nodes[0]]} B) to {len(nodes)} boards")
        replies = self._collect(list(self.grid.push_messages(messages)))
        clients, states, examples = [], [], []
        for node in nodes:
            msg = replies.get(node)
            entry, trained = self._judge(node, msg)
            entry["bytes_down"] = down[node]
            clients.append(entry)
            if trained is not None:
                states.append(trained)
                examples.append(entry["examples"])
        row = self._row(r, clients)
        if states:
            state = aggregate.aggregate(o.aggregate, states, examples, o.trim)
        else:
            row["note"] = "no state accepted: the global state is kept"
            self.log(f"round {r}: {row['note']}")
        return state, row

    def _nodes(self) -> List[int]:
        deadline = time.time() + self.opts.wait_seconds
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.opts.min_clients:
                return nodes
            if time.time() > deadline:
                raise UserError(f"{len(nodes)} boards connected after {self.opts.wait_seconds:g} s, "
                                f"--min-clients is {self.opts.min_clients}: start more SuperNodes or lower it")
            time.sleep(POLL_SECONDS)

    def _collect(self, ids: List[str]) -> dict:
        """node id -> reply, for the replies in by --round-timeout, or by --grace-seconds after the
        first --min-clients replies."""
        waiting, got = set(ids), {}
        now = time.time()
        deadline = now + self.opts.round_timeout
        while waiting and now < deadline:
            for msg in self.grid.pull_messages(list(waiting)):
                waiting.discard(msg.metadata.reply_to_message_id)
                got[msg.metadata.src_node_id] = msg
                if len(got) == self.opts.min_clients:
                    deadline = min(deadline, time.time() + self.opts.grace_seconds)
            time.sleep(POLL_SECONDS if waiting else 0)
            now = time.time()
        return got

    def _judge(self, node: int, msg) -> tuple:
        """(the board's report entry, its state if accepted else None); every refusal is logged."""
        entry: Dict[str, object] = {"node": str(node), "status": "failed", "bytes_up": 0}
        if msg is None:
            entry["reason"] = (f"no reply within --round-timeout {self.opts.round_timeout:g} s or "
                               f"--grace-seconds {self.opts.grace_seconds:g} after --min-clients replies")
        elif msg.has_error():
            entry["reason"] = f"board error {msg.error.code}: {msg.error.reason}"
        else:
            c = msg.content
            state = X.from_record(c[X.STATE]) if X.STATE in c.array_records else {}
            meta = dict(c.config_records.get(X.META, {}))
            entry.update({k.replace("-", "_"): v for k, v in dict(c.metric_records.get(X.METRICS, {})).items()})
            entry["examples"] = int(entry.get("examples", 0))
            entry["bytes_up"] = X.record_bytes(c[X.STATE]) if X.STATE in c.array_records else 0
            why = X.check(state, self.spec, meta.get("allocation-hash"), self.hash)
            if why is None:
                entry["status"] = "accepted"
                return entry, state
            entry["status"], entry["reason"] = "rejected", why
        self.log(f"board {node}: {entry['status']}: {entry['reason']}")
        return entry, None

    def _row(self, r: int, clients: List[dict]) -> dict:
        count = {s: sum(c["status"] == s for c in clients) for s in ("accepted", "rejected", "failed")}
        return {"round": r, "clients": clients, **count}

    def _accuracy(self, state: Dict[str, np.ndarray]) -> Optional[float]:
        if not self.opts.eval_data:
            return None
        from ..data import load_dataset
        from ..train.session import accuracy
        from ..trainer import Trainer
        if self._eval is None:
            self._eval = (Trainer(self.opts.bundle, self.manifest, TrainState(state)),
                          load_dataset(self.opts.eval_data, self.manifest, self.opts.bundle))
        trainer, ds = self._eval
        trainer.state = TrainState(state)
        return round(accuracy(trainer, ds, 64), 6)


def _app():
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        Coordinator(FleetOptions.from_run_config(context.run_config), grid).run()

    return server


app = _app()
