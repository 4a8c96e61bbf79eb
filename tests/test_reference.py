"""The reference simulator against exact mathematics (Python ints and fractions.Fraction).

Tolerance policy: every integer result is compared with ``==`` (zero tolerance). The only float results
checked here are float32 output stages, whose spec (§6, §8) fixes the operation order, so they are
compared bit for bit against the same float32 operations applied to the exact accumulator.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, strategies as st
from hypothesis.extra import numpy as hnp

from pyqsim import _checks as C
from pyqsim import ops, reference as R
from strategies import (at_shift_edges, conv_cases, gemm_cases, lead_shapes, log2_cases, requant_cases,
                        split_conv_cases, split_gemm_cases)


# ----------------------------------------------------------------------------- exact oracles


def exact_weights(w, fmt, k):
    if fmt == "int8":
        return [[int(v) for v in row.ravel()] for row in w]
    rows = []
    for row in w:
        vals = []
        for byte in row:
            for nib in (int(byte) & 0xF, int(byte) >> 4):
                vals.append(nib - 16 if fmt == "int4" and nib >= 8 else nib)
        rows.append(vals[:k])
    return rows


def rshift_round(v: int, s: int) -> int:
    return (v + (1 << (s - 1))) >> s  # Python ints: exact floor shift


def exact_stage(acc: list[list[int]], kw: dict, axis_is_last=True):
    """Apply the spec §6 output stage with Python ints / float32 ops, channel on the last axis."""
    kind = kw.get("out_dtype", "int32")
    out = []
    for row in acc:
        res = []
        for j, a in enumerate(row):
            if kind == "int32":
                res.append(a)
            elif kind == "float32":
                sc = np.float32(np.broadcast_to(kw["out_scale"], (len(row),))[j])
                res.append(np.float32(np.float32(a) * sc))
            else:
                m = int(np.broadcast_to(kw["multiplier"], (len(row),))[j])
                s = int(np.broadcast_to(kw["shift"], (len(row),))[j])
                lo, hi = C.RANGES[kind]
                res.append(min(max(rshift_round(a * m, s) + int(kw.get("out_zero_point", 0)), lo), hi))
        out.append(res)
    return out


def as_list(y):
    return [[v.item() if isinstance(v, np.generic) else v for v in row] for row in y]


# ----------------------------------------------------------------------------- GEMM / conv


def exact_gemm_acc(x, w, zx, zw, fmt, bias):
    m, k = x.shape
    ws = exact_weights(w, fmt, k)
    n = len(ws)
    zwv = [int(v) for v in np.broadcast_to(np.asarray(zw), (n,))]
    b = [0] * n if bias is None else [int(v) for v in bias]
    return [[b[j] + sum((int(x[i, t]) - zx) * (ws[j][t] - zwv[j]) for t in range(k)) for j in range(n)]
            for i in range(m)]


@given(gemm_cases(max_dim=20))
@example(dict(x=np.zeros((3, 0), np.int8), w=np.zeros((2, 0), np.int8)))
@example(dict(x=np.full((1, 1), -128, np.int8), w=np.full((1, 1), -128, np.int8), x_zero_point=127,
              w_zero_point=127))
@example(dict(x=np.full((2, 3), 255, np.uint8), w=np.full((4, 3), 127, np.int8), x_zero_point=0,
              out_dtype="uint8", multiplier=2**30, shift=1, out_zero_point=255))
@at_shift_edges("int_gemm", None)
def test_int_gemm_matches_exact(kw):
    y = R.int_gemm(**kw)
    fmt = kw.get("w_format", "int8")
    acc = exact_gemm_acc(kw["x"], kw["w"], kw.get("x_zero_point", 0), kw.get("w_zero_point", 0), fmt,
                         kw.get("bias"))
    expect = exact_stage(acc, kw)
    assert y.shape == (kw["x"].shape[0], kw["w"].shape[0])
    assert as_list(y) == expect or (y.dtype == np.float32 and np.array_equal(y, np.array(expect, np.float32).reshape(y.shape)))


def exact_conv_acc(kw):
    x, w, fmt = kw["x"], kw["w"], kw.get("w_format", "int8")
    b, c, h, wd = x.shape
    g = kw.get("groups", 1)
    kh, kw_ = kw["kernel_size"]
    (sh, sw), (ph, pw), (dh, dw) = kw["stride"], kw["padding"], kw["dilation"]
    o = w.shape[0]
    cg = c // g
    ws = exact_weights(w, fmt, cg * kh * kw_)
    zx = kw.get("x_zero_point", 0)
    zw = [int(v) for v in np.broadcast_to(np.asarray(kw.get("w_zero_point", 0)), (o,))]
    bias = [0] * o if kw.get("bias") is None else [int(v) for v in kw["bias"]]
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw_ - 1) - 1) // sw + 1
    out = np.zeros((b, o, oh, ow), dtype=object)
    for bi in range(b):
        for oc in range(o):
            grp = oc // (o // g)
            for i in range(oh):
                for j in range(ow):
                    s = bias[oc]
                    for ci in range(cg):
                        for u in range(kh):
                            for v in range(kw_):
                                yy, xx = i * sh + u * dh - ph, j * sw + v * dw - pw
                                inside = 0 <= yy < h and 0 <= xx < wd
                                xv = int(x[bi, grp * cg + ci, yy, xx]) if inside else zx
                                s += (xv - zx) * (ws[oc][(ci * kh + u) * kw_ + v] - zw[oc])
                    out[bi, oc, i, j] = s
    return out


def stage_nchw(acc, kw):
    b, o, oh, ow = acc.shape
    rows = acc.transpose(0, 2, 3, 1).reshape(b * oh * ow, o).tolist()
    res = exact_stage(rows, kw)
    dt = np.float32 if kw.get("out_dtype") == "float32" else np.int64
    return np.array(res, dtype=dt).reshape(b, oh, ow, o).transpose(0, 3, 1, 2)


@given(conv_cases())
@at_shift_edges("int_conv2d", None)
def test_int_conv2d_matches_exact(kw):
    y = R.int_conv2d(**kw)
    expect = stage_nchw(exact_conv_acc(kw), kw)
    assert y.shape == expect.shape
    assert np.array_equal(y, expect)


def test_conv_padding_uses_zero_point():
    x = np.full((1, 1, 2, 2), 200, np.uint8)
    w = np.ones((1, 1, 3, 3), np.int8)
    y = R.int_conv2d(x, w, padding=1, x_zero_point=200)
    assert np.array_equal(y, np.zeros((1, 1, 2, 2), np.int32))


# ----------------------------------------------------------------------------- requantization


# §6.1's accepted range of r, [2^-64 - 2^-96, 2^30 - 2^-2): the M0 carry moves each end down by 2^-32 relative
R_MIN, R_END = 2.0**-64 - 2.0**-96, 2.0**30 - 2.0**-2


@given(st.floats(2.0**-66, 2.0**31, allow_nan=False))
@example(2.0**-64)
@example(R_MIN)
@example(math.nextafter(R_MIN, 0))
@example(math.nextafter(R_END, 0))
@example(R_END)
@example(math.ldexp(1 - 2.0**-53, -64))  # carries into S = 94
@example(1.0)
@example(math.nextafter(1.0, 0))
@example(0.5 + 2.0**-32)  # f * 2^31 ends in exactly .5: ties round away from zero
def test_quantize_multiplier_exact(r):
    f, e = math.frexp(r)
    expect = math.floor(Fraction(f) * 2**31 + Fraction(1, 2))
    if expect == 2**31:
        expect, e = 2**30, e + 1
    assert (1 <= 31 - e <= 94) == (R_MIN <= r < R_END)
    if not 1 <= 31 - e <= 94:
        with pytest.raises(ValueError, match="real_scale"):
            R.quantize_multiplier(r)
        return
    m, s = R.quantize_multiplier(r)
    m, s = int(m), int(s)
    assert 2**30 <= m < 2**31 and 1 <= s <= 94
    assert (m, s) == (expect, 31 - e)
    assert abs(Fraction(m, 2**s) - Fraction(r)) <= Fraction(r) * Fraction(1, 2**31)


def test_quantize_multiplier_tie_rounds_up():
    m, s = R.quantize_multiplier(0.5 + 2.0**-32)
    assert int(m) == 2**30 + 1 and int(s) == 31


@given(requant_cases())
@at_shift_edges("requantize", None)
def test_requantize_matches_exact(kw):
    y = R.requantize(**kw)
    acc = kw["acc"]
    ax = kw["axis"] % acc.ndim
    lo, hi = C.RANGES[kw["out_dtype"]]
    mult = np.broadcast_to(kw["multiplier"], (acc.shape[ax],))
    shift = np.broadcast_to(kw["shift"], (acc.shape[ax],))
    for idx in np.ndindex(acc.shape):
        c = idx[ax]
        v = rshift_round(int(acc[idx]) * int(mult[c]), int(shift[c])) + kw["zero_point"]
        assert int(y[idx]) == min(max(v, lo), hi)


@pytest.mark.parametrize("acc,m,s,expect", [
    (3, 2**30, 31, 2),     # 1.5 -> 2 (half up)
    (-3, 2**30, 31, -1),   # -1.5 -> -1 (half up, toward +inf)
    (1, 2**30, 31, 1),     # 0.5 -> 1
    (-1, 2**30, 31, 0),    # -0.5 -> 0
    (5, 2**30, 32, 1),     # 1.25 -> 1
])
def test_requantize_ties_round_half_up(acc, m, s, expect):
    y = R.requantize(np.array([acc], np.int32), m, s, 0, "int8")
    assert int(y[0]) == expect


# ----------------------------------------------------------------------------- split shortcut


HALF_BELOW = float.fromhex("0x1.fffffffffffffp-2")  # 1/2 - 2^-54, the largest double below 1/2


@given(st.floats(2.0**-70, 2.0**31, allow_nan=False), st.floats(2.0**-70, 2.0**31, allow_nan=False))
@example(1.0, 1.0)
@example(1.0 - 2.0**-40, 2.0**-40)
@example(1.0, math.ldexp(HALF_BELOW, -30))  # smaller multiplier 1/2 - 2^-54 before rounding: 0, not 1
@example(1.0, 2.0**-31)  # smaller multiplier exactly at the tie 1/2: rounds up to 1
@example(1.0, math.nextafter(2.0**-31, 1))  # just above the tie: 1
@example(1.0, math.ldexp(1.5 - 2.0**-52, -30))  # 3/2 - 2^-52: 1, not 2
@example(0.5 + 2.0**-32, 2.0**-20)  # larger multiplier at the tie 2^30 + 1/2: 2^30 + 1
@example(math.nextafter(0.5 + 2.0**-32, 0), 2.0**-20)  # just below that tie: 2^30
@example(2.0**-20, 0.5 + 2.0**-32)  # the same with the roles swapped
@example(2.0**-20, math.nextafter(0.5 + 2.0**-32, 0))
@example(1.0 - 2.0**-33, 0.25)  # the larger rounds to 2^31: one shift less, both recomputed
@example(R_MIN, R_MIN)  # S = 94 after the carry
@example(math.nextafter(R_END, 0), 1.0)  # S = 1
@example(R_END, 1.0)  # rejected: S would be 0
def test_quantize_multiplier_pair_exact(r1, r2):
    e = math.frexp(max(r1, r2))[1]
    s = 31 - e
    exact = [math.floor(Fraction(r) * Fraction(2) ** s + Fraction(1, 2)) for r in (r1, r2)]
    if max(exact) == 2**31:
        s -= 1
        exact = [math.floor(Fraction(r) * Fraction(2) ** s + Fraction(1, 2)) for r in (r1, r2)]
    assert (1 <= s <= 94) == (R_MIN <= max(r1, r2) < R_END)
    if not 1 <= s <= 94:
        with pytest.raises(ValueError, match="shift"):
            R.quantize_multiplier_pair(r1, r2)
        return
    m1, m2, got_s = (int(v) for v in R.quantize_multiplier_pair(r1, r2))
    assert (m1, m2, got_s) == (*exact, s)
    assert 2**30 <= max(m1, m2) < 2**31  # spec §8: the larger multiplier keeps 31 significant bits


def test_quantize_multiplier_pair_rounds_exactly():
    """The issue's case: r2 * 2^30 = 1/2 - 2^-54 is below the tie; a float64 ``+ 0.5`` would round it to 1."""
    m1, m2, s = (int(v) for v in R.quantize_multiplier_pair(1.0, math.ldexp(HALF_BELOW, -30)))
    assert (m1, m2, s) == (2**30, 0, 30)


