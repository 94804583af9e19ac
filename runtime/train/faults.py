"""TEST-ONLY fault injection in the training loop (tests/faults). The variables are unset in
production, where `fires` is always False:

    TASKEDGE_FAULT_ALLOC_FAIL_AT_STEP=N   the train step raises MemoryError once at step N
    TASKEDGE_FAULT_NAN_AT_STEP=N          the train step reports a NaN loss once at step N

(The third hook, TASKEDGE_FAULT_DELAY_CKPT, widens the checkpoint write window: fsutil.fault_delay.)
"""
from __future__ import annotations

import os

ALLOC_FAIL_AT_STEP = "TASKEDGE_FAULT_ALLOC_FAIL_AT_STEP"
NAN_AT_STEP = "TASKEDGE_FAULT_NAN_AT_STEP"
_fired: set = set()                     # each fault fires once per process


def fires(name: str, step: int) -> bool:
    v = os.environ.get(name)
    if v is None or name in _fired or int(v) != step:
        return False
    _fired.add(name)
    return True
