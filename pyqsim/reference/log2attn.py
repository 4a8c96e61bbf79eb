"""Shift-based log2 / log-sqrt2 attention times V (spec §7)."""
from __future__ import annotations

import numpy as np

from .. import _checks as C
from .requant import apply_out_stage_wide


def shift_round(d: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``d << t`` for ``t >= 0``, ``round_half_up(d / 2^-t)`` for ``t < 0`` (int64)."""
    pos = np.maximum(t, 0)
    neg = np.minimum(np.maximum(-t, 0), 62)
    left = d << pos
    right = (d + ((np.int64(1) << neg) >> 1)) >> neg
    return np.where(t >= 0, left, right)


def log2_attn_acc(a: C.Log2AttnArgs) -> np.ndarray:
    """Exact int64 ``R = E * 2^16 + O * 92682`` [..., M, N]."""
    c = a.codes.astype(np.int64)
    zero_code = 2**a.bits - 1
    live = c != zero_code
    e = -(-c // a.k)
    odd = live & (a.k == 2) & (c % 2 == 1)
    even = live & ~odd
    t = a.frac_bits - e  # [..., M, L]
    d = a.v.astype(np.int64) - a.v_zero_point  # [..., L, N]
    exact = t >= 0
    w_even = np.where(even & exact, np.int64(1) << np.maximum(t, 0), 0)
    w_odd = np.where(odd & exact, np.int64(1) << np.maximum(t, 0), 0)
    acc_e = w_even @ d
    acc_o = w_odd @ d
    deep = live & ~exact
    if deep.any():
        terms = shift_round(d[..., None, :, :], t[..., :, :, None])  # [..., M, L, N]
        acc_e = acc_e + np.where((even & deep)[..., None], terms, 0).sum(axis=-2)
        acc_o = acc_o + np.where((odd & deep)[..., None], terms, 0).sum(axis=-2)
    return acc_e * (1 << C.LOG2_P) + acc_o * C.LOG2_Q


def log2_attn_matmul_compute(a: C.Log2AttnArgs) -> np.ndarray:
    return apply_out_stage_wide(log2_attn_acc(a), a.out, axis=-1)


def log2_attn_matmul(codes, v, *, v_zero_point=0, bits=4, mode="sqrt2", frac_bits=16, out_dtype="int64",
                     multiplier=None, shift=None, out_zero_point=0, out_scale=None) -> np.ndarray:
    """``attn @ (v - zv)`` from log codes [..., M, L] and values [..., L, N] using shifts and adds, then one output
    stage (spec §7); leading dimensions index independent problems."""
    return log2_attn_matmul_compute(C.log2_attn_args(codes, v, v_zero_point, bits, mode, frac_bits, out_dtype,
                                                     multiplier, shift, out_zero_point, out_scale))