@given(split_gemm_cases(max_dim=16))
@at_shift_edges("split_gemm", None)
def test_split_gemm_matches_exact(kw):
    y = R.split_gemm(**kw)
    acc1 = exact_gemm_acc(kw["x1"], kw["w1"], kw["x1_zero_point"], kw["w1_zero_point"], kw["w1_format"], kw["bias"])
    acc2 = exact_gemm_acc(kw["x2"], kw["w2"], kw["x2_zero_point"], kw["w2_zero_point"], kw["w2_format"], None)
    assert as_list(y) == exact_split(acc1, acc2, kw) or np.array_equal(y, np.array(exact_split(acc1, acc2, kw), np.float32).reshape(y.shape))


def exact_split(acc1, acc2, kw):
    kind = kw["out_dtype"]
    n = kw["w1"].shape[0]
    m1, m2, sh = (np.broadcast_to(kw.get(k, 0), (n,)) for k in ("multiplier1", "multiplier2", "shift"))
    out = []
    for r1, r2 in zip(acc1, acc2):
        row = []
        for j, (a1, a2) in enumerate(zip(r1, r2)):
            if kind == "float32":
                row.append(np.float32(np.float32(np.float32(a1) * kw["out_scale1"][j]) + np.float32(np.float32(a2) * kw["out_scale2"][j])))
            else:
                lo, hi = C.RANGES[kind]
                v = rshift_round(a1 * int(m1[j]) + a2 * int(m2[j]), int(sh[j]))
                row.append(min(max(v + kw["out_zero_point"], lo), hi))
        out.append(row)
    return out


