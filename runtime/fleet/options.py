"""The fleet's settings, defined once: FleetOptions' fields are `taskedge fleet serve`'s flags AND the
Flower app's run config (`[tool.flwr.app.config]`, keys in kebab-case), so the ServerApp reads
exactly what the command line checked. BoardConfig is what a SuperNode's `--node-config` gives
the ClientApp on each board. Imports nothing heavy."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Optional

from ..flags import FRACTION, POSITIVE, at_least, flag
from ..fsutil import UserError
from .aggregate import RULES


@dataclass
class FleetOptions:
    bundle: str = flag("", "the bundle every board trains (its allocation names the fleet)", positional=True,
                       show_default=False)
    state_dir: str = flag("", "the server's folder: committed global state after every round, the report "
                              "(default BUNDLE/fleet)", show_default=False)
    rounds: int = flag(10, "federated rounds in total (a restarted server resumes after its last committed round)",
                       check=at_least(1))
    local_steps: int = flag(20, "optimizer steps each board runs per round, from the global state", check=at_least(1))
    lr: float = flag(0.003, "learning rate on the boards (constant within a round)", check=POSITIVE)
    batch_size: int = flag(32, "effective batch size on the boards", check=at_least(1))
    aggregate: str = flag("fedavg", "fedavg (weighted by examples), or a robust rule: median, trimmed-mean",
                          choices=list(RULES))
    trim: float = flag(0.2, "trimmed-mean: share cut from each end per entry", check=FRACTION)
    min_clients: int = flag(2, "boards that must be connected before a round starts (see --grace-seconds)",
                            check=at_least(1))
    wait_seconds: float = flag(120.0, "how long to wait for --min-clients boards to connect", check=POSITIVE)
    round_timeout: float = flag(600.0, "seconds a round waits for replies at most; boards silent by then are "
                                       "left out of the round", check=POSITIVE)
    grace_seconds: float = flag(120.0, "once --min-clients boards have replied, wait at most this much longer "
                                       "for the rest (a board that died mid-round never replies)", check=POSITIVE)
    eval_data: str = flag("", "held-out data the server scores the global state on after every round",
                          show_default=False)
    seed: int = flag(0, "data order seed (each board and round draws its own from it)", check=at_least(0))

    def resolved(self) -> "FleetOptions":
        if not self.bundle:
            raise UserError("no bundle: give the bundle folder every board trains (the one `taskedge export` wrote)")
        self.state_dir = self.state_dir or str(Path(self.bundle) / "fleet")
        return self

    def run_config(self) -> dict:
        """The Flower run config (TOML scalars; kebab-case keys)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_run_config(cls, cfg: Mapping) -> "FleetOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k.replace("-", "_"): v for k, v in cfg.items() if k.replace("-", "_") in known}).resolved()


@dataclass
class BoardConfig:
    """One board's `flower-supernode --node-config` (keys in kebab-case)."""
    bundle: str                   # its copy of the fleet's bundle
    data: str                     # its own training data (never leaves the board)
    eval_data: str = ""           # its own held-out data for the local accuracy (default: 10 % of data)
    profile: str = "host-cpu"     # its device profile: memory and energy budgets of `adapt`
    work_dir: str = ""            # its run folder (default BUNDLE/fleet-board): checkpoints, AdamW moments
    power_mode: Optional[str] = None
    threads: int = 0

    @classmethod
    def from_node_config(cls, cfg: Mapping) -> "BoardConfig":
        given = {k.replace("-", "_"): v for k, v in cfg.items()}
        missing = [k for k in ("bundle", "data") if not given.get(k)]
        if missing:
            raise UserError(f"--node-config lacks {', '.join(missing)}: start the board's SuperNode with "
                            "--node-config 'bundle=\"/path/bundle\" data=\"/path/train.npz\" profile=\"NAME\"'")
        known = {f.name for f in fields(cls)}
        board = cls(**{k: v for k, v in given.items() if k in known})
        board.work_dir = board.work_dir or str(Path(board.bundle) / "fleet-board")
        return board
