"""Flags defined once: a dataclass field made with `flag(...)` IS its command-line flag.

`add_flags(parser, Options)` adds `--field-name` for every such field (type from the annotation:
bool -> store_true, List[X] -> repeatable, Optional[X] -> X), with the field's help and, where
there is one, "(default ...)" appended from the field's own default; `from_flags(Options, ns)`
builds the dataclass from the parsed namespace. A field without flag metadata is not a flag.
`check=` (e.g. `at_least(1)`, `FRACTION`, `POSITIVE`) refuses a bad value where it is parsed:
one line naming the flag, the value and what is allowed, exit 2 (`Parser`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from typing import Any, Callable, Dict, Optional

_MISSING = dataclasses.MISSING


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `taskedge adapt: error: argument --lr: ...`, exit 2."""

    def error(self, message: str):
        from .fsutil import one_line
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class Check:
    """A test on a parsed value and the words for what is allowed."""

    def __init__(self, test: Callable[[Any], bool], allowed: str):
        self.test, self.allowed = test, allowed


def at_least(n) -> Check:
    return Check(lambda v: v >= n, f"must be >= {n}")


POSITIVE = Check(lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
FRACTION = Check(lambda v: 0 < v <= 1, "must be a fraction in (0, 1], e.g. 0.001 for 0.1 %")


def _checked(convert: Callable, check: Optional[Check]) -> Callable:
    def parse(text: str):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if convert is int else 'a number'}")
        if check is not None and not check.test(value):
            raise argparse.ArgumentTypeError(f"{text!r} {check.allowed}")
        return value
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def arg_type(convert: Callable, check: Optional[Check] = None) -> Callable:
    """`type=` for a plain `add_argument`: convert (int, float, str, ...) and check where parsed,
    with the same one-line error as a `flag()` field."""
    return _checked(convert, check)


def out_path(kind: str) -> Check:
    """A path the command will create (kind "file" or "folder"): not an existing thing of the other
    kind, and its nearest existing parent a writable folder -- checked before any work is done."""
    def ok(text: str) -> bool:
        if not text or "\0" in text or not text.isprintable():
            return False
        p = os.path.abspath(text)
        if os.path.lexists(p) and os.path.isdir(p) != (kind == "folder"):
            return False
        where = p if os.path.isdir(p) else os.path.dirname(p)     # the folder written into
        while not os.path.lexists(where):
            where = os.path.dirname(where)
        return os.path.isdir(where) and os.access(where, os.W_OK | os.X_OK)
    return Check(ok, "cannot be written: give " + ("a file name (not a folder)" if kind == "file" else
                                                   "a new or existing folder") + ", printable, in a writable folder")


def flag(default: Any = _MISSING, help: str = "", *, choices=None, metavar: Optional[str] = None,
         positional: bool = False, default_factory: Any = _MISSING, show_default: bool = True,
         parse: Optional[Callable] = None, check: Optional[Check] = None) -> Any:
    """A dataclass field that is also a flag. `parse` converts the raw argparse value (after the
    type conversion) into the field's value, e.g. ["MatMul=gather"] -> {"MatMul": "gather"}."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "positional": positional,
            "show_default": show_default, "parse": parse, "check": check}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap(tp) -> tuple:
    """(scalar type, is_list) of an annotation such as Optional[List[str]] or int."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, typing.List):
        return (args[0] if args else str), True
    if origin in (dict, typing.Dict) or tp is dict:
        return str, True                                  # given as repeated KEY=VALUE, turned by `parse`
    return tp, False


def add_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        tp, repeat = _unwrap(hints[f.name])
        text = meta["help"].replace("%", "%%")
        if meta["show_default"] and f.default not in (_MISSING, None, False) and not repeat:
            text += f" (default {f.default})".replace("%", "%%")
        kw: Dict[str, Any] = {"help": text}
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if meta["positional"]:
            parser.add_argument(f.name, type=tp, **kw)
            continue
        if tp is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = _checked(tp, meta["check"]) if tp in (int, float) else tp
            if repeat:
                kw["action"] = "append"
        if f.default is _MISSING and f.default_factory is _MISSING:
            kw["required"] = True
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


def given(cls, ns: argparse.Namespace) -> Dict[str, Any]:
    """The flags of `cls` present in the namespace (not None), each through its field's `parse`."""
    out = {}
    for f in dataclasses.fields(cls):
        if "help" in f.metadata and getattr(ns, f.name, None) is not None:
            value = getattr(ns, f.name)
            out[f.name] = f.metadata["parse"](value) if f.metadata["parse"] else value
    return out


def from_flags(cls, ns: argparse.Namespace, **extra):
    return cls(**{**given(cls, ns), **extra})