@given(split_conv_cases())
@at_shift_edges("split_conv2d", None)
def test_split_conv2d_equals_split_of_exact_convs(kw):
    y = R.split_conv2d(**kw)
    common = dict(stride=(kw["stride"],) * 2, padding=kw["padding"], dilation=(1, 1), kernel_size=kw["kernel_size"])
    accs = []
    for i, bias in (("1", kw["bias"]), ("2", None)):
        accs.append(exact_conv_acc(dict(common, x=kw[f"x{i}"], w=kw[f"w{i}"], w_format=kw[f"w{i}_format"],
                                        x_zero_point=kw[f"x{i}_zero_point"], w_zero_point=kw[f"w{i}_zero_point"],
                                        bias=bias, groups=1)))
    b, o, oh, ow = accs[0].shape
    rows = [a.transpose(0, 2, 3, 1).reshape(b * oh * ow, o).tolist() for a in accs]
    dt = np.float32 if kw["out_dtype"] == "float32" else np.int64
    expect = np.array(exact_split(rows[0], rows[1], kw), dt).reshape(b, oh, ow, o).transpose(0, 3, 1, 2)
    assert np.array_equal(y, expect)


def test_split_single_rounding_beats_two():
    """One rounding: 0.5 + 0.5 = 1 exactly, where rounding each branch first would give 2."""
    x1 = np.array([[1]], np.int8)
    w = np.array([[1]], np.int8)
    m1, m2, s = R.quantize_multiplier_pair(0.5, 0.5)
    y = R.split_gemm(x1, w, x1, w, out_dtype="int8", multiplier1=m1, multiplier2=m2, shift=s)
    assert int(y[0, 0]) == 1


