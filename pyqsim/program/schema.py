"""Node-kind declarations of the program format (docs/program.md): one schema per kind, checked at load.

A kind declares its positional arguments (each a value reference or a literal of a stated type), its
attributes, the tensors it reads from the file, and its reference semantics (``run``). Nothing here
imports PyTorch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from ..runtime.paramfile import ParamFileError

# argument / attribute types
TENSOR, INT, INTS, FLOAT, SCALAR, BOOL, STR, ANY, TENSORS, OPT_TENSOR, OPT_INT, OPT_INTS, OPT_FLOAT = (
    "tensor", "int", "ints", "float", "scalar", "bool", "str", "any", "tensors", "tensor?", "int?", "ints?", "float?")

DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8,
          "bool": np.bool_, "float64": np.float64, "int16": np.int16}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor a node reads from the file: allowed dtypes and rank (None: any)."""

    dtypes: tuple
    ndim: int | None = None
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Kind:
    """One node kind: its schema and its reference semantics."""

    name: str
    args: tuple  # ((name, type, default or REQUIRED), ...)
    attrs: dict  # name -> (type, default or REQUIRED, allowed values or None)
    tensors: dict  # name -> TensorSpec
    run: Callable
    integer: bool = False  # an integer op of pyqsim.ops (counted by describe/cost)
    check: Callable | None = None  # extra consistency check(node_name, attrs, tensors) at load
    doc: str = ""


REQUIRED = object()
KINDS: dict[str, Kind] = {}


