"""The training step on plain onnxruntime.

The bundle's step graph takes the trainable state as inputs and returns loss, logits and the
state's gradients; the frozen weights are initializers of that graph (prepacked by onnxruntime).
`TrainState` is everything that changes during a run (KB to MB): the trainable tensors, their
AdamW moments and the update count. It is what a checkpoint holds.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from .ort import onnxruntime as ort

from . import bundle as B
from .fsutil import UserError
from .live import LiveWeights
from .optim import AdamW


class TrainState:
    """Trainable tensors + AdamW moments + number of updates so far."""

    def __init__(self, params: Dict[str, np.ndarray], m=None, v=None, updates: int = 0):
        self.params = {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in params.items()}
        self.m = m if m is not None else {k: np.zeros_like(a) for k, a in self.params.items()}
        self.v = v if v is not None else {k: np.zeros_like(a) for k, a in self.params.items()}
        self.updates = int(updates)

    @classmethod
    def initial(cls, bundle_dir, manifest: B.Manifest) -> "TrainState":
        with np.load(Path(bundle_dir) / B.INITIAL_STATE, allow_pickle=False) as z:
            return cls({n: z[n] for n in manifest.trainable_names})

    @classmethod
    def fresh(cls, bundle_dir, manifest: B.Manifest) -> "TrainState":
        """A new run's start: the bundle's initial state with the new head (if any) at zero. The
        exporter's random head on unnormalised features starts far above chance (digits CNN: loss 3.3,
        chance 1.6) and its random gradients distort the features the deltas train; from zero the
        deltas get gradients only as the head learns -- LP-FT's effect (Kumar et al. 2022) without its
        head-only phase (README, "The learning rate and the run length, when you give none")."""
        state = cls.initial(bundle_dir, manifest)
        for name in (manifest.head or {}).get("params", []):
            state.params[name] = np.zeros_like(state.params[name])
        return state

    # A checkpoint is one .npz of five members: the values, first and second moments of every tensor as
    # three flat float32 arrays (in `layout` order), the layout as JSON and the update count. One member per
    # tensor and kind cost ~300 B of zip and .npy headers each: MobileNetV2 at 0.1 %, 162 members, 48 of 228 kB.
    KINDS = ("param", "m", "v")

    def to_bytes(self) -> bytes:
        names = list(self.params)
        arrays = {"layout": np.array(json.dumps([[n, list(self.params[n].shape)] for n in names])),
                  "updates": np.array(self.updates, dtype=np.int64)}
        for kind, tensors in zip(self.KINDS, (self.params, self.m, self.v)):
            arrays[kind] = np.concatenate([np.asarray(tensors[n], np.float32).reshape(-1) for n in names]) \
                if names else np.zeros(0, np.float32)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_file(cls, path, names: Sequence[str]) -> "TrainState":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "layout" not in z.files:                  # written before the packed layout: a member per tensor
                    parts = [{n: z[f"{kind}/{n}"] for n in names} for kind in cls.KINDS]
                    return cls(*parts, updates=int(z["updates"]))
                layout = {n: tuple(shape) for n, shape in json.loads(str(z["layout"][()]))}
                order = list(layout)
                missing = [n for n in names if n not in layout]
                if missing:
                    raise KeyError(f"no tensor {missing[0]!r}")
                sizes = [int(np.prod(layout[n])) for n in order]
                ends = np.cumsum(sizes)
                parts = []
                for kind in cls.KINDS:
                    flat = z[kind]
                    if flat.dtype != np.float32 or len(flat) != (ends[-1] if sizes else 0):
                        raise ValueError(f"{kind}: {len(flat)} {flat.dtype} values, the layout holds {sum(sizes)}")
                    split = {n: flat[e - k:e].reshape(layout[n]) for n, k, e in zip(order, sizes, ends)}
                    parts.append({n: split[n] for n in names})
                return cls(*parts, updates=int(z["updates"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a TaskEdge checkpoint of this bundle ({type(e).__name__}: {e})") from None

    def finite(self) -> bool:
        return all(np.isfinite(a).all() for a in self.params.values())


def session_options(threads: int = 0, profile_prefix: Optional[str] = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Measured on the MiniLM step graph (batch 16, peak RSS of a fresh process, `step_ms` median):
    # defaults 365 MB / 210 ms; no buffer reuse 289 / 207; + no memory pattern 274 / 206;
    # without the arena 334-342 MB and slower (231-253 ms).
    so.enable_mem_reuse = False
    so.enable_mem_pattern = False
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def providers_for(device: str, preferred: Optional[List[str]] = None) -> List[str]:
    """Execution providers in the device profile's order, limited to those this onnxruntime has."""
    have = ort.get_available_providers()
    want = list(preferred or [])
    if device.startswith("cuda"):
        want = ["CUDAExecutionProvider"] + want
    want.append("CPUExecutionProvider")
    chosen = [p for i, p in enumerate(want) if p in have and p not in want[:i]]
    if device.startswith("cuda") and "CUDAExecutionProvider" not in chosen:
        raise UserError(f"--device {device}: this onnxruntime has no CUDA execution provider (it has {have}); "
                        "install NVIDIA's onnxruntime-gpu wheel for JetPack, or use --device cpu")
    return chosen


