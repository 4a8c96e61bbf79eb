"""Numba-compiled engine of the reference: same canonical inputs, identical results (tested)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .. import _checks as C
from .int4 import weight_codes
from .quant import T_HALF, T_QUARTER, T_THREE_QUARTERS


@njit(cache=True, parallel=True)
def _gemm_acc(xs, ws, bias):
    m, k = xs.shape
    n = ws.shape[0]
    acc = np.empty((m, n), np.int64)
    for i in prange(m):
        for j in range(n):
            s = np.int64(bias[j])
            for kk in range(k):
                s += xs[i, kk] * ws[j, kk]
            acc[i, j] = s
    return acc


@njit(cache=True)
def _rounding_shift(prod, s):
    if s > 62:
        return np.int64(0)
    return (prod + (np.int64(1) << (s - 1))) >> s


@njit(cache=True, parallel=True)
def _requant_rows(acc, mult, shift, zp, lo, hi):
    m, n = acc.shape
    out = np.empty((m, n), np.int64)
    for i in prange(m):
        for j in range(n):
            y = _rounding_shift(acc[i, j] * np.int64(mult[j]), np.int64(shift[j])) + zp
            out[i, j] = min(max(y, lo), hi)
    return out


@njit(cache=True)
def _mul_shift_wide(r, m0, s):
    """round_half_up(r * m0 / 2^s) for |r| < 2^62, 0 <= m0 < 2^31, 1 <= s <= 94, saturated to +-2^40."""
    rh = r >> 31
    rl = r - (rh << 31)  # [0, 2^31)
    a = rh * m0  # |a| < 2^62
    bv = rl * m0  # [0, 2^62)
    c = a + (bv >> 31)  # floor(r * m0 / 2^31)
    bl = bv & ((np.int64(1) << 31) - 1)
    if s >= 32:
        t = s - 31
        if t > 63:
            return np.int64(0)
        return (c + (np.int64(1) << (s - 32))) >> t
    # s <= 31: result = c * 2^(31-s) + floor((bl + 2^(s-1)) / 2^s)
    up = 31 - s
    limit = np.int64(1) << (61 - up)
    if c >= limit:
        return np.int64(1) << 40
    if c < -limit:
        return -(np.int64(1) << 40)
    v = (c << up) + ((bl + (np.int64(1) << (s - 1))) >> s)
    return min(max(v, -(np.int64(1) << 40)), np.int64(1) << 40)


@njit(cache=True, parallel=True)
def _log2_acc(codes, d, zero_code, kmode, frac_bits, p_bits, q_const):
    m, length = codes.shape
    n = d.shape[1]
    out = np.empty((m, n), np.int64)
    for i in prange(m):
        acc_e = np.zeros(n, np.int64)
        acc_o = np.zeros(n, np.int64)
        for j in range(length):
            c = np.int64(codes[i, j])
            if c == zero_code:
                continue
            e = (c + kmode - 1) // kmode
            odd = kmode == 2 and c % 2 == 1
            t = frac_bits - e
            for col in range(n):
                dv = d[j, col]
                if t >= 0:
                    term = dv << t
                else:
                    sft = min(-t, 62)
                    term = (dv + ((np.int64(1) << sft) >> 1)) >> sft
                if odd:
                    acc_o[col] += term
                else:
                    acc_e[col] += term
        for col in range(n):
            out[i, col] = (acc_e[col] << p_bits) + acc_o[col] * q_const
    return out


@njit(cache=True)
def _quantize_log(r, kmode, zero_code, t_half, t_q, t_3q):
    out = np.empty(r.shape, np.uint8)
    for i in range(r.size):
        v = r.flat[i]
        if v == 0.0:
            out.flat[i] = zero_code
            continue
        m, e = math.frexp(v)
        if kmode == 1:
            c = -np.int64(e) + (1 if m <= t_half else 0)
        else:
            c = -2 * np.int64(e) + (1 if m <= t_q else 0) + (1 if m <= t_3q else 0)
        if c < 0:
            c = 0
        if c >= zero_code:
            c = zero_code
        out.flat[i] = c
    return out


def _out_stage(acc: np.ndarray, out) -> np.ndarray:
    if out.dtype in ("int32", "float32"):
        from .requant import apply_out_stage
        return apply_out_stage(acc, out, axis=1)
    lo, hi = C.RANGES[out.dtype]
    y = _requant_rows(acc, out.multiplier, out.shift, np.int64(out.zero_point), np.int64(lo), np.int64(hi))
    return y.astype(C.CONTAINERS[out.dtype])


def gemm_acc(a: C.GemmArgs) -> np.ndarray:
    xs = a.x.astype(np.int64) - a.x_zero_point
    ws = weight_codes(a.w, a.w_format, a.k) - a.w_zero_point.astype(np.int64)[:, None]
    return _gemm_acc(np.ascontiguousarray(xs), np.ascontiguousarray(ws), a.bias)


def int_gemm_compute(a: C.GemmArgs) -> np.ndarray:
    return _out_stage(gemm_acc(a), a.out)


def requantize_args_compute(a: C.RequantArgs) -> np.ndarray:
    outer, n, inner = a.acc.shape
    rows = a.acc.transpose(0, 2, 1).reshape(outer * inner, n).astype(np.int64)
    y = _out_stage(np.ascontiguousarray(rows), a.out)
    return y.reshape(a.acc.shape[0], a.acc.shape[2], a.acc.shape[1]).transpose(0, 2, 1).reshape(a.shape)


def log2_attn_acc(a: C.Log2AttnArgs) -> np.ndarray:
    *lead, m, length = a.codes.shape
    n = a.v.shape[-1]
    batch = int(np.prod(lead, dtype=np.int64))
    codes = a.codes.reshape(batch, m, length)
    d = (a.v.astype(np.int64) - a.v_zero_point).reshape(batch, length, n)
    out = np.empty((batch, m, n), np.int64)
    for i in range(codes.shape[0]):
        out[i] = _log2_acc(codes[i], np.ascontiguousarray(d[i]), 2**a.bits - 1, a.k, a.frac_bits, C.LOG2_P, C.LOG2_Q)
    return out.reshape(*lead, m, n)


@njit(cache=True, parallel=True)
def _requant_wide(acc, mult, shift, zp, lo, hi):
    m, n = acc.shape
    out = np.empty((m, n), np.int64)
    for i in prange(m):
        for j in range(n):
            y = _mul_shift_wide(acc[i, j], np.int64(mult[j]), np.int64(shift[j])) + zp
            out[i, j] = min(max(y, lo), hi)
    return out


def log2_attn_matmul_compute(a: C.Log2AttnArgs) -> np.ndarray:
    acc = log2_attn_acc(a)
    out = a.out
    if out.dtype in ("int64", "float32"):
        from .requant import apply_out_stage_wide
        return apply_out_stage_wide(acc, out, axis=-1)
    lo, hi = C.RANGES[out.dtype]
    rows = np.ascontiguousarray(acc.reshape(int(np.prod(acc.shape[:-1], dtype=np.int64)), acc.shape[-1]))
    y = _requant_wide(rows, out.multiplier, out.shift, np.int64(out.zero_point), np.int64(lo), np.int64(hi))
    return y.astype(C.CONTAINERS[out.dtype]).reshape(acc.shape)


def quantize_log_codes(r: np.ndarray, k: int, zero_code: int) -> np.ndarray:
    return _quantize_log(np.ascontiguousarray(r, np.float64), k, zero_code, T_HALF, T_QUARTER, T_THREE_QUARTERS)
