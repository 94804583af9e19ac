"""What a federated round exchanges, defined once: the trained state of a bundle, keyed by tensor name.

Every board trains the same host-chosen entries (the allocation is fixed at export), so every
board's state has the same names and shapes: a round moves only the trainable tensors (sparse
deltas / LoRA factors and the head), never frozen weights, never the AdamW moments (they stay on
the board). A state travels with its bundle's allocation hash; the server refuses a state whose
hash, names, shapes or dtype differ from its own, or that holds NaN/Inf.

The names and layout are the task-pack state's (runtime/bundle.py: a base named by `base_id`, a
task state keyed by trainable name and `allocation_digest`); the server also writes each committed
global state as a task state file (`state.npz`), which `taskedge` reads like any other task's.

Message layout (Flower Message API, runtime/fleet/server.py and client.py):
    train instruction  {STATE: ArrayRecord (global state), CONFIG: ConfigRecord (round settings)}
    train reply        {STATE: ArrayRecord (trained state), META: ConfigRecord (hash, examples),
                        METRICS: MetricRecord (loss, energy, seconds, local accuracy)}
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .. import bundle as B

FORMAT = "taskedge.fleet.state/1"
STATE, CONFIG, META, METRICS = "state", "config", "meta", "metrics"
LORA_RANK = 8               # the LoRA a round is compared with (bytes a client would send)

Spec = Dict[str, Tuple[Tuple[int, ...], str]]      # name -> (shape, dtype)


def allocation_hash(bundle_dir, manifest: B.Manifest) -> str:
    """Names the state's layout: the base it applies to (`bundle.base_id`) and the allocation it
    trains (`bundle.allocation_digest`, the digest a task state file carries). Two boards whose
    states may be averaged have equal hashes."""
    parts = [FORMAT, B.base_id(manifest), B.allocation_digest(bundle_dir, manifest)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def initial_state(bundle_dir, manifest: B.Manifest) -> Dict[str, np.ndarray]:
    with np.load(Path(bundle_dir) / B.INITIAL_STATE, allow_pickle=False) as z:
        return {n: np.ascontiguousarray(z[n], dtype=np.float32) for n in manifest.trainable_names}


def expected(state: Dict[str, np.ndarray]) -> Spec:
    return {n: (tuple(a.shape), str(a.dtype)) for n, a in state.items()}


def check(state: Dict[str, np.ndarray], spec: Spec, their_hash: Optional[str], our_hash: str) -> Optional[str]:
    """Why a received state cannot be aggregated (one line), or None when it can."""
    if their_hash != our_hash:
        return f"allocation hash {their_hash} is not this fleet's {our_hash} (another bundle or export)"
    missing, extra = sorted(set(spec) - set(state)), sorted(set(state) - set(spec))
    if missing or extra:
        return f"tensors differ from the bundle's: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, (shape, dtype) in spec.items():
        a = state[name]
        if tuple(a.shape) != shape or str(a.dtype) != dtype:
            return f"{name}: {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}"
        if not np.isfinite(a).all():
            return f"{name}: {int((~np.isfinite(a)).sum())} NaN/Inf values"
    return None


def to_record(state: Dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord
    return ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in state.items()})


def from_record(record) -> Dict[str, np.ndarray]:
    return {n: arr.numpy() for n, arr in record.items()}


def record_bytes(record) -> int:
    """Bytes of an ArrayRecord's payload as it travels (serialized arrays and their keys)."""
    return int(record.count_bytes())


def comparison_bytes(manifest: B.Manifest) -> Dict[str, int]:
    """float32 bytes one client sends per round: this state, LoRA r=8 on the same layers (with the
    same dense head), and full fine-tuning (every weight and the head)."""
    head = manifest.head_params
    lora = sum(LORA_RANK * (layer.rows + layer.cols) for layer in manifest.layers)
    return {"taskedge": 4 * manifest.trainable_params, f"lora_r{LORA_RANK}": 4 * (lora + head),
            "full_ft": 4 * (manifest.num_weights + head)}