def map_weights(bundle_dir, entries: Sequence[B.WeightEntry], mode: str = "r") -> Dict[str, np.ndarray]:
    """Arrays over one map per weights file (weights.bin, task_weights.bin); no copy, the pages are
    the file's. mode "r" read-only; "c" copy-on-write (a write copies only the pages it touches)."""
    maps: Dict[str, np.ndarray] = {}
    out = {}
    for e in entries:
        file = getattr(e, "file", B.WEIGHTS)
        if file not in maps:
            maps[file] = np.memmap(Path(bundle_dir) / file, dtype=np.uint8, mode=mode)
        out[e.name] = np.frombuffer(maps[file], dtype=np.dtype(e.dtype).newbyteorder("<"), offset=e.offset,
                                    count=int(np.prod(e.shape)) if e.shape else 1).reshape(e.shape)
    return out


def shared_weights(bundle_dir, manifest: B.Manifest) -> List[Tuple[str, object, np.ndarray]]:
    """The frozen weights as OrtValues over one read-only map of weights.bin, for every session of
    the bundle: the step and eval sessions then share them instead of loading a copy each
    (MiniLM, both sessions open: peak RSS 343 -> 293 MB, measured)."""
    return [(name, ort.OrtValue.ortvalue_from_numpy(a), a)
            for name, a in map_weights(bundle_dir, [e for e in manifest.weights if e.share]).items()]


_ARENA: List[bool] = []
SAME_AS_REQUESTED = 1                    # onnxruntime's ArenaExtendStrategy::kSameAsRequested
# A free chunk is split for a smaller request when the rest would be at least this big (onnxruntime's
# default, 128 MB, hands a 5 MB chunk whole to a 3 MB request). Measured, MiniLM step at 0.1 %, batch
# 16, 20 steps: peak RSS 260.7 -> 253.0 MB, same step time; MobileNetV2 222.4 -> 221.5 MB. (0 crashes
# onnxruntime 1.19: "Could not find Region".)
MAX_DEAD_BYTES = 64 * 1024


def shared_arena() -> bool:
    """One CPU arena for every session of this process (registered once), grown by what is asked
    rather than by powers of two, chunks split down to MAX_DEAD_BYTES of waste. Measured: the MiniLM step at 0.1 %, batch 16, peak RSS 285 -> 259 MB
    (onnxruntime's per-session arena, next power of two, vs this); serving 3 tasks in 2 sessions
    (batch 32) 230 -> 186 MB, as a second session adds no second activation arena."""
    if not _ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, SAME_AS_REQUESTED, -1, MAX_DEAD_BYTES))
            _ARENA.append(True)
        except Exception:                   # an onnxruntime without it, or one registered already elsewhere
            _ARENA.append(False)
    return _ARENA[0]


# Sessions over the mapped weights read them where they are: onnxruntime's prepacking would copy
# every constant GEMM operand per session. Measured (1 thread, median CPU ms per step, peak RSS):
# SmolLM2-135M step at 0.1 %, batch 4: 1,357 -> 1,141 MB (its tied 113 MB embedding was packed
# twice, for the head and for the head's input gradient), 1,451-1,503 -> 1,484-1,522 ms;
# MiniLM and MobileNetV2 steps: no change in either (nothing large was packed).
READ_IN_PLACE = {"session.disable_prepacking": "1"}


