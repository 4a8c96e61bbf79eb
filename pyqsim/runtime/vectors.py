"""Golden test vectors for hardware: every recorded integer op as .npz and as $readmemh hex files.

Layout of a vectors folder: ``manifest.json`` plus, per layer ``i``, ``L{i:04d}.npz`` and one hex file per
array (``L{i:04d}_{field}.hex``: one word per line, row-major, two's complement for signed integers,
IEEE-754 bits for float32). The manifest gives each array's dtype, shape and word width, and the op's
scalar parameters, so a testbench (or :func:`recompute_layer`) needs nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .. import _checks as C
from .. import ops

MANIFEST_VERSION = 1
_WORD_BITS = {"int8": 8, "uint8": 8, "int32": 32, "int64": 64, "float32": 32}
_ARG_CLASSES = {
    "int_gemm": C.GemmArgs, "int_conv2d": C.ConvArgs, "split_gemm": C.SplitGemmArgs,
    "split_conv2d": C.SplitConvArgs, "log2_attn_matmul": C.Log2AttnArgs, "requantize": C.RequantArgs,
    "int_bmm": C.BmmArgs,
}
_NESTED = {
    (C.GemmArgs, "out"): C.OutStage, (C.ConvArgs, "out"): C.OutStage, (C.Log2AttnArgs, "out"): C.OutStage,
    (C.RequantArgs, "out"): C.OutStage, (C.SplitGemmArgs, "a"): C.GemmArgs, (C.SplitGemmArgs, "b"): C.GemmArgs,
    (C.SplitGemmArgs, "out"): C.SplitOutStage, (C.SplitConvArgs, "a"): C.ConvArgs,
    (C.SplitConvArgs, "b"): C.ConvArgs, (C.SplitConvArgs, "out"): C.SplitOutStage, (C.BmmArgs, "out"): C.OutStage,
}
_NOT_STORED = ("w_packed",)  # prepacked weights: a cache of the stored weight, rebuilt on replay


def flatten(args, prefix: str = "") -> tuple[dict, dict]:
    """Split canonical args into (arrays, scalars), keyed by dotted field path."""
    arrays, scalars = {}, {}
    for f in dataclasses.fields(args):
        if f.name in _NOT_STORED:
            continue
        v = getattr(args, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(v):
            a, s = flatten(v, key + ".")
            arrays.update(a)
            scalars.update(s)
        elif isinstance(v, np.ndarray):
            arrays[key] = v
        else:
            scalars[key] = list(v) if isinstance(v, tuple) else v
    return arrays, scalars


def unflatten(cls, arrays: dict, scalars: dict, prefix: str = ""):
    """Rebuild canonical args of ``cls`` from :func:`flatten` output."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in _NOT_STORED:
            continue
        key = prefix + f.name
        sub = _NESTED.get((cls, f.name))
        if sub is not None:
            values[f.name] = unflatten(sub, arrays, scalars, key + ".")
        elif key in arrays:
            values[f.name] = np.ascontiguousarray(arrays[key])
        else:
            v = scalars[key]
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def to_hex(a: np.ndarray) -> str:
    """One hex word per line, row-major; width from the dtype."""
    name = a.dtype.name
    if name not in _WORD_BITS:
        raise TypeError(f"no hex word format for dtype {a.dtype}")
    bits = _WORD_BITS[name]
    if name == "float32":
        words = a.reshape(-1).view(np.uint32).astype(np.uint64)
    else:
        words = a.reshape(-1).astype(np.int64).astype(np.uint64) & np.uint64((1 << bits) - 1 if bits < 64 else 2**64 - 1)
    digits = bits // 4
    return "".join(f"{int(w):0{digits}x}\n" for w in words)


def from_hex(text: str, dtype: str, shape) -> np.ndarray:
    """Parse :func:`to_hex` output back to an array of ``dtype`` and ``shape``."""
    bits = _WORD_BITS[dtype]
    words = [int(line, 16) for line in text.split()]
    if len(words) != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"hex file has {len(words)} words, expected {int(np.prod(shape))} for shape {shape}")
    if dtype == "float32":
        return np.array(words, np.uint32).view(np.float32).reshape(shape)
    if dtype in ("int8", "int32", "int64"):
        words = [w - (1 << bits) if w >> (bits - 1) else w for w in words]
    return np.array(words, dtype=dtype).reshape(shape)


def write_vectors(calls: list, out_dir, meta: dict | None = None) -> dict:
    """Write recorded ``(scope, op, args, result)`` calls as golden vectors; returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    layers = []
    for i, (scope_name, op, args, result) in enumerate(calls):
        arrays, scalars = flatten(args)
        arrays = {f"in.{k}": v for k, v in arrays.items()}
        arrays["out"] = np.ascontiguousarray(result)
        stem = f"L{i:04d}"
        np.savez(os.path.join(out_dir, stem + ".npz"), **arrays)
        files = {}
        for key, arr in arrays.items():
            fname = f"{stem}_{key.replace('.', '_')}.hex"
            with open(os.path.join(out_dir, fname), "w") as fh:
                fh.write(to_hex(arr))
            files[key] = {"hex": fname, "dtype": arr.dtype.name, "shape": list(arr.shape),
                          "word_bits": _WORD_BITS[arr.dtype.name]}
        layers.append({"index": i, "scope": scope_name, "op": op, "npz": stem + ".npz", "arrays": files,
                       "params": scalars})
    manifest = {"format": "pyqsim-vectors", "version": MANIFEST_VERSION, "spec": "docs/spec.md",
                "meta": meta or {}, "layers": layers}
    with open(os.path.join(out_dir, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return manifest


def load_layer_from_hex(layer: dict, folder) -> tuple[object, np.ndarray]:
    """(canonical args, expected output) of one manifest layer, read from its hex files only."""
    arrays = {}
    for key, f in layer["arrays"].items():
        with open(os.path.join(folder, f["hex"])) as fh:
            arrays[key] = from_hex(fh.read(), f["dtype"], tuple(f["shape"]))
    expected = arrays.pop("out")
    inputs = {k[3:]: v for k, v in arrays.items()}
    return unflatten(_ARG_CLASSES[layer["op"]], inputs, layer["params"]), expected


def recompute_layer(layer: dict, folder, backend: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """(recomputed, expected) outputs of one layer from its hex files."""
    args, expected = load_layer_from_hex(layer, folder)
    return ops.run_canonical(layer["op"], args, backend), expected