def kind(name, args=(), attrs=None, tensors=None, integer=False, check=None):
    """Register ``fn(args, attrs, tensors, ctx)`` as the semantics of node kind ``name``."""
    def deco(fn):
        if name in KINDS:
            raise RuntimeError(f"node kind {name!r} declared twice")
        spec = tuple(a if len(a) == 3 else (a[0], a[1], REQUIRED) for a in args)
        schema = dict(attrs or {})
        if not integer:  # float/shape kinds record the output dtype the captured graph gave them
            schema["dtype"] = (STR, None, tuple(DTYPES))
        KINDS[name] = Kind(name, spec, schema, dict(tensors or {}), fn, integer, check,
                           (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return deco


# --------------------------------------------------------------------------- JSON encoding of arguments

def is_ref(v) -> bool:
    return isinstance(v, dict) and set(v) == {"@"} and isinstance(v["@"], str)


def encode_float(v: float):
    """JSON form of a float (inf/nan as tagged strings)."""
    if math.isfinite(v):
        return float(v)
    return {"float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}


def decode_literal(v):
    if isinstance(v, dict) and set(v) == {"float"}:
        return float(v["float"])
    if isinstance(v, list):
        return [decode_literal(x) for x in v]
    return v


def refs_in(v):
    """Value names referenced inside an argument (nested lists included)."""
    if is_ref(v):
        yield v["@"]
    elif isinstance(v, list):
        for x in v:
            yield from refs_in(x)


def _literal_ok(t: str, v) -> bool:
    v = decode_literal(v)
    isint = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if t in (INT, OPT_INT):
        return isint or (t == OPT_INT and v is None)
    if t in (INTS, OPT_INTS):
        return (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)) or (
            t == OPT_INTS and v is None)
    if t in (FLOAT, OPT_FLOAT):
        return isinstance(v, (int, float)) and not isinstance(v, bool) or (t == OPT_FLOAT and v is None)
    if t == SCALAR:
        return isinstance(v, (int, float, bool))
    if t == BOOL:
        return isinstance(v, bool)
    if t == STR:
        return isinstance(v, str)
    if t in (TENSOR, TENSORS):
        return False
    if t == OPT_TENSOR:
        return v is None
    return True  # ANY


def _arg_ok(t: str, v) -> bool:
    if is_ref(v):
        return True
    if isinstance(v, list) and t in (INTS, OPT_INTS, TENSORS, ANY):
        return all(is_ref(x) or t == ANY or (t in (INTS, OPT_INTS) and _literal_ok(INT, x)) for x in v)
    return _literal_ok(t, v)


def validate_node(node, defined: set, tensors: dict, where: str) -> None:
    """Check one node against its kind's schema; ``defined`` holds the value names available so far."""
    if not isinstance(node, dict):
        raise ParamFileError(f"{where}: node entry must be an object, got {type(node).__name__}")
    name = node.get("name")
    if not isinstance(name, str) or not name:
        raise ParamFileError(f"{where}: node has no name")
    k = KINDS.get(node.get("kind"))
    if k is None:
        raise ParamFileError(f"{where}: node {name!r} has unknown kind {node.get('kind')!r}")
    args, attrs, tmap = node.get("args", []), node.get("attrs", {}), node.get("tensors", {})
    if not isinstance(args, list) or not isinstance(attrs, dict) or not isinstance(tmap, dict):
        raise ParamFileError(f"{where}: node {name!r}: args must be a list, attrs and tensors objects")
    need = sum(1 for _, _, d in k.args if d is REQUIRED)
    if not need <= len(args) <= len(k.args):
        raise ParamFileError(f"{where}: node {name!r} ({k.name}) takes {need}..{len(k.args)} arguments, got {len(args)}")
    for (an, at, _), v in zip(k.args, args):
        if not _arg_ok(at, v):
            raise ParamFileError(f"{where}: node {name!r} ({k.name}) argument {an!r} must be {at}, got {v!r}")
        for r in refs_in(v):
            if r not in defined:
                raise ParamFileError(f"{where}: node {name!r} ({k.name}) argument {an!r} refers to {r!r}, which is "
                                     "not an input or an earlier node (dangling edge or cycle)")
    for an in attrs:
        if an not in k.attrs:
            raise ParamFileError(f"{where}: node {name!r} ({k.name}) has unknown attribute {an!r}")
    for an, (at, default, allowed) in k.attrs.items():
        if an not in attrs:
            if default is REQUIRED:
                raise ParamFileError(f"{where}: node {name!r} ({k.name}) lacks attribute {an!r}")
            continue
        v = attrs[an]
        if not _literal_ok(at, v) or (allowed is not None and decode_literal(v) not in allowed):
            want = f"one of {list(allowed)}" if allowed is not None else at
            raise ParamFileError(f"{where}: node {name!r} ({k.name}) attribute {an!r} must be {want}, got {v!r}")
    for tn in tmap:
        if tn not in k.tensors:
            raise ParamFileError(f"{where}: node {name!r} ({k.name}) names unknown tensor slot {tn!r}")
    for tn, spec in k.tensors.items():
        key = tmap.get(tn)
        if key is None:
            if not spec.optional:
                raise ParamFileError(f"{where}: node {name!r} ({k.name}) lacks tensor {tn!r}")
            continue
        arr = tensors.get(key) if isinstance(key, str) else None
        if arr is None:
            raise ParamFileError(f"{where}: node {name!r} ({k.name}) tensor {tn!r} refers to {key!r}, "
                                 "which is not in the file")
        if spec.dtypes and arr.dtype not in tuple(np.dtype(d) for d in spec.dtypes):
            raise ParamFileError(f"{where}: node {name!r} ({k.name}) tensor {tn!r} has dtype {arr.dtype}, "
                                 f"expected one of {[np.dtype(d).name for d in spec.dtypes]}")
        if spec.ndim is not None and arr.ndim != spec.ndim:
            raise ParamFileError(f"{where}: node {name!r} ({k.name}) tensor {tn!r} has shape {list(arr.shape)}, "
                                 f"expected {spec.ndim} dimensions")
    if k.check is not None:
        try:
            k.check({a: decode_literal(v) for a, v in attrs.items()},
                    {tn: tensors[key] for tn, key in tmap.items() if key is not None})
        except (ValueError, TypeError, KeyError) as exc:
            raise ParamFileError(f"{where}: node {name!r} ({k.name}): {exc}") from None


def unique_name(base: str, taken: set, fallback: str = "n") -> str:
    """``base`` reduced to letters, digits and ``_.:-`` (200 characters at most) and made unique in ``taken``
    with a ``_1``, ``_2``, ... suffix; the name is added to ``taken``."""
    base = "".join(c if c.isalnum() or c in "_.:-" else "_" for c in base)[:200] or fallback
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
