"""Float stages (spec §15): softmax, layer_norm, group_norm, GELU, SiLU, in float32 with a fixed order.

Every value is a float32 array and every step one NumPy ufunc, so each operation is one IEEE-754 binary32
operation rounded to nearest (no fused multiply-add, no reassociation). Reductions use the 32-lane order
of §15.1 and ``exp`` the construction of §15.2, so the native kernels can return the same bits.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
LANES = 32  # §15.1
NAN = np.uint32(0x7FC00000).view(F32)  # §15: the one NaN every float stage returns

# §15.2 exp
EXP_HI, EXP_LO = F32(89.0), F32(-104.0)
LOG2E = F32(float.fromhex("0x1.715476p+0"))
ROUNDER = F32(float.fromhex("0x1.8p+23"))
LN2_HI = F32(float.fromhex("0x1.63p-1"))           # 0.693359375, 9 significant bits
LN2_LO = F32(float.fromhex("-0x1.bd0106p-13"))     # fl32(ln 2 - LN2_HI)
EXP_POLY = tuple(F32(1.0 / f) for f in (5040, 720, 120, 24, 6, 2, 1, 1))  # Horner, r^7 term first

# §15.3 erfc(u) = t * exp(P(t - 1/2) - u*u), t = 1 / (1 + u/2); coefficients from scripts/fit_erfc.py
ERFC_POLY = tuple(F32(float.fromhex(h)) for h in (  # c10 first (Horner order)
    "-0x1.2f44f6p-3", "0x1.04de88p-2", "-0x1.79a79p-10", "-0x1.2b2f2p-2", "0x1.b729d6p-4", "0x1.20ee4p-2",
    "-0x1.42d98p-3", "-0x1.802b4p-2", "0x1.83d25ep-3", "0x1.5864b2p+0", "-0x1.57f564p-1"))
INV_SQRT2 = F32(float.fromhex("0x1.6a09e6p-1"))
# §15.4 tanh form: -2 * sqrt(2/pi) and 0.044715
GELU_T = F32(float.fromhex("-0x1.988454p+0"))
GELU_C = F32(0.044715)


def canon_nan(y: np.ndarray) -> np.ndarray:
    """Every NaN replaced by the NaN 0x7FC00000 (§15)."""
    return np.where(y != y, NAN, y).astype(F32, copy=False)


def exp(x: np.ndarray) -> np.ndarray:
    """float32 e^x by range reduction, a degree-7 polynomial and an exact power-of-two scaling (§15.2)."""
    x = np.asarray(x, F32)
    with np.errstate(over="ignore"):
        return _exp(x)


def _exp(x: np.ndarray) -> np.ndarray:
    c = np.where(x > EXP_HI, EXP_HI, np.where(x >= EXP_LO, x, EXP_LO)).astype(F32)
    n = (c * LOG2E + ROUNDER) - ROUNDER
    r = (c - n * LN2_HI) - n * LN2_LO
    p = np.full(r.shape, EXP_POLY[0], F32)
    for k in EXP_POLY[1:]:
        p = p * r + k
    ni = n.astype(np.int32)
    n1 = ni >> 1
    n2 = ni - n1
    s1 = ((n1 + 127) << 23).astype(np.uint32).view(F32)
    s2 = ((n2 + 127) << 23).astype(np.uint32).view(F32)
    return (p * s1) * s2


def lane_sum(v: np.ndarray) -> np.ndarray:
    """Row sums of a float32 [R, L] array in the order of §15.1 (32 lanes, then a halving tree)."""
    rows, length = v.shape
    blocks = -(-length // LANES)
    pad = np.zeros((rows, blocks * LANES), F32)
    pad[:, :length] = v
    pad = pad.reshape(rows, blocks, LANES)
    acc = np.zeros((rows, LANES), F32)
    for b in range(blocks):
        acc = acc + pad[:, b, :]
    h = LANES // 2
    while h:
        acc = acc[:, :h] + acc[:, h:2 * h]
        h //= 2
    return acc[:, 0]


def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, F32).reshape(-1, x.shape[-1] if x.ndim else 1)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (§15.5)."""
    x = np.asarray(x, F32)
    if x.size == 0:
        return np.zeros(x.shape, F32)
    v = _rows(x)
    with np.errstate(invalid="ignore", over="ignore"):
        m = v.max(axis=1)
        bad = np.isnan(m) | (m == np.inf)
        masked = m == -np.inf
        m = np.where(bad | masked, F32(0), m)
        e = exp(v - m[:, None])
        y = e / lane_sum(e)[:, None]
    y = np.where(bad[:, None], NAN, np.where(masked[:, None], F32(0), y))
    return y.astype(F32).reshape(x.shape)


