"""TEST-ONLY fault injection for the fleet (tests/faults/test_fleet.py). Unset in production, where
nothing here fires:

    TASKEDGE_FAULT_FLEET_CLIENT=nan|shapes|hash|kill   this board's reply at round
    TASKEDGE_FAULT_FLEET_ROUND=N                         N (default 1) holds NaN, a tensor of the
                                                         wrong shape, another allocation hash, or
                                                         the ClientApp process is SIGKILLed mid-round
    TASKEDGE_FAULT_FLEET_SERVER_EXIT_AFTER=N             the ServerApp process dies (os._exit) right
                                                         after committing round N (a server
                                                         that resumed is left alone)
"""
from __future__ import annotations

import os
import signal
from typing import Dict, Optional

import numpy as np

CLIENT = "TASKEDGE_FAULT_FLEET_CLIENT"
ROUND = "TASKEDGE_FAULT_FLEET_ROUND"
SERVER_EXIT_AFTER = "TASKEDGE_FAULT_FLEET_SERVER_EXIT_AFTER"
KINDS = ("nan", "shapes", "hash", "kill")


def client_fault(server_round: int) -> Optional[str]:
    kind = os.environ.get(CLIENT)
    if kind not in KINDS or server_round != int(os.environ.get(ROUND, "1")):
        return None
    return kind


def kill_if(kind: Optional[str]) -> None:
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def damage(kind: Optional[str], state: Dict[str, np.ndarray], their_hash: str) -> str:
    """Apply a reply fault to `state` (in place); returns the hash the reply will carry."""
    first = next(iter(state))
    if kind == "nan":
        state[first] = state[first].copy()
        state[first].flat[0] = np.nan
    elif kind == "shapes":
        state[first] = state[first][..., :-1].copy() if state[first].shape[-1] > 1 else np.zeros(7, np.float32)
    elif kind == "hash":
        return "0" * len(their_hash)
    return their_hash


def server_exit_after(server_round: int, fresh: bool) -> None:
    """Fires in a server that started from round 0 only, so the restarted one carries on."""
    v = os.environ.get(SERVER_EXIT_AFTER)
    if fresh and v is not None and int(v) == server_round:
        os._exit(17)
