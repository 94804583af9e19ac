"""Just enough of the ONNX protobuf wire format for the board to write a merged model without
the `onnx` package: drop a graph's initializers, and append new ones.

Protobuf merges a repeated embedded message field that appears twice, so
`ModelProto bytes + field 7 (graph) { field 5 (initializer) TensorProto ... }` is the same
model with more initializers. Field numbers are from onnx.proto (IR version 3 onwards).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Set, Tuple

import numpy as np

MODEL_GRAPH = 7
GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 5, 15
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 8, 9
TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 13, 14
EXTERNAL = 1
DATA_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7, "bool": 9,
              "float16": 10, "float64": 11, "uint32": 12, "uint64": 13}


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1                      # negative int64 as two's complement, as protobuf does
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated protobuf (varint)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def fields(buf) -> Iterator[Tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each top-level field, end exclusive, start at its tag."""
    buf = memoryview(buf)
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf")
        yield number, wire, start, pos


def _payload(buf: memoryview, start: int) -> memoryview:
    _, pos = _read_varint(buf, start)
    n, pos = _read_varint(buf, pos)
    return buf[pos:pos + n]


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _tensor_name(tensor: memoryview) -> str:
    return next((bytes(_payload(tensor, s)).decode("utf-8") for n, w, s, _ in fields(tensor)
                 if n == TENSOR_NAME and w == 2), "")


def strip_initializers(model: bytes, only: Optional[Set[str]] = None) -> bytes:
    """The model with every (sparse) initializer of its main graph removed (with `only`: the
    initializers of those names; the others stay)."""
    buf = memoryview(model)
    out = bytearray()
    for number, wire, start, end in fields(buf):
        if number == MODEL_GRAPH and wire == 2:
            graph = _payload(buf, start)
            kept = b"".join(bytes(graph[s:e]) for n, _, s, e in fields(graph)
                            if n not in (GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER) or
                            (only is not None and n == GRAPH_INITIALIZER and _tensor_name(_payload(graph, s)) not in only))
            out += _field(MODEL_GRAPH, kept)
        else:
            out += buf[start:end]
    return bytes(out)


def tensor(name: str, array: np.ndarray, external: Optional[Tuple[str, int]] = None) -> bytes:
    """A TensorProto: raw little-endian data inline, or a reference (location, offset) to external data."""
    dtype = np.dtype(array.dtype).name
    if dtype not in DATA_TYPES:
        raise ValueError(f"tensor {name!r}: dtype {dtype} has no ONNX type here")
    out = bytearray()
    for d in array.shape:
        out += _varint_field(TENSOR_DIMS, int(d))
    out += _varint_field(TENSOR_DATA_TYPE, DATA_TYPES[dtype])
    out += _field(TENSOR_NAME, name.encode("utf-8"))
    if external is None:
        out += _field(TENSOR_RAW_DATA, np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
    else:
        location, offset = external
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
            out += _field(TENSOR_EXTERNAL_DATA, _field(1, key.encode()) + _field(2, value.encode()))
        out += _varint_field(TENSOR_DATA_LOCATION, EXTERNAL)
    return bytes(out)


def with_initializers(model: bytes, tensors: List[bytes]) -> bytes:
    """`model` plus the given encoded TensorProtos as initializers of its main graph."""
    return model + _field(MODEL_GRAPH, b"".join(_field(GRAPH_INITIALIZER, t) for t in tensors))