def open_session(path, threads: int = 0, providers: Optional[List[str]] = None,
                 profile_prefix: Optional[str] = None, initializers=(), config=None) -> ort.InferenceSession:
    so = session_options(threads, profile_prefix)
    if shared_arena():
        so.add_session_config_entry("session.use_env_allocators", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    for name, value, _ in initializers:
        so.add_initializer(name, value)
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise UserError(f"{path}: onnxruntime {ort.__version__} cannot load it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}); re-export the bundle with this taskedge version") from None


class ShapeAwareRun:
    """session.run that hands the arena's free chunks back when the batches' lengths keep changing.

    With variable-length batches (causal LMs: each batch padded to its longest record) the arena
    keeps chunks sized for earlier batches that a later one cannot use, and grows. Shrinking after
    a run whose per-example shapes (every axis but the batch axis) differ from the previous run's
    returns them. A fixed-shape stream never shrinks (it would page the same activations in again
    every step), nor does a smaller last batch (its requests fit the chunks there are; shrinking
    around the evaluation's last batch raised an O-Net bench worker's peak 217 -> 294 MB).
    Measured, 60 steps, 1 thread: SmolLM2-135M 0.1 % peak 1,341 -> 1,240 MB, CPU per step
    unchanged (2,745 vs 2,649 ms, load 7-9); shrinking every step of MobileNetV2's fixed-shape step
    cost +25 % CPU (76 -> 96 ms)."""

    def __init__(self, session):
        self.session, self._last = session, None
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __call__(self, feeds: Dict[str, np.ndarray]) -> list:
        shapes = tuple(a.shape[1:] for a in feeds.values())
        changed = self._last is not None and shapes != self._last
        self._last = shapes
        return self.session.run(None, feeds, self._shrink if changed else None)


class Trainer:
    """Step and eval sessions over one bundle, gradients accumulated over micro-batches, AdamW."""

    def __init__(self, bundle_dir, manifest: B.Manifest, state: TrainState, device: str = "cpu",
                 threads: int = 0, providers: Optional[List[str]] = None, profile_prefix: Optional[str] = None):
        self.dir, self.manifest, self.state = Path(bundle_dir), manifest, state
        self.threads = threads
        self.ort_version = ort.__version__
        self.providers = providers_for(device, providers)
        self.names = manifest.trainable_names
        self.data_names = [s.name for s in manifest.inputs] + [B.LABELS_INPUT]
        self.optimizer = AdamW.from_dict(manifest.step.optimizer)
        self.weights = shared_weights(self.dir, manifest)          # kept alive as long as the sessions
        self.live = LiveWeights(self.dir, manifest)
        self.session = open_session(self.dir / B.STEP_MODEL, threads, self.providers, profile_prefix, self.weights,
                                    READ_IN_PLACE)
        self._run_step = ShapeAwareRun(self.session)
        self._eval: Optional[ShapeAwareRun] = None
        self.lr = 0.0
        self.reset_grad()

    # -- steps ------------------------------------------------------------------
    def _feeds(self, batch: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        return self.graph_feeds(dict(zip(self.data_names, batch)))

    def graph_feeds(self, data: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The step/eval graphs' feeds: `data` (model inputs, labels), the trainable inputs and the
        live layers' W' (runtime/live.py), brought up to date with the trainable inputs."""
        feeds = {n: np.ascontiguousarray(a) for n, a in data.items()}
        params = self.trained_params()
        feeds.update(params)
        feeds.update(self.live.sync(params))
        return feeds

    def trained_params(self) -> Dict[str, np.ndarray]:
        """The graph's trainable inputs, `manifest.trainable_names`: the state's own tensors here
        (runtime/gates.py derives them from a few gates)."""
        return self.state.params

    def _state_grads(self, outputs: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        """The step graph's gradient outputs, keyed by the state's tensors."""
        return dict(zip(self.names, outputs))

    def _lr_groups(self) -> List[Tuple[Dict[str, np.ndarray], float]]:
        """(state tensors, learning rate) groups of one optimizer step."""
        return [(self.state.params, self.lr)]

    def train_step(self, batch: Sequence[np.ndarray]) -> Tuple[float, np.ndarray]:
        """Forward + backward on one micro-batch; its gradients are added to the accumulator,
        weighted by its size (so the update uses the mean gradient of the effective batch)."""
        out = self._run_step(self._feeds(batch))
        n = len(batch[-1])
        for name, g in self._state_grads(out[2:]).items():
            self._grad_sum[name] += np.float32(n) * g
        self._grad_count += n
        return float(out[0]), out[1]

    def reset_grad(self) -> None:
        self._grad_sum = {n: np.zeros_like(a) for n, a in self.state.params.items()}
        self._grad_count = 0

    def optimizer_step(self) -> None:
        if not self._grad_count:
            return
        grads = {n: g / np.float32(self._grad_count) for n, g in self._grad_sum.items()}
        self.state.updates += 1
        for params, lr in self._lr_groups():
            self.optimizer.step(params, grads, self.state.m, self.state.v, self.state.updates, lr)
        self.reset_grad()

    def eval_step(self, batch: Sequence[np.ndarray]) -> Tuple[float, np.ndarray]:
        if self._eval is None:
            self._eval = ShapeAwareRun(open_session(self.dir / B.EVAL_MODEL, self.threads, self.providers,
                                                    initializers=self.weights, config=READ_IN_PLACE))
        loss, logits = self._eval(self._feeds(batch))[:2]
        return float(loss), logits

    def close_eval(self) -> None:
        """Release the eval session (its memory) until the next eval."""
        self._eval = None
