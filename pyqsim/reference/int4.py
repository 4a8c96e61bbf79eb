"""int4 / uint4 packing, two codes per byte along the last axis (spec §1.1)."""
from __future__ import annotations

import numpy as np

from .. import _checks as C


def pack_int4(codes, signed: bool = True) -> np.ndarray:
    """Pack int4 (int8 container) or uint4 (uint8 container) codes to uint8, low nibble first."""
    codes = C.as_array(codes, "codes")
    type_name = "int4" if signed else "uint4"
    C.check_dtype(codes, "codes", [C.CONTAINERS[type_name]])
    if codes.ndim == 0:
        raise ValueError("codes must have at least one axis")
    lo, hi = C.RANGES[type_name]
    if codes.size and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"codes must be in [{lo}, {hi}] for {type_name}, got values in [{int(codes.min())}, {int(codes.max())}]")
    length = codes.shape[-1]
    nib = (codes.astype(np.int16) & 0xF).astype(np.uint8)
    if length % 2:
        nib = np.concatenate([nib, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return np.ascontiguousarray(nib[..., 0::2] | (nib[..., 1::2] << 4))


def unpack_int4(packed, length: int, signed: bool = True) -> np.ndarray:
    """Unpack ``length`` codes per row from uint8 ``packed`` (the inverse of :func:`pack_int4`)."""
    packed = C.as_array(packed, "packed")
    C.check_dtype(packed, "packed", [np.uint8])
    length = C.as_int(length, "length")
    if packed.ndim == 0:
        raise ValueError("packed must have at least one axis")
    if length < 0 or packed.shape[-1] != (length + 1) // 2:
        raise ValueError(f"packed must have ceil(length/2)={(max(length, 0) + 1) // 2} bytes on its last axis for length={length}, got {packed.shape[-1]}")
    lo = packed & 0xF
    hi = packed >> 4
    if length % 2 and packed.size and np.any(hi[..., -1]):
        raise ValueError("packed padding nibble (high nibble of the last byte for an odd length) must be 0")
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2] = lo
    out[..., 1::2] = hi
    out = out[..., :length]
    if signed:
        return np.ascontiguousarray(((out.astype(np.int16) ^ 8) - 8).astype(np.int8))
    return np.ascontiguousarray(out)


def weight_codes(w: np.ndarray, w_format: str, k: int) -> np.ndarray:
    """Weight codes as int64 [N, K] from canonical int8 or packed int4/uint4 storage."""
    if w_format == "int8":
        return w.astype(np.int64)
    n = w.shape[0]
    lo = (w & 0xF).astype(np.int64)
    hi = (w >> 4).astype(np.int64)
    out = np.empty((n, 2 * w.shape[1]), np.int64)
    out[:, 0::2] = lo
    out[:, 1::2] = hi
    out = out[:, :k]
    return (out ^ 8) - 8 if w_format == "int4" else out