def _normalize(v: np.ndarray, eps) -> tuple[np.ndarray, np.ndarray]:
    """(x - mean, 1 / sqrt(var + eps)) per row of [R, L] (§15.6)."""
    n = F32(v.shape[1])
    mean = lane_sum(v) / n
    d = v - mean[:, None]
    var = lane_sum(d * d) / n
    rstd = F32(1) / np.sqrt(var + F32(eps))
    return d, rstd


def _affine(c: int, weight, bias):
    w = np.ones(c, F32) if weight is None else np.asarray(weight, F32)
    b = np.full(c, F32(-0.0)) if bias is None else np.asarray(bias, F32)
    return w, b


def layer_norm(x: np.ndarray, weight=None, bias=None, eps=1e-5) -> np.ndarray:
    """LayerNorm over the last axis with optional per-channel weight and bias (§15.6)."""
    x = np.asarray(x, F32)
    if x.size == 0:
        return np.zeros(x.shape, F32)
    w, b = _affine(x.shape[-1], weight, bias)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d, rstd = _normalize(_rows(x), eps)
        y = (d * rstd[:, None]) * w + b
    return canon_nan(y).reshape(x.shape)


def group_norm(x: np.ndarray, groups: int, weight=None, bias=None, eps=1e-5) -> np.ndarray:
    """GroupNorm of x [N, C, *spatial] over each group of C / groups channels (§15.6)."""
    x = np.asarray(x, F32)
    if x.size == 0:
        return np.zeros(x.shape, F32)
    n, c = x.shape[:2]
    w, b = _affine(c, weight, bias)
    seg = np.ascontiguousarray(x).reshape(n * groups, -1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d, rstd = _normalize(seg, eps)
        y = (d * rstd[:, None]).reshape(n, c, -1) * w[:, None] + b[:, None]
    return canon_nan(y).reshape(x.shape)


def erfc_half(x: np.ndarray) -> np.ndarray:
    """Phi(x) = P(N(0,1) <= x) = erfc(-x / sqrt 2) / 2 (§15.3)."""
    u = np.abs(x) * INV_SQRT2
    t = F32(1) / (F32(1) + F32(0.5) * u)
    v = t - F32(0.5)
    p = np.full(v.shape, ERFC_POLY[0], F32)
    for k in ERFC_POLY[1:]:
        p = p * v + k
    h = F32(0.5) * (t * exp(p - (x * x) * F32(0.5)))  # u^2 = x^2 / 2 with one rounding
    return np.where(x >= 0, F32(1) - h, h).astype(F32)


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """GELU, erf form x * Phi(x) or tanh form x / (1 + exp(-2 z)) (§15.4)."""
    x = np.asarray(x, F32)
    with np.errstate(invalid="ignore", over="ignore"):
        if approximate == "tanh":
            w = GELU_T * (x * (F32(1) + GELU_C * (x * x)))
            y = x / (F32(1) + exp(w))
        else:
            y = x * erfc_half(x)
    return canon_nan(np.asarray(y, F32))


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b, NumPy broadcasting (§15.8)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return canon_nan(np.asarray(np.asarray(a, F32) + np.asarray(b, F32), F32))


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU x / (1 + exp(-x)) (§15.4)."""
    x = np.asarray(x, F32)
    with np.errstate(invalid="ignore", over="ignore"):
        y = x / (F32(1) + exp(-x))
    return canon_nan(np.asarray(y, F32))