# ----------------------------------------------------------------------------- log2 quantization


def exact_log_code(p: float, delta: float, bits: int, k: int) -> int:
    zero = 2**bits - 1
    r = Fraction(p) / Fraction(delta)
    r = Fraction(float(r))  # spec §3: r is the float64 quotient
    if r == 0:
        return zero
    # c = round(-k log2 r): the integer with 2^-(2c+1) < r^(2k) <= 2^-(2c-1) (ties are impossible)
    c = round(-k * math.log2(r))
    for cand in (c - 1, c, c + 1):
        if Fraction(1, 1) * 2 ** (-(2 * cand + 1)) < r ** (2 * k) <= Fraction(2) ** (-(2 * cand - 1)):
            c = cand
            break
    else:
        raise AssertionError("no candidate code")
    return 0 if c < 0 else (zero if c >= zero else c)


@given(hnp.arrays(np.float32, st.integers(0, 40), elements=st.one_of(
    st.floats(0, 1, width=32), st.sampled_from([0.0, 1.0, 2.0**-0.5, 2.0**-0.25, 2.0**-30]))),
    st.floats(2.0**-4, 2.0, width=32), st.integers(2, 8), st.sampled_from(["log2", "sqrt2"]))
def test_quantize_log_matches_exact(p, delta, bits, mode):
    codes = R.quantize_log(p, delta, bits, mode)
    k = C.LOG_MODES[mode]
    assert [int(c) for c in codes] == [exact_log_code(float(v), float(np.float32(delta)), bits, k) for v in p]


