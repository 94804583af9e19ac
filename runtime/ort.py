"""onnxruntime, imported the one way the runtime does it: `from taskedge.runtime.ort import onnxruntime`.

On the host, where the onnxruntime-training wheel provides the `onnxruntime` module, a plain
`import onnxruntime` probes `onnxruntime.training.ortmodule`, whose package imports torch when
torch is installed. This import blocks that probe (the runtime never loads torch);
`onnxruntime.training` stays importable afterwards for host code. On a board it is a plain import.
"""
import sys as _sys


def _import_without_torch():
    if "onnxruntime" in _sys.modules:
        return _sys.modules["onnxruntime"]
    block = "onnxruntime.training" not in _sys.modules
    if block:
        _sys.modules["onnxruntime.training"] = None  # makes the probe raise ImportError, which ORT handles
    try:
        import onnxruntime
    finally:
        if block and _sys.modules.get("onnxruntime.training", 0) is None:
            del _sys.modules["onnxruntime.training"]
    return onnxruntime


onnxruntime = _import_without_torch()
