"""TaskEdge device runtime: loads a bundle and adapts it on the board with plain onnxruntime
(an InferenceSession on the bundle's standard-ONNX step graph). Never imports torch, onnx or
onnxruntime.training.

On the host, where the onnxruntime-training wheel provides the `onnxruntime` module, a plain
`import onnxruntime` probes `onnxruntime.training.ortmodule`, whose package imports torch when
torch is installed (DESIGN.md). So the runtime imports onnxruntime with that probe blocked;
`onnxruntime.training` stays importable afterwards for host code. On a board this is a no-op.
"""
import sys as _sys


def _import_onnxruntime_without_torch() -> None:
    if "onnxruntime" in _sys.modules:
        return
    block = "onnxruntime.training" not in _sys.modules
    if block:
        _sys.modules["onnxruntime.training"] = None  # makes the probe raise ImportError, which ORT handles
    try:
        import onnxruntime  # noqa: F401
    finally:
        if block and _sys.modules.get("onnxruntime.training", 0) is None:
            del _sys.modules["onnxruntime.training"]


_import_onnxruntime_without_torch()
