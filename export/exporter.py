"""Host export: ingest -> (head) -> calibrate -> score/allocate -> rewrite -> backward (ORT) -> lower
-> standard-ONNX step/eval graphs + shared weights -> bundle."""
from __future__ import annotations

import copy
import datetime as _dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from taskedge.runtime import bundle as B
from taskedge.runtime.fsutil import UserError, staged_dir
from taskedge.runtime.optim import AdamW
from taskedge.runtime.specs import check_arrays, graph_input_specs

from . import importance as imp
from .artifacts import build, generate_ort_artifacts, prepare_for_training  # noqa: F401 (baselines import these)
from .calibrate import activation_norms, output_shapes
from .compose import check_base as check_union_base, read_allocations, union_indices
from .gradients import gradient_magnitudes
from .config import ExportConfig
from .ingest import ingest
from .layers import count_weights, filter_ops, find_weight_ops, initializer_arrays
from .backward import sparsify_backward
from .graph import MIN_OPSET, ensure_opset, opset_of, unshare_initializers
from .head import POOLS, add_head, select_output
from .updates import FORMULATIONS, insert_updates
from .live import live_weights
from .stepgraph import eval_graph, grad_names, step_graph, store_weights


def _log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def versions() -> Dict[str, str]:
    from taskedge.runtime.ort import onnxruntime
    from importlib import metadata
    try:
        te = metadata.version("taskedge")
    except metadata.PackageNotFoundError:
        te = "0+unknown"
    return {"taskedge": te, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def load_npz(path, what: str = "calibration data") -> Dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
        raise UserError(f"{p}: not a readable .npz ({type(e).__name__}: {e})") from None


def lm_calibration(path, meta: dict) -> Dict[str, np.ndarray]:
    """A causal LM's calibration data: prompt/answer JSONL (encoded as the board will) or .npz."""
    if not str(path).endswith((".jsonl", ".json")):
        return load_npz(path)
    from taskedge.runtime import lm
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp, "tokenizer.json")
        tok.write_text(meta["tokenizer_text"], encoding="utf-8")
        ds = lm.load_jsonl(Path(path), lm.Encoder(tok, meta["preprocessing"]))
    return {**ds.inputs, B.LABELS_INPUT: ds.labels}


def calibration_batches(arrays: Dict[str, np.ndarray], names: List[str], batch_size: int,
                        max_batches: int) -> Iterator[Dict[str, np.ndarray]]:
    n = len(next(iter(arrays[x] for x in names)))
    for i, start in enumerate(range(0, n, batch_size)):
        if i >= max_batches:
            break
        yield {k: arrays[k][start:start + batch_size] for k in names}


def validate(cfg: ExportConfig) -> Optional[tuple]:
    """Check the flags before any work; returns the parsed N:M (or None)."""
    try:
        imp.budget_entries(cfg.budget, 1)
        nm = imp.parse_nm(cfg.nm)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.lora_rank is not None and cfg.lora_rank < 1:
        raise UserError(f"bad --lora-rank {cfg.lora_rank}: must be >= 1")
    if cfg.head_only and not cfg.num_classes:
        raise UserError("--head-only needs --num-classes (the new head is what gets trained)")
    if cfg.num_classes is not None and cfg.num_classes < 2:
        raise UserError(f"bad --num-classes {cfg.num_classes}: need at least 2")
    if cfg.pool is not None and cfg.pool not in POOLS:
        raise UserError(f"bad --pool {cfg.pool!r}: use one of {', '.join(POOLS)}")
    if cfg.union_of and (cfg.lora_rank or nm or cfg.head_only):
        raise UserError("--union-of mixes plain per-entry deltas: drop --lora-rank, --nm and --head-only")
    for op, form in cfg.formulation.items():
        if op not in ("MatMul", "Gemm", "Conv") or form not in FORMULATIONS:
            raise UserError(f"bad --formulation {op}={form}: use MatMul|Gemm|Conv = {'|'.join(FORMULATIONS)}")
    return nm


