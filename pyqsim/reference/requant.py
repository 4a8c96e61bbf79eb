"""Fixed-point multipliers and output stages (spec §6, §8)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .. import _checks as C
from ..numerics import profile
from .profiles import requant_stage, tflite_multiplier


def _frexp_multiplier(r: float) -> tuple[int, int]:
    f, e = math.frexp(r)
    m0 = math.floor(f * 2**31 + 0.5)
    if m0 == 2**31:
        m0, e = 2**30, e + 1
    return m0, 31 - e


def _real_scales(real_scale, name: str) -> np.ndarray:
    r = np.asarray(real_scale)
    if r.dtype.kind not in "fiu" or r.dtype == np.bool_:
        raise TypeError(f"{name} must be a float or a float array, got dtype {r.dtype}")
    r = r.astype(np.float64)
    if r.size and not (np.all(np.isfinite(r)) and np.all(r > 0)):
        raise ValueError(f"{name} must be finite and > 0")
    return r


def quantize_multiplier(real_scale, numerics="pyqsim"):
    """The requantization parameters of ``numerics`` for a real scale (spec §6.1, §14): ``(multiplier int32,
    shift int32)`` with ``real ~= multiplier * 2**-shift``, or ``(scale float32, None)`` for a float profile."""
    prof = profile(numerics)
    r = _real_scales(real_scale, "real_scale")
    if prof.params == "float":
        return r.astype(np.float32), None
    m = np.empty(r.shape, np.int32)
    s = np.empty(r.shape, np.int32)
    for i, v in np.ndenumerate(r):
        if numerics == "pyqsim":
            m0, sh = _frexp_multiplier(float(v))
        else:
            m0, sh = tflite_multiplier(float(v), numerics == "tflite-single")
        if not C.SHIFT_MIN <= sh <= prof.shift_max:
            rng = "[2^-64 - 2^-96, 2^30 - 2^-2)" if numerics == "pyqsim" else "its accepted range"
            raise ValueError(f"real_scale {float(v)!r} is outside {rng} for numerics={numerics!r}: its shift {sh} "
                             f"is not in [1, {prof.shift_max}] (spec §6.1)")
        m[i], s[i] = m0, sh
    return m, s


def _round_scaled(r: float, sh: int) -> int:
    """``floor(r * 2^sh + 1/2)`` in exact rational arithmetic (spec §8; no float rounding)."""
    return math.floor(Fraction(r) * Fraction(2) ** sh + Fraction(1, 2))


def quantize_multiplier_pair(real_scale1, real_scale2):
    """(multiplier1, multiplier2, shift) sharing one shift, for split-shortcut outputs (spec §8)."""
    r1 = _real_scales(real_scale1, "real_scale1")
    r2 = _real_scales(real_scale2, "real_scale2")
    try:
        r1, r2 = np.broadcast_arrays(r1, r2)
    except ValueError:
        raise ValueError(f"real_scale1 and real_scale2 must broadcast, got shapes {r1.shape} and {r2.shape}") from None
    m1 = np.empty(r1.shape, np.int32)
    m2 = np.empty(r1.shape, np.int32)
    s = np.empty(r1.shape, np.int32)
    for i in np.ndindex(r1.shape):
        a, b = float(r1[i]), float(r2[i])
        _, e = math.frexp(max(a, b))
        sh = 31 - e
        ma, mb = _round_scaled(a, sh), _round_scaled(b, sh)
        if max(ma, mb) == 2**31:
            sh -= 1
            ma, mb = _round_scaled(a, sh), _round_scaled(b, sh)
        if not C.SHIFT_MIN <= sh <= C.SHIFT_MAX:
            raise ValueError(f"real scales ({a!r}, {b!r}) give shift {sh}, outside [1, 94]: max(real_scale1, "
                             "real_scale2) must be in [2^-64 - 2^-96, 2^30 - 2^-2) (spec §8)")
        m1[i], m2[i], s[i] = ma, mb, sh
    return m1, m2, s


def rounding_shift(prod: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``(prod + 2^(S-1)) >> S`` for int64 ``|prod| < 2^62``; shifts above 62 give 0 (spec §6)."""
    s = shift.astype(np.int64)
    big = s > 62
    sc = np.where(big, 62, s)
    res = (prod + (np.int64(1) << (sc - 1))) >> sc
    return np.where(big, 0, res)


def clamp_to(y: np.ndarray, out_dtype: str) -> np.ndarray:
    lo, hi = C.RANGES[out_dtype]
    return np.clip(y, lo, hi).astype(C.CONTAINERS[out_dtype])


def apply_out_stage(acc: np.ndarray, out: C.OutStage, axis: int) -> np.ndarray:
    """Apply a canonical int32/requantized/float32 stage to an exact int64 ``acc`` (channel ``axis``)."""
    shape = [1] * acc.ndim
    shape[axis] = -1
    if out.dtype == "int32":
        return acc.astype(np.int32)
    if out.dtype == "float32":
        return (acc.astype(np.float32) * out.scale.reshape(shape)).astype(np.float32)
    if out.numerics != "pyqsim":
        return requant_stage(acc, out, shape)
    prod = acc * out.multiplier.astype(np.int64).reshape(shape)
    y = rounding_shift(prod, out.shift.reshape(shape)) + out.zero_point
    return clamp_to(y, out.dtype)


def apply_out_stage_wide(acc: np.ndarray, out: C.OutStage, axis: int) -> np.ndarray:
    """Output stage for an int64 accumulator whose product with M0 needs up to 94 bits (spec §7)."""
    if out.dtype == "int64":
        return acc.astype(np.int64)
    shape = [1] * acc.ndim
    shape[axis] = -1
    if out.dtype == "float32":
        return (acc.astype(np.float32) * out.scale.reshape(shape)).astype(np.float32)
    m = out.multiplier.astype(object).reshape(shape)
    s = out.shift.astype(object).reshape(shape)
    prod = acc.astype(object) * m
    one = np.ones_like(s)
    y = (prod + (one << (s - 1))) >> s
    return clamp_to(np.clip(y, -(2**40), 2**40).astype(np.int64) + out.zero_point, out.dtype)


def requantize_args_compute(a: C.RequantArgs) -> np.ndarray:
    y = apply_out_stage(a.acc.astype(np.int64), a.out, axis=1)
    return y.reshape(a.shape)


def requantize(acc, multiplier, shift, zero_point=0, out_dtype="int8", axis=-1, numerics="pyqsim") -> np.ndarray:
    """Requantize int32 ``acc`` with per-tensor or per-channel (``axis``) parameters (spec §6, §14)."""
    return requantize_args_compute(C.requantize_args(acc, multiplier, shift, zero_point, out_dtype, axis, numerics))
