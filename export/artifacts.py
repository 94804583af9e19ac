"""ORT's gradient builder (host only): the training and eval graphs of a rewritten model.

`structure_only` hands the builder the graph without the frozen weights: every float tensor of
at least `BIG` elements that is not trained becomes a graph input (its value stays in the caller's
model; stepgraph.py puts it back as an initializer). The builder then serialises megabytes, not
the model, so protobuf's 2 GB limit never applies, and it runs faster in less memory
(SmolLM2-135M: 1.8 s / 1.5 GB peak instead of 11 s / 4.4 GB).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

BIG = 1024          # elements: smaller tensors (shapes, axes, norms' epsilons) stay in the graph


def prepare_for_training(model: onnx.ModelProto) -> None:
    """Make the graph differentiable by ORT's gradient builder.

    LayerNormalization's gradient reads the saved Mean and InvStdDev, which torch.onnx
    leaves out (they are optional outputs); name them so the backward pass can use them.
    """
    for i, node in enumerate(model.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            base = node.name or f"layernorm_{i}"
            node.output.extend([f"{base}.taskedge_mean", f"{base}.taskedge_inv_std"])


def structure(model: onnx.ModelProto, keep=()) -> Tuple[onnx.ModelProto, Dict[str, onnx.TensorProto]]:
    """A copy of `model` whose big float initializers (not in `keep`) are graph inputs, and those
    initializers by name (the original protos, not copied). Nothing of `model` changes."""
    g = model.graph
    keep = set(keep)
    big = {t.name: t for t in g.initializer
           if t.name not in keep and t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= BIG}
    s = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(s, field, getattr(model, field))
    s.opset_import.extend(model.opset_import)
    s.graph.name = g.name
    s.graph.node.extend(g.node)
    s.graph.input.extend(g.input)
    declared = {i.name for i in g.input}
    s.graph.input.extend(helper.make_tensor_value_info(n, t.data_type, list(t.dims)) for n, t in big.items()
                         if n not in declared)
    s.graph.output.extend(g.output)
    s.graph.value_info.extend(g.value_info)
    s.graph.initializer.extend(t for t in g.initializer if t.name not in big)
    return s, big


def frozen_feeds(frozen: Dict[str, onnx.TensorProto]) -> Dict[str, np.ndarray]:
    """The values of `structure`'s weight inputs, as arrays to feed an onnxruntime session."""
    return {n: numpy_helper.to_array(t) for n, t in frozen.items()}


def generate_ort_artifacts(model: onnx.ModelProto, trainable: List[str], folder, loss=None,
                           loss_inputs: Optional[List[str]] = None) -> None:
    """ORT's gradient builder (host only): writes training_model.onnx, eval_model.onnx,
    optimizer_model.onnx and checkpoint into `folder` with only `trainable` differentiated.
    The bench's ORT-training peers run these files as they are; the exporter lowers them.
    `loss`: an onnxblock loss block over `loss_inputs` (default: cross-entropy on the first output)."""
    import onnxruntime
    from onnxruntime.training import artifacts

    inits = {t.name for t in model.graph.initializer}
    frozen = sorted(inits - set(trainable))
    onnxruntime.set_default_logger_severity(3)
    logging.getLogger().setLevel(logging.WARNING)
    kw = {"loss_input_names": loss_inputs} if loss_inputs else {}
    with quiet_native_stderr():   # the builder logs every graph transformer at INFO level
        artifacts.generate_artifacts(
            model, requires_grad=trainable, frozen_params=frozen,
            loss=loss if loss is not None else artifacts.LossType.CrossEntropyLoss,
            optimizer=artifacts.OptimType.AdamW, artifact_directory=str(folder),
            additional_output_names=[model.graph.output[0].name], **kw)


def build(model: onnx.ModelProto, trainable: List[str], keep: Optional[str] = None, loss=None,
          loss_inputs: Optional[List[str]] = None, structure_only: bool = False):
    """The training graph (forward + backward + loss) and the eval graph from ORT's builder;
    the artifact files are kept in `keep` if given. With `structure_only` the frozen weights are
    inputs of both graphs (stepgraph.py feeds them back)."""
    if structure_only:
        model, _ = structure(model, keep=trainable)
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or tmp
        os.makedirs(folder, exist_ok=True)
        generate_ort_artifacts(model, trainable, folder, loss, loss_inputs)
        return onnx.load(os.path.join(folder, "training_model.onnx")), \
            onnx.load(os.path.join(folder, "eval_model.onnx"))


@contextlib.contextmanager
def quiet_native_stderr():
    """Drop native INFO lines written to fd 2; replay anything else (warnings, errors)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            for line in buf.read().decode("utf-8", "replace").splitlines():
                if "[I:onnxruntime" not in line and line.strip():
                    print(line, file=sys.stderr)