def _no_ops_message(model: onnx.ModelProto, candidates, cfg: ExportConfig, skip: set) -> str:
    """Why nothing is left to adapt: the filters, or weights only in ops TaskEdge does not adapt."""
    if candidates:
        return f"no weight-bearing op left after --include {cfg.include} --exclude {cfg.exclude}"
    inits = {t.name for t in model.graph.initializer if len(t.dims) >= 2} - skip
    other = sorted({n.op_type for n in model.graph.node if any(i in inits for i in n.input)})
    return ("no layer TaskEdge can adapt: it adapts MatMul, Gemm and Conv weights"
            + (f"; this model's other weights are in {', '.join(other)} nodes" if other else "")
            + " (the new head alone trains with --head-only)")


def export_bundle(cfg: ExportConfig, log: Callable[[str], None] = _log) -> B.Manifest:
    t0 = time.perf_counter()
    nm = validate(cfg)
    src = ingest(cfg.model, cfg.gguf)
    lm = src.meta.get("task") == "causal_lm"
    calib = (lm_calibration(cfg.calib, src.meta) if lm else load_npz(cfg.calib)) if cfg.calib else None
    model = src.model
    log(f"loaded {src.name}: {len(model.graph.node)} nodes, {len(model.graph.initializer)} initializers")
    if opset_of(model) < MIN_OPSET:
        log(f"upgrading opset {opset_of(model)} -> {MIN_OPSET} (onnx version converter)")
        try:
            model = ensure_opset(model)
        except Exception as e:  # the converter raises RuntimeError/ValueError on ops it cannot adapt
            raise UserError(f"{cfg.model}: opset {opset_of(model)} could not be upgraded to {MIN_OPSET} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); export the model at opset "
                            f">= {MIN_OPSET}") from None
    copies = unshare_initializers(model)
    if copies:
        log(f"{len(copies)} consumers of shared initializers got their own copy (each weight op adapts on its own)")

    all_ops = find_weight_ops(model)
    if not all_ops:
        raise UserError(f"{cfg.model}: no weight-bearing op (MatMul/Gemm/Conv with a weight initializer); "
                        "TaskEdge has nothing to adapt")
    specs = graph_input_specs(model)
    if calib is not None:
        check_arrays(specs, calib, str(cfg.calib))
    elif src.example is not None:
        log("warning: no --calib given; calibrating on the factory's example input (not task-aware)")
        calib = src.example
    else:
        raise UserError("no calibration data: give --calib DATA.npz with arrays named after the model inputs "
                        f"{[s.name for s in specs]}")

    if lm:
        if cfg.num_classes or cfg.head_only or cfg.output or cfg.pool:
            raise UserError("a causal LM trains on next tokens: drop --num-classes/--head-only/--output/--pool")
    else:
        shapes = output_shapes(model, next(calibration_batches(calib, [s.name for s in specs], cfg.batch_size, 1)))
        _, features = select_output(model, shapes, cfg.output, cfg.pool)
    head = add_head(model, cfg.num_classes, cfg.seed, features) if cfg.num_classes else None
    head_params = set(head["params"]) if head else set()
    num_weights = count_weights(model, exclude=head_params)
    frozen = head_params | set(src.meta.get("frozen", ()))       # a causal LM's embedding and LM head
    candidates = [op for op in find_weight_ops(model) if op.weight not in frozen]
    for flag, pattern in [("--include", p) for p in cfg.include] + [("--exclude", p) for p in cfg.exclude]:
        if not filter_ops(candidates, [pattern]):
            raise UserError(f"{flag} {pattern!r} matches no layer or weight; names look like "
                            f"{candidates[0].name!r} / {candidates[0].weight!r} (see `taskedge inspect`)"
                            if candidates else f"{flag} {pattern!r}: the model has no weight op")
    ops = filter_ops(candidates, cfg.include, cfg.exclude)
    union, union_info = read_allocations(cfg.union_of) if cfg.union_of else (None, [])
    if union is not None:                   # only the layers the given tasks adapt: those their deltas mix in
        ops = [op for op in ops if op.weight in union]
        if not ops:
            raise UserError("--union-of: none of the given tasks' layers is left after --include/--exclude")
    if cfg.head_only:
        ops = []
    elif not ops:
        raise UserError(_no_ops_message(model, candidates, cfg, head_params | frozen))

    budget = imp.budget_entries(cfg.budget, num_weights)
    rows_total = sum(op.rows for op in ops)
    per_neuron = bool(ops) and not cfg.lora_rank and union is None     # entries given out one input per neuron
    floor = imp.floored(budget, rows_total, cfg.min_entries) if per_neuron else budget
    if floor > budget:
        log(f"budget {cfg.budget} of {num_weights} weights = {budget} entries, raised to {floor} "
            f"({100 * floor / num_weights:.2g} %): one input per neuron, at most --min-entries {cfg.min_entries}")
        budget = floor
    k = imp.per_row_k(budget, [op.rows for op in ops])
    # below one entry per neuron: the same share of neurons in every layer trains its best input
    share = budget / rows_total if per_neuron and rows_total > budget else None
    if share is not None and budget < len(ops):
        log(f"warning: budget {cfg.budget} of {num_weights} weights = {budget} entries, fewer than the {len(ops)} "
            f"layers: each layer still trains its best input of one neuron ({len(ops)} entries, "
            f"{100 * len(ops) / num_weights:.3g} %); --budget or --exclude to choose otherwise")

    indices: Dict[str, np.ndarray] = {}
    trained_rows: Dict[str, np.ndarray] = {}
    if ops:
        names = [s.name for s in specs]
        t = time.perf_counter()
        norms = activation_norms(model, ops, calibration_batches(calib, names, cfg.batch_size, cfg.calib_batches),
                                 source=str(cfg.calib or "example input"))
        log(f"calibrated {len(ops)} layers on {min(cfg.calib_batches, -(-len(calib[names[0]]) // cfg.batch_size))} "
            f"batches in {time.perf_counter() - t:.1f}s")
        weights = initializer_arrays(model, [op.weight for op in ops])
        grads = {}
        if cfg.selection == "gradient":
            t = time.perf_counter()
            labelled = names + ([B.LABELS_INPUT] if B.LABELS_INPUT in calib else [])
            grads = gradient_magnitudes(model, ops, sorted(head_params), calibration_batches(
                calib, labelled, cfg.batch_size, cfg.calib_batches))
            log(f"gradient magnitudes of {len(ops)} layers on the calibration data in {time.perf_counter() - t:.1f}s")
        rng = np.random.default_rng(cfg.seed)
        for op in ops:
            scores = imp.selection_scores(cfg.selection, op.rows_view(weights[op.weight]),
                                          op.row_norms(norms[op.activation]), rng,
                                          op.rows_view(grads[op.weight]) if grads else None)
            indices[op.weight] = union_indices(scores, union[op.weight]) if union is not None else \
                imp.select_topk(scores, k, nm)
            if share is not None:
                trained_rows[op.weight] = imp.top_rows(scores, round(share * op.rows))
        if union is not None:
            log(f"allocated the union of {len(cfg.union_of)} tasks' entries over {len(ops)} layers, topped up to "
                f"k={min(v.shape[1] for v in indices.values())}..{max(v.shape[1] for v in indices.values())}")
        elif share is None:
            log(f"allocated k={k} inputs per output neuron over {len(ops)} layers ({rows_total} neurons)")
        else:
            log(f"budget below one input per neuron: {100 * share:.1f} % of the neurons in each of {len(ops)} layers "
                f"({sum(map(len, trained_rows.values()))} of {rows_total}, chosen by importance) train one input each")

    base = copy.deepcopy(model)
    table = insert_updates(model, ops, indices, cfg.formulation, cfg.lora_rank, cfg.seed, trained_rows)
    prepare_for_training(model)
    loss_block = None
    if lm:
        from .causal_lm import answer_head, sequence_loss
        loss_block = sequence_loss(answer_head(model))
    trainable = [p for row in table for p in row.params] + (list(head["params"]) if head else [])
    if not trainable:
        raise UserError("nothing to train: no selected layers and no new head")
    update_params = sum(row.trainable for row in table)

    manifest = B.Manifest(
        model_name=src.name, inputs=specs, logits=model.graph.output[0].name,
        num_classes=int(src.meta["vocab_size"] if lm else cfg.num_classes or _num_classes(base)),
        num_weights=num_weights,
        method={"name": "taskedge", "budget": cfg.budget, "k": int(k) if ops else 0,
                "nm": list(nm) if nm else None, "selection": cfg.selection, "lora_rank": cfg.lora_rank, "head_only": cfg.head_only,
                "neuron_share": share, "entries": budget, "min_entries": cfg.min_entries,
                "include": cfg.include, "exclude": cfg.exclude, "lr": cfg.lr, "seed": cfg.seed,
                **({"union_of": union_info} if union_info else {}),
                "calibration": {"source": str(cfg.calib) if cfg.calib else "example",
                                "batches": cfg.calib_batches, "batch_size": cfg.batch_size}},
        layers=table, update_params=update_params, head=head,
        preprocessing=dict(src.meta.get("preprocessing", {})), versions=versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    with staged_dir(cfg.out) as tmp:
        log(f"deriving the backward graph with ORT's gradient builder ({len(trainable)} trainable tensors)")
        t = time.perf_counter()
        training, _ = build(model, trainable, cfg.ort_reference, loss_block, [manifest.logits] if lm else None,
                            structure_only=lm)
        if not cfg.dense_backward and indices:
            n = sparsify_backward(training, table, indices)
            log(f"sparse backward: {n} of {len(table)} layers compute their gradient at the used columns only")
        if cfg.ort_reference:       # ORT-training's own path on the very graph that gets lowered
            onnx.save(training, os.path.join(cfg.ort_reference, "training_model.onnx"))
        values = {t.name: t for t in model.graph.initializer}
        data = [s.name for s in specs] + [B.LABELS_INPUT]
        loss = training.graph.output[0].name
        counts = step_graph(training, data, trainable, loss, manifest.logits, values)
        n_live = 0 if cfg.built_weights else live_weights(training, table)
        if n_live:
            log(f"live weights: {n_live} of {len(table)} layers read W' = W + delta as an input the runtime keeps")
        evaluation = eval_graph(training)
        log(f"step graph in standard ONNX ({len(training.graph.node)} nodes; lowered "
            f"{', '.join(f'{k} x{v}' for k, v in sorted(counts.items())) or 'nothing'}) "
            f"in {time.perf_counter() - t:.1f}s")
        manifest.step = B.StepSpec(loss=loss, logits=manifest.logits, grads=grad_names(training),
                                   lowered_ops=counts, optimizer=AdamW().to_dict())
        decode = src.meta.get("decode_model")       # a causal LM's KV-cache graph (export/lm_decode.py)
        extra = ((B.DECODE_MODEL, decode),) if decode is not None else ()
        manifest.weights = store_weights([base, training, evaluation] + [g for _, g in extra], tmp, everything_of=base,
                                         task_own=head_params)
        for name, graph in ((B.STEP_MODEL, training), (B.EVAL_MODEL, evaluation), (B.BASE_MODEL, base)) + extra:
            onnx.save(graph, str(tmp / name))
        np.savez_compressed(tmp / B.INITIAL_STATE, **{n: numpy_helper.to_array(values[n]) for n in trainable})
        np.savez_compressed(tmp / B.ALLOCATION, **{k: v.astype(np.uint16 if v.max(initial=0) < 65536 else np.int32)
                                        for k, v in indices.items()})   # smallest index type on disk
        files = list(B.REQUIRED_FILES) + [name for name, _ in extra]
        tok = src.meta.get("tokenizer")
        if tok:
            shutil.copyfile(tok, tmp / B.TOKENIZER)
        elif src.meta.get("tokenizer_text"):        # a causal LM's tokenizer, converted by transformers
            (tmp / B.TOKENIZER).write_text(src.meta["tokenizer_text"], encoding="utf-8")
        if (tmp / B.TOKENIZER).is_file():
            files.append(B.TOKENIZER)
        manifest.files = B.hash_files(tmp, files)
        check_union_base(union_info, B.base_id(manifest))
        manifest.save(tmp)
    log(f"wrote {cfg.out}: {update_params} update + {manifest.head_params} head parameters "
        f"({100 * manifest.update_share:.4f} % of {num_weights} weights) in {time.perf_counter() - t0:.1f}s")
    return manifest


def _num_classes(model: onnx.ModelProto) -> int:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") else 0

