"""Output stages and multipliers of the runtime numerics profiles (spec §14), on exact int64 accumulators."""
from __future__ import annotations

import math

import numpy as np

from .. import _checks as C
from ..numerics import profile

INT32_MIN = -(2**31)


def wrap32(v: np.ndarray) -> np.ndarray:
    """``v`` modulo 2^32 as a signed int32 value (int64 array)."""
    return ((v + 2**31) & (2**32 - 1)) - 2**31


def tflite_multiplier(r: float, single: bool) -> tuple[int, int]:
    """(M0, S) of TFLite ``QuantizeMultiplier`` for a real scale ``r > 0`` (spec §14.2); S = 31 - TFLite's shift."""
    f, e = math.frexp(r)
    m0 = math.floor(f * 2**31 + 0.5)  # TfLiteRound: half away from zero (f > 0)
    if m0 == 2**31:
        m0, e = 2**30, e + 1
    if e < -31:  # too small: multiplier 0
        return 0, 31
    if single and e > 30:  # the single-rounding form saturates the shift
        return 2**31 - 1, 1
    return m0, 31 - e


def saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp's high half of ``2*a*b`` rounded half away from zero; int32 values in int64 arrays."""
    ab = a * b
    q = ab + np.where(ab >= 0, 2**30, 1 - 2**30)
    res = np.where(q >= 0, q >> 31, -((-q) >> 31))  # C division truncates toward zero
    return np.where((a == INT32_MIN) & (b == INT32_MIN), 2**31 - 1, res)


def rounding_divide_by_pot(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """gemmlowp's ``x / 2^e`` rounded half away from zero, ``e`` in [0, 31]."""
    mask = (np.int64(1) << e) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + ((x & mask) > threshold)


def fixed_requant(acc: np.ndarray, m: np.ndarray, s: np.ndarray, numerics: str) -> np.ndarray:
    """int32 result of TFLite's ``MultiplyByQuantizedMultiplier`` (before the zero point), spec §14.2/§14.3."""
    m = m.astype(np.int64)
    s = s.astype(np.int64)
    if numerics == "tflite-single":
        return wrap32((acc * m + (np.int64(1) << (s - 1))) >> s)
    left = np.maximum(31 - s, 0)
    right = np.maximum(s - 31, 0)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(wrap32(acc << left), m), right)


def float_requant(acc: np.ndarray, scale: np.ndarray, zy: int, lo: int, hi: int, numerics: str) -> np.ndarray:
    """Code of the float32 rescale of ``acc`` (spec §14.4 onnxruntime, §14.5 fbgemm), before the final clamp."""
    t = acc.astype(np.float32) * scale  # fl32(fl32(acc) * scale): two roundings
    if numerics == "onnxruntime":  # clamp in float, round half even, add the zero point
        t = np.clip(t, np.float32(lo - zy), np.float32(hi - zy))
        return np.rint(t).astype(np.int64) + zy
    inside = (t >= -(2.0**31)) & (t < 2.0**31)  # cvtps2dq: out of range gives INT32_MIN
    r = np.where(inside, np.rint(np.where(inside, t, 0)).astype(np.int64), INT32_MIN)
    return wrap32(r + zy)


def requant_stage(acc: np.ndarray, out: C.OutStage, shape: list) -> np.ndarray:
    """Requantized codes of an exact accumulator (|acc| < 2^31) under ``out.numerics`` (spec §14)."""
    lo, hi = C.RANGES[out.dtype]
    if profile(out.numerics).params == "float":
        y = float_requant(acc, out.scale.reshape(shape), out.zero_point, lo, hi, out.numerics)
    else:
        y = wrap32(fixed_requant(acc, out.multiplier.reshape(shape), out.shift.reshape(shape), out.numerics)
                   + out.zero_point)
    return np.clip(y, lo, hi).astype(C.CONTAINERS[out.dtype])


def requant_scale(x_scale, w_scale, y_scale, numerics: str = "pyqsim") -> np.ndarray:
    """The real requantization scale ``s_x * s_w / s_y`` formed as the profile's runtime forms it (spec §14)."""
    prof = profile(numerics)
    sx, sy = np.float32(C.positive_scale(x_scale, "x_scale")), np.float32(C.positive_scale(y_scale, "y_scale"))
    sw = np.asarray(w_scale)
    if sw.dtype.kind not in "fiu" or sw.dtype == np.bool_:
        raise TypeError(f"w_scale must be a float or a float array, got dtype {sw.dtype}")
    sw = sw.astype(np.float32)
    if sw.size and not (np.all(np.isfinite(sw)) and np.all(sw > 0)):
        raise ValueError("w_scale must be finite and > 0")
    if prof.params == "float":  # fl32(fl32(s_x * s_w) / s_y)
        return (sx * sw) / sy
    if numerics.startswith("tflite") and sw.ndim == 0:  # product in float32, quotient in float64
        return np.float64(sx * sw) / np.float64(sy)
    return np.float64(sx) * sw.astype(np.float64) / np.float64(sy)


def round_half_away(t: np.ndarray) -> np.ndarray:
    """``TfLiteRound`` (std::round) of float32 ``t``: nearest integer, ties away from zero (float64 result).
    ``|t| + 1/2`` is exact in float64 for every float32 ``t``, so the floor sees the true sum."""
    a = np.abs(t.astype(np.float64))
    return np.copysign(np.floor(a + 0.5), t.astype(np.float64))


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``fl32(a * b + c)`` with one rounding (a fused multiply-add) for float32 ``a``, ``b`` and small integer ``c``."""
    p = a.astype(np.float64) * b.astype(np.float64)  # exact: 24 x 24 significant bits
    c = np.asarray(c).astype(np.float64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # s + err == p + c exactly (two-sum)
    r = s.astype(np.float32)
    # fl32(s) is wrong only when s lands exactly on a midpoint between float32 neighbours while p + c does not
    other = np.nextafter(r, np.where(s > r, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32))
    tie = (s != r) & (s == (r.astype(np.float64) + other.astype(np.float64)) / 2) & (err != 0)
    up = np.maximum(r, other)
    down = np.minimum(r, other)
    return np.where(tie, np.where(err > 0, up, down), r).astype(np.float32)


def pair_saturated_acc(x: np.ndarray, w: np.ndarray, zx: int, zw: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """FBGEMM's u8s8 accumulator with int16 pair saturation (spec §14.5): uint8 ``x`` [M, K], int8 ``w`` [N, K]."""
    m, k = x.shape
    n = w.shape[0]
    kp = k + (k % 2)  # an odd K is padded with a zero pair member
    xe = np.zeros((m, kp), np.int64)
    we = np.zeros((n, kp), np.int64)
    xe[:, :k] = x
    we[:, :k] = w
    t = np.zeros((m, n), np.int64)
    for j in range(0, kp, 2):  # one saturating int16 pair per step
        t += np.clip(np.outer(xe[:, j], we[:, j]) + np.outer(xe[:, j + 1], we[:, j + 1]), -32768, 32767)
    zw64 = zw.astype(np.int64)
    acc = t - zx * we.sum(axis=1)[None, :] - zw64[None, :] * xe.sum(axis=1)[:, None] + k * zx * zw64[None, :]
    return wrap32(acc + bias.astype(np.int64))
