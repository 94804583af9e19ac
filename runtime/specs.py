"""Model input specs and the check that data fits them (host calibration and board data)."""
from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np

from .bundle import TensorSpec
from .fsutil import UserError

# onnx.TensorProto data types -> numpy names (the board reads these from the manifest, never from onnx)
_ONNX_TO_NP = {1: "float32", 11: "float64", 10: "float16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}


def graph_input_specs(model) -> List[TensorSpec]:
    """The data inputs of an onnx.ModelProto (host side: the exporter)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        specs.append(TensorSpec(vi.name, _ONNX_TO_NP.get(tt.elem_type, str(tt.elem_type)), dims))
    return specs


def check_arrays(specs: List[TensorSpec], arrays: Mapping[str, np.ndarray], source: str) -> None:
    """Raise a UserError naming `source` and the offending input if `arrays` cannot feed the model."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(f"{source}: no array named {missing[0]!r}; the model's inputs are {names} "
                        f"(found {sorted(arrays)})")
    for s in specs:
        a = arrays[s.name]
        if len(a.shape) != len(s.shape):
            raise UserError(f"{source}: {s.name!r} has shape {list(a.shape)} but the model wants rank "
                            f"{len(s.shape)} {s.shape}")
        for i, (got, want) in enumerate(zip(a.shape, s.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise UserError(f"{source}: {s.name!r} has shape {list(a.shape)} but the model wants {s.shape} "
                                f"(dimension {i} must be {want})")
        if np.dtype(a.dtype).name != s.dtype:
            if np.can_cast(a.dtype, s.dtype, casting="same_kind") and a.dtype.kind == np.dtype(s.dtype).kind:
                continue  # e.g. float64 -> float32 is converted by the loader
            raise UserError(f"{source}: {s.name!r} has dtype {a.dtype} but the model wants {s.dtype}")


def cast_to_specs(specs: List[TensorSpec], arrays: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {s.name: np.ascontiguousarray(arrays[s.name], dtype=s.dtype) for s in specs}
