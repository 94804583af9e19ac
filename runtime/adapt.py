"""`taskedge adapt` as a library: `adapt(bundle, options(bundle, flags))` runs the on-device
adaptation and returns its report. The run itself is the package runtime/train/ (its
__init__ names each file's job); this module keeps the names its callers import
(runtime/cli.py, tools/bench, tools/board_check.py, tools/doctor.py)."""
from __future__ import annotations

from .options import AdaptOptions, options
from .train.schedule import batch_indices, lr_at
from .train.session import Session, accuracy, adapt, write_update

__all__ = ["AdaptOptions", "Session", "accuracy", "adapt", "batch_indices", "lr_at", "options", "write_update"]
