"""Float <-> code quantizers: uniform (spec §2) and log2 / log-sqrt2 (spec §3)."""
from __future__ import annotations

import math

import numpy as np

from .. import _checks as C
from ..numerics import profile
from .profiles import fma_f32, round_half_away

# largest binary64 values below 2^(-1/2), 2^(-1/4), 2^(-3/4) (spec §3)
T_HALF = float.fromhex("0x1.6a09e667f3bccp-1")
T_QUARTER = float.fromhex("0x1.ae89f995ad3adp-1")
T_THREE_QUARTERS = float.fromhex("0x1.306fe0a31b715p-1")
SQRT2 = math.sqrt(2.0)
F32_TINY = np.float32(2.0**-149)  # smallest positive float32: the least scale §2.1 returns


code_range = C.code_range


def _channel_params(scale, zero_point, x: np.ndarray, axis, lo: int, hi: int):
    if axis is None:
        s = C.positive_scale(scale, "scale")
        z = C.as_int(zero_point, "zero_point")
        if not lo <= z <= hi:
            raise ValueError(f"zero_point must be in [{lo}, {hi}], got {z}")
        return np.float32(s), np.int64(z)
    ax = C.as_int(axis, "axis")
    if not -x.ndim <= ax < x.ndim:
        raise ValueError(f"axis must be in [{-x.ndim}, {x.ndim - 1}] for shape {x.shape}, got {ax}")
    ax %= x.ndim
    n = x.shape[ax]
    s = C.per_channel_scales(scale, "scale", n)
    z = C.per_channel_ints(zero_point, "zero_point", n, lo, hi).astype(np.int64)
    shape = [1] * x.ndim
    shape[ax] = n
    return s.reshape(shape), z.reshape(shape)


def quantize(x, scale, zero_point=0, dtype: str = "int8", *, axis=None, bits=None, narrow=False,
             numerics="pyqsim") -> np.ndarray:
    """Codes ``clamp(round(fl32(x / s)) + z)`` in ``dtype`` (spec §2; rounding per profile, §14); per channel
    along ``axis``."""
    name = profile(numerics).name
    if name == "pyqsim":
        return quantize_compute(C.quantize_args(x, scale, zero_point, dtype, axis, bits, narrow))
    x = C.finite_float(x, "x")
    lo, hi = code_range(dtype, bits, narrow)
    s, z = _channel_params(scale, zero_point, x, axis, lo, hi)
    if name.startswith("fbgemm") and axis is None:  # fl32(x * fl32(1/s) + z) fused, round half even (§14.5)
        t = np.rint(fma_f32(x, np.float32(1) / s, z))
        return np.clip(t, lo, hi).astype(C.CONTAINERS[dtype])
    if name.startswith("fbgemm"):  # per channel: fl32(z + fl32(x * fl32(1/s))), not fused (§14.5)
        t = np.rint(z.astype(np.float32) + x * (np.float32(1) / s))
        return np.clip(t, lo, hi).astype(C.CONTAINERS[dtype])
    with np.errstate(over="ignore"):  # x / s beyond float32 is +-inf, then clamped
        q = x / s  # float32 division
    t = round_half_away(q) if name.startswith("tflite") else np.rint(q)  # TfLiteRound, else round half even
    q = np.clip(t, (lo - z).astype(np.float32), (hi - z).astype(np.float32)).astype(np.int64) + z
    return q.astype(C.CONTAINERS[dtype])


def quantize_compute(a: C.QuantizeArgs) -> np.ndarray:
    """``quantize`` on canonical arguments: x [outer, N, inner] with scale and zero point along N."""
    s = a.scale[None, :, None]
    z = a.zero_point.astype(np.int64)[None, :, None]
    with np.errstate(over="ignore"):  # x / s beyond float32 is +-inf, then clamped
        t = np.rint(a.x / s)  # float32 division, round half to even
    q = np.clip(t, (a.lo - z).astype(np.float32), (a.hi - z).astype(np.float32)).astype(np.int64) + z
    return q.astype(a.container).reshape(a.shape)


def dequantize(q, scale, zero_point=0, *, axis=None) -> np.ndarray:
    """Float32 ``(q - z) * s`` (spec §2)."""
    q = C.as_array(q, "q")
    C.check_dtype(q, "q", [np.int8, np.uint8, np.int32])
    s, z = _channel_params(scale, zero_point, q, axis, -(2**31), 2**31 - 1)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def uniform_qparams(lo, hi, bits: int = 8, *, symmetric: bool = False, signed: bool = True):
    """(scale float32, zero_point int32, qmin, qmax) from float ranges ``lo``/``hi`` (spec §2.1)."""
    b = C.as_int(bits, "bits")
    if not 2 <= b <= 8:
        raise ValueError(f"bits must be in [2, 8], got {b}")
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("lo and hi must be finite")
    if symmetric:
        if not signed:
            raise ValueError("symmetric quantization needs signed=True")
        qmax = 2 ** (b - 1) - 1
        amax = np.maximum(-lo, hi)
        s = np.maximum(np.where(amax > 0, amax / qmax, 1.0).astype(np.float32), F32_TINY)
        return s, np.zeros(s.shape, np.int32), -qmax, qmax
    levels = 2**b - 1
    s = np.maximum(np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32), F32_TINY)
    z = np.clip(np.rint(-lo / s.astype(np.float64)), 0, levels).astype(np.int32)
    if signed:
        return s, z - 2 ** (b - 1), -(2 ** (b - 1)), 2 ** (b - 1) - 1
    return s, z, 0, levels


def quantize_log(p, delta, bits: int = 4, mode: str = "sqrt2") -> np.ndarray:
    """uint8 log2 / log-sqrt2 codes of non-negative ``p``; code ``2**bits - 1`` is exact zero (spec §3)."""
    return quantize_log_compute(C.quantize_log_args(p, delta, bits, mode))


def quantize_log_compute(a: C.QuantizeLogArgs) -> np.ndarray:
    """``quantize_log`` on canonical arguments."""
    k, zero_code = a.k, a.zero_code
    r = a.p.astype(np.float64) / np.float64(a.delta)
    m, e = np.frexp(r)
    e = e.astype(np.int64)
    if k == 1:
        c = -e + (m <= T_HALF)
    else:
        c = -2 * e + (m <= T_QUARTER) + (m <= T_THREE_QUARTERS)
    c = np.where(c < 0, 0, c)
    c = np.where((c >= zero_code) | (r == 0), zero_code, c)
    return c.astype(np.uint8)


def dequantize_log(codes, delta, bits: int = 4, mode: str = "sqrt2") -> np.ndarray:
    """Float32 values of log codes (spec §3)."""
    codes = C.as_array(codes, "codes")
    C.check_dtype(codes, "codes", [np.uint8])
    d = np.float64(C.positive_scale(delta, "delta"))
    b = C.log_bits(bits)
    k = C.log_mode(mode)
    zero_code = 2**b - 1
    if codes.size and int(codes.max()) > zero_code:
        raise ValueError(f"codes must be in [0, {zero_code}] for bits={b}")
    c = codes.astype(np.int64)
    e = -(-c // k)
    odd = (k == 2) & (c % 2 == 1)
    base = np.where(odd, d * SQRT2, d)
    v = np.ldexp(base, -e).astype(np.float32)
    return np.where(c == zero_code, np.float32(0), v).astype(np.float32)