@pytest.mark.parametrize("mode,k", [("log2", 1), ("sqrt2", 2)])
def test_log_codes_of_powers_are_exact(mode, k):
    bits = 8
    c = np.arange(0, 2**bits - 1)
    vals = R.dequantize_log(c.astype(np.uint8), 1.0, bits, mode)
    nonzero = vals > 0  # float32 underflow to 0 at the deepest codes
    back = R.quantize_log(vals[nonzero], 1.0, bits, mode)
    assert np.array_equal(back, c[nonzero].astype(np.uint8))


def test_log_zero_code_reserved():
    codes = R.quantize_log(np.array([0.0, 1e-30, 1.0], np.float32), 1.0, 4, "log2")
    assert codes.tolist() == [15, 15, 0]
    assert R.dequantize_log(codes, 1.0, 4, "log2").tolist() == [0.0, 0.0, 1.0]


# ----------------------------------------------------------------------------- log2 attention


def exact_log2_acc(kw):
    codes, v = kw["codes"], kw["v"]
    k = C.LOG_MODES[kw["mode"]]
    zero = 2 ** kw["bits"] - 1
    f = kw["frac_bits"]
    m, length = codes.shape
    n = v.shape[1]
    out = []
    for i in range(m):
        row = []
        for col in range(n):
            e_sum, o_sum = 0, 0
            for j in range(length):
                c = int(codes[i, j])
                if c == zero:
                    continue
                d = int(v[j, col]) - kw["v_zero_point"]
                t = f - (-(-c // k))
                term = d * 2**t if t >= 0 else math.floor(Fraction(d, 2**-t) + Fraction(1, 2))
                if k == 2 and c % 2:
                    o_sum += term
                else:
                    e_sum += term
            row.append(e_sum * 2**16 + o_sum * 92682)
        out.append(row)
    return out


@given(log2_cases(max_dim=12))
@at_shift_edges("log2_attn_matmul", None)
def test_log2_attn_matches_exact(kw):
    y = R.log2_attn_matmul(**kw)
    acc = exact_log2_acc(kw)
    kind = kw["out_dtype"]
    if kind == "int64":
        assert y.tolist() == acc
    elif kind == "float32":
        sc = kw["out_scale"]
        expect = np.array([[np.float32(np.float32(a) * sc[j]) for j, a in enumerate(r)] for r in acc], np.float32)
        assert np.array_equal(y, expect.reshape(y.shape))
    else:
        lo, hi = C.RANGES[kind]
        expect = [[min(max(rshift_round(a * int(kw["multiplier"][j]), int(kw["shift"][j])) + kw["out_zero_point"], lo), hi)
                   for j, a in enumerate(r)] for r in acc]
        assert y.tolist() == expect


@given(hnp.arrays(np.uint8, (3, 9), elements=st.integers(0, 14)),
       hnp.arrays(np.int8, (9, 4), elements=st.integers(-128, 127)), st.sampled_from(["log2", "sqrt2"]))
def test_log2_attn_approximates_real_product(codes, v, mode):
    """With shallow codes (exact E and O), R / 2^(F+16) differs from sum 2^(-c/k) d only by the sqrt2 constant."""
    k = C.LOG_MODES[mode]
    bits = 4 if mode == "log2" else 5
    y = R.log2_attn_matmul(codes, v, bits=bits, mode=mode, frac_bits=16)
    real = (2.0 ** (-codes.astype(np.float64) / k)) * (codes != 2**bits - 1)
    exact = real @ v.astype(np.float64)
    approx = y.astype(np.float64) / 2.0**32
    bound = np.abs(v.astype(np.float64)).sum(0) * abs(92682 / 65536 - math.sqrt(2)) + 1e-9
    assert np.all(np.abs(approx - exact) <= bound)


# ----------------------------------------------------------------------------- uniform quantize, int4


@given(hnp.arrays(np.float32, st.integers(0, 50), elements=st.floats(-1e4, 1e4, width=32)),
       st.floats(float(np.float32(1e-3)), 10, width=32), st.sampled_from(["int8", "uint8", "int4", "uint4"]), st.data())
def test_quantize_matches_definition(x, s, dtype, data):
    lo, hi = C.RANGES[dtype]
    z = data.draw(st.integers(lo, hi))
    q = R.quantize(x, s, z, dtype)
    for xv, qv in zip(x, q):
        t = Fraction(float(np.float32(xv) / np.float32(s)))
        r = round(t)  # Python round on Fraction: half to even
        assert int(qv) == min(max(r, lo - z), hi - z) + z


def test_quantize_ties_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32)
    assert R.quantize(x, 1.0, 0, "int8").tolist() == [0, 2, 2, 0, -2]


@given(hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9), elements=st.integers(-8, 7)))
def test_int4_roundtrip_signed(codes):
    packed = R.pack_int4(codes, True)
    assert packed.shape == codes.shape[:-1] + ((codes.shape[-1] + 1) // 2,)
    assert np.array_equal(R.unpack_int4(packed, codes.shape[-1], True), codes)


def test_int4_nibble_order():
    assert R.pack_int4(np.array([1, -2, 3], np.int8)).tolist() == [0xE1, 0x03]
    assert R.pack_int4(np.array([15, 0], np.uint8), signed=False).tolist() == [0x0F]


def test_uniform_qparams_cover_range():
    s, z, lo, hi = R.uniform_qparams(-1.0, 3.0, 4, signed=False)
    q = R.quantize(np.array([-1.0, 3.0], np.float32), s, int(z), "uint8", bits=4)
    assert q.tolist() == [0, 15]


# ----------------------------------------------------------------------------- Numba engine == NumPy


@given(gemm_cases(max_dim=33))
@at_shift_edges("int_gemm", None)
def test_numba_gemm_equals_numpy(kw):
    from pyqsim.reference import _numba as nb
    a = C.gemm_args(kw["x"], kw["w"], kw.get("x_zero_point", 0), kw.get("w_zero_point", 0), kw.get("bias"),
                    kw.get("w_format", "int8"), kw.get("out_dtype", "int32"), kw.get("multiplier"), kw.get("shift"),
                    kw.get("out_zero_point", 0), kw.get("out_scale"))
    from pyqsim.reference.gemm import int_gemm_compute
    expect = int_gemm_compute(a)
    got = nb.int_gemm_compute(a)
    assert got.dtype == expect.dtype and np.array_equal(got, expect)


@given(requant_cases())
@at_shift_edges("requantize", None)
def test_numba_requantize_equals_numpy(kw):
    from pyqsim.reference import _numba as nb
    a = C.requantize_args(kw["acc"], kw["multiplier"], kw["shift"], kw["zero_point"], kw["out_dtype"], kw["axis"])
    assert np.array_equal(nb.requantize_args_compute(a), R.requantize(**kw))


@given(log2_cases(max_dim=20, lead=lead_shapes()))
@at_shift_edges("log2_attn_matmul", None)
def test_numba_log2_attn_equals_numpy(kw):
    from pyqsim.reference import _numba as nb
    a = C.log2_attn_args(kw["codes"], kw["v"], kw["v_zero_point"], kw["bits"], kw["mode"], kw["frac_bits"],
                         kw["out_dtype"], kw.get("multiplier"), kw.get("shift"), kw.get("out_zero_point", 0),
                         kw.get("out_scale"))
    got, expect = nb.log2_attn_matmul_compute(a), R.log2_attn_matmul(**kw)
    assert got.dtype == expect.dtype and np.array_equal(got, expect)


@given(hnp.arrays(np.float32, st.integers(0, 60), elements=st.floats(0, 4, width=32)),
       st.integers(2, 8), st.sampled_from(["log2", "sqrt2"]))
def test_numba_quantize_log_equals_numpy(p, bits, mode):
    from pyqsim.reference import _numba as nb
    k = C.LOG_MODES[mode]
    r = p.astype(np.float64) / np.float64(np.float32(0.75))
    assert np.array_equal(nb.quantize_log_codes(r, k, 2**bits - 1), R.quantize_log(p, 0.75, bits, mode))


def test_reference_engine_switch(monkeypatch):
    monkeypatch.setenv("PYQSIM_REFERENCE_ENGINE", "numba")
    tbl = ops._reference_table()
    from pyqsim.reference import _numba as nb
    assert tbl["int_gemm"] is nb.int_gemm_compute
    monkeypatch.setenv("PYQSIM_REFERENCE_ENGINE", "fortran")
    with pytest.raises(ValueError, match="PYQSIM_REFERENCE_ENGINE"):
        ops._reference_table()
