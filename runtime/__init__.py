"""TaskEdge device runtime: loads a bundle and adapts it on the board. Never imports torch.

`import onnxruntime` of the onnxruntime-training wheel probes
`onnxruntime.training.ortmodule`, whose package imports torch when torch is installed
(DESIGN.md). The runtime talks to the pybind layer only, so it imports onnxruntime with
that probe blocked; `onnxruntime.training` stays importable afterwards for host code.
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
