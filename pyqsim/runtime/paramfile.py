"""Integer-parameter files: safetensors layout + versioned JSON metadata + SHA-256 checksum.

Layout (readable by any safetensors reader): 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {"pyqsim": <json>, "sha256": <hex>}}``,
then the raw little-endian tensor bytes. The checksum covers the pyqsim metadata string and the data.
Nothing in a file is ever executed (no pickle); writes are atomic (temporary file, fsync, rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile

import numpy as np

FORMAT = "pyqsim-params"
VERSION = 2  # 2: a program graph (docs/program.md); 1: per-architecture steps, no longer read
MAX_HEADER_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,254}$")
_DTYPES = {
    "I8": np.dtype("<i1"), "U8": np.dtype("<u1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_KIND_CODES = {(v.kind, v.itemsize): k for k, v in _DTYPES.items()}


class ParamFileError(ValueError):
    """A parameter file that is malformed, corrupted, of another version, or inconsistent."""


def _check_name(name) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ParamFileError(
            f"tensor name {name!r} is invalid: use letters, digits and '_.:-' (no path separators), at most 255 characters"
        )


def _depth(obj, limit: int, level: int = 0) -> None:
    if level > limit:
        raise ParamFileError(f"metadata is nested deeper than {limit} levels")
    if isinstance(obj, dict):
        for v in obj.values():
            _depth(v, limit, level + 1)
    elif isinstance(obj, list):
        for v in obj:
            _depth(v, limit, level + 1)


def save_params(path, tensors: dict, meta: dict) -> None:
    """Write ``tensors`` (name -> ndarray) and JSON-serializable ``meta`` atomically to ``path``."""
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of name -> ndarray, got {type(tensors).__name__}")
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    header, chunks, offset, manifest = {}, [], 0, {}
    for name in sorted(tensors):
        _check_name(name)
        arr = tensors[name]
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a NumPy array, got {type(arr).__name__}")
        code = _KIND_CODES.get((arr.dtype.kind, arr.dtype.itemsize))
        if code is None:
            raise TypeError(f"tensor {name!r} has unsupported dtype {arr.dtype} (int8/uint8/int16/int32/int64/float32/float64)")
        data = np.ascontiguousarray(arr, dtype=_DTYPES[code]).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        manifest[name] = {"dtype": code, "shape": list(arr.shape)}
        chunks.append(data)
        offset += len(data)
    full_meta = dict(meta)
    full_meta.update(format=FORMAT, version=VERSION, tensors=manifest)
    _depth(full_meta, MAX_JSON_DEPTH)
    meta_json = json.dumps(full_meta, sort_keys=True, allow_nan=False, separators=(",", ":"))
    digest = hashlib.sha256(meta_json.encode())
    for c in chunks:
        digest.update(c)
    header["__metadata__"] = {"pyqsim": meta_json, "sha256": digest.hexdigest()}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pyqsim-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as a plain open() would create it (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _parse_json(raw: bytes, what: str):
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ParamFileError(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ParamFileError(f"{what} is not valid JSON: {exc}") from None


def _reject_constant(name):
    raise ParamFileError(f"metadata contains the non-standard JSON constant {name}")


def load_params(path) -> tuple[dict, dict]:
    """Read and verify a parameter file; returns (tensors, meta). Raises ParamFileError on any defect."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ParamFileError(f"{path}: truncated (shorter than the 8-byte header length)")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(blob):
        raise ParamFileError(f"{path}: header length {hlen} exceeds the file size or the {MAX_HEADER_BYTES}-byte limit (truncated?)")
    header = _parse_json(blob[8:8 + hlen], "header")
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ParamFileError(f"{path}: header has no __metadata__ object; not a pyqsim parameter file")
    md = header.pop("__metadata__")
    meta_json, sha = md.get("pyqsim"), md.get("sha256")
    if not isinstance(meta_json, str) or not isinstance(sha, str):
        raise ParamFileError(f"{path}: __metadata__ lacks the pyqsim metadata or its sha256")
    meta = _parse_json(meta_json.encode(), "metadata")
    if not isinstance(meta, dict):
        raise ParamFileError(f"{path}: metadata must be a JSON object")
    _depth(meta, MAX_JSON_DEPTH)
    if meta.get("format") != FORMAT:
        raise ParamFileError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("version")
    if version == 1:
        raise ParamFileError(f"{path}: written by an older pyqsim (format version 1, per-architecture steps); "
                             "this pyqsim runs programs (version 2): re-export the model with this version")
    if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
        raise ParamFileError(f"{path}: format version {version!r} is not supported (this pyqsim reads version {VERSION})")
    data = memoryview(blob)[8 + hlen:]
    digest = hashlib.sha256(meta_json.encode())
    spans = []
    for name, entry in header.items():
        _check_name(name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ParamFileError(f"{path}: tensor {name!r} entry must have exactly dtype, shape, data_offsets")
        dt = _DTYPES.get(entry["dtype"])
        shape, offs = entry["shape"], entry["data_offsets"]
        if dt is None:
            raise ParamFileError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)):
            raise ParamFileError(f"{path}: tensor {name!r} shape {shape!r} must be a list of non-negative ints")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise ParamFileError(f"{path}: tensor {name!r} data_offsets must be two ints")
        nbytes = dt.itemsize
        for s in shape:
            nbytes *= s
        if not (0 <= offs[0] <= offs[1] <= len(data)) or offs[1] - offs[0] != nbytes:
            raise ParamFileError(f"{path}: tensor {name!r} data_offsets {offs} disagree with its shape/dtype or the file size (truncated?)")
        spans.append((offs[0], offs[1], name, dt, shape))
    spans.sort()
    pos = 0
    for b, e, name, _, _ in spans:
        if b != pos:
            raise ParamFileError(f"{path}: tensor {name!r} data overlaps or leaves a gap at byte {pos}")
        pos = e
    if pos != len(data):
        raise ParamFileError(f"{path}: {len(data) - pos} trailing bytes after the last tensor")
    digest.update(data)
    if digest.hexdigest() != sha:
        raise ParamFileError(f"{path}: checksum mismatch (the file is corrupted or was modified)")
    manifest = meta.get("tensors")
    if not isinstance(manifest, dict):
        raise ParamFileError(f"{path}: metadata lacks the tensor manifest")
    names = {s[2] for s in spans}
    missing, extra = sorted(set(manifest) - names), sorted(names - set(manifest))
    if missing or extra:
        raise ParamFileError(f"{path}: tensors missing {missing} / not in the manifest {extra}")
    tensors = {}
    for b, e, name, dt, shape in spans:
        want = manifest[name]
        if not isinstance(want, dict) or want.get("dtype") != _CODES[dt] or want.get("shape") != shape:
            raise ParamFileError(f"{path}: tensor {name!r} is {_CODES[dt]}{shape} but the metadata says {want!r}")
        tensors[name] = np.frombuffer(data[b:e], dtype=dt).reshape(shape).copy()
    return tensors, meta
