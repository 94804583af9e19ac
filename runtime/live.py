"""Live weights: for each of a bundle's `live` layers (export/live.py) the step and eval graphs read
W' = W + delta as an input; this keeps it.

W is mapped copy-on-write from the bundle's weights file, and `sync` writes W[idx] + delta at the
selected entries of the rows that train, before every run: a write copies only the pages it touches
(MiniLM 0.1 %: 6.2 of 42 MB, once), a step copies nothing (the graph used to build W' twice a step).
The values are the same fp32 sums the graph computed, from whatever the trainable state holds
when the run starts, so a resumed or reloaded state needs nothing else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from . import bundle as B


class LiveWeights:
    def __init__(self, bundle_dir, manifest: B.Manifest):
        from .merge import dense_delta
        from .trainer import map_weights

        self._dense_delta = dense_delta
        self.layers = [la for la in manifest.layers if la.live]
        self.arrays: Dict[str, np.ndarray] = {}
        self._entries = []
        if not self.layers:
            return
        wanted = {la.weight for la in self.layers}
        mapped = map_weights(bundle_dir, [e for e in manifest.weights if e.name in wanted], mode="c")
        with np.load(Path(bundle_dir) / B.ALLOCATION, allow_pickle=False) as z:
            alloc = {la.weight: z[la.weight].astype(np.int64) for la in self.layers}
        for la in self.layers:
            w = mapped[la.weight]
            idx = alloc[la.weight]
            rows = np.arange(la.rows) if la.trained_rows is None else np.asarray(la.trained_rows, np.int64)
            view = la.rows_view(w)
            at = (rows[:, None], idx[rows])
            self._entries.append((la, idx, rows, view, at, view[at].copy()))     # the base values at the entries
            self.arrays[la.live] = w

    def sync(self, params: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """W' for `params` (the graph's trainable inputs); returns the feeds {input name: W'}."""
        for la, idx, rows, view, at, base in self._entries:
            view[at] = base + self._dense_delta(la, params, idx)[rows]
        return self.arrays
