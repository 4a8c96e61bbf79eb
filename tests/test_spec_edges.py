"""Each bound and rounding statement of docs/spec.md tested at the edge it names.

Tolerance policy: none. Integer results are compared with ``==``; float results are compared bit for bit with
the float operations that the spec writes out, evaluated independently (``fractions.Fraction``, whose conversion
to float rounds correctly, and NumPy float32 casts).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, example, given, strategies as st

from pyqsim import ops

BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.needs_cpu_ext)]


# ------------------------------------------------------------------------------------------ §2 dequantization


@pytest.mark.parametrize("q,z", [(np.uint8(255), 0), (np.uint8(0), 255), (np.int8(-128), 127), (np.int8(127), -128)])
def test_dequantize_8bit_difference_is_at_most_255_and_exact(q, z):
    y = ops.dequantize(np.array([q]), 1.0, z)
    assert abs(int(q) - z) == 255 and float(y[0]) == int(q) - z


def test_dequantize_int32_codes_round_the_difference():
    q = np.array([2**24, 2**24 + 1, 2**24 + 3, -(2**31)], np.int32)
    y = ops.dequantize(q, 1.0, 0)
    assert y.tolist() == [2.0**24, 2.0**24, 2.0**24 + 4, -(2.0**31)]  # ties to even
    assert float(ops.dequantize(np.array([2**31 - 1], np.int32), 1.0, -(2**31))[0]) == 2.0**32


# ------------------------------------------------------------------------------------------ §2.1 parameters


def spec_scale(lo: float, hi: float, bits: int, symmetric: bool) -> np.float32:
    """§2.1's s, each fl64 a correctly rounded float(Fraction), then one cast to float32."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        num, den = Fraction(max(-lo, hi)), 2 ** (bits - 1) - 1
    else:
        num, den = Fraction(float(Fraction(hi) - Fraction(lo))), 2**bits - 1  # fl64(hi - lo)
    if num == 0:
        return np.float32(1.0)
    return max(np.float32(float(num / den)), np.float32(2.0**-149))


# lo = -2^-60, hi = 255 * (1/2 + 2^-25): fl64(hi - lo) = hi, fl64(hi / 255) = 1/2 + 2^-25 (a float32 midpoint) and
# the cast rounds it to even, 1/2; the correctly rounded (hi - lo) / 255 is 1/2 + 2^-24.
DOUBLE_ROUNDING = (-(2.0**-60), float.fromhex("0x1.fe0001fe00000p+6"))


@given(st.floats(-1e6, 0.0), st.floats(0.0, 1e6), st.integers(2, 8), st.booleans())
@example(*DOUBLE_ROUNDING, 8, False)
@example(0.0, 0.0, 8, False)  # hi == lo: scale 1
@example(-1.0, 1.0, 2, True)
@example(0.0, 1e-44, 8, False)  # rounds to 0 in float32: the least positive scale instead
@example(-1e-44, 0.0, 8, True)
def test_uniform_qparams_scale_is_the_stated_double_rounding(lo, hi, bits, symmetric):
    s, z, qmin, qmax = ops_qparams(lo, hi, bits, symmetric)
    assert s.view(np.uint32) == spec_scale(lo, hi, bits, symmetric).view(np.uint32)
    if not symmetric:
        want = 0 if hi == lo == 0 else min(max(round(float(Fraction(-min(lo, 0.0)) / Fraction(float(s)))), 0),
                                           2**bits - 1)
        assert int(z) == want


def ops_qparams(lo, hi, bits, symmetric):
    from pyqsim.reference import uniform_qparams
    s, z, qmin, qmax = uniform_qparams(lo, hi, bits, symmetric=symmetric, signed=symmetric)
    return np.float32(s), z, qmin, qmax


def test_uniform_qparams_double_rounding_example():
    s = ops_qparams(*DOUBLE_ROUNDING, 8, False)[0]
    exact = (Fraction(DOUBLE_ROUNDING[1]) - Fraction(DOUBLE_ROUNDING[0])) / 255
    assert float(s) == 0.5 and exact > Fraction(1, 2) + Fraction(1, 2**25)  # correct rounding would give 1/2 + 2^-24


# ------------------------------------------------------------------------------------------ §4.1 precondition


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_bound_counts_per_channel_zero_points_and_bias(backend):
    """One channel's zero point sets B for all channels, and max |bias| adds to the bound: accepted at
    K * A * B + max|bias| == 2^31 - 1, rejected one above (zeros for data: acceptance does not look at codes)."""
    a, b = 128, 127 + 128  # int8 x with zx = 0; int8 w with zw = [0, -128]: B = |127 - (-128)| = 255
    k = 4000
    bias_max = 2**31 - 1 - k * a * b
    assert 0 < bias_max < 2**31 - 1
    x = np.zeros((1, k), np.int8)
    w = np.zeros((2, k), np.int8)
    zw = np.array([0, -128], np.int32)
    got = ops.int_gemm(x, w, w_zero_point=zw, bias=np.array([bias_max, -bias_max], np.int32), backend=backend)
    assert got.tolist() == [[bias_max, -bias_max]]
    with pytest.raises(ValueError, match="2\\^31-1"):
        ops.int_gemm(x, w, w_zero_point=zw, bias=np.array([0, -bias_max - 1], np.int32), backend=backend)


# ------------------------------------------------------------------------------------------ §6 vs TFLite


def tflite_double_rounding(acc: int, m0: int, s: int) -> int:
    """TFLite's default MultiplyByQuantizedMultiplier for a right shift S >= 31, in Python ints: gemmlowp's
    SaturatingRoundingDoublingHighMul (nudge, then C division truncating toward zero) and RoundingDivideByPOT
    (half away from zero). For S < 31 the left shift acc * 2^(31-S) is applied first."""
    left, right = max(31 - s, 0), max(s - 31, 0)
    a = acc * 2**left
    ab = a * m0
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    num = ab + nudge
    high = abs(num) // 2**31 * (1 if num >= 0 else -1)  # truncation toward zero
    mask = 2**right - 1
    rem = high & mask
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> right) + (1 if rem > threshold else 0)


def single_rounding(acc: int, m0: int, s: int) -> int:
    return (acc * m0 + 2 ** (s - 1)) >> s


def predicted_difference(acc: int, m0: int, s: int) -> int:
    """§6.1's stated condition: TFLite minus pyqsim."""
    if s <= 31:
        return 0
    p, r = acc * m0, (acc * m0) % 2**s
    if p >= -(2**30) and 2 ** (s - 1) - 2**30 <= r < 2 ** (s - 1):
        return 1
    if p < -(2**30) and 2 ** (s - 1) <= r < 2 ** (s - 1) + 2**30:
        return -1
    return 0


@given(st.integers(-(2**31), 2**31 - 1), st.integers(2**30, 2**31 - 1), st.integers(1, 62))
@example(5, 2**30, 32)  # t = 1.25: single rounding 1, double rounding 2 (not a tie)
@example(-5, 2**30, 32)  # t = -1.25: -1 both ways
@example(-3, 2**30, 32)  # t = -0.75
@example(-2**30 - 1, 2**30, 32 + 29)  # p just below -2^30 (the sign test of the condition)
@example(-1, 2**30, 31)  # tie -0.5 at S = 31: one rounding, half up both ways
@example(-2**30, 2**30, 61)  # t = -1/2 exactly at a large shift: TFLite -1, pyqsim 0
@example(2**31 - 1, 2**31 - 1, 62)
@example(-(2**31), 2**31 - 1, 62)
@example(1, 2**30, 1)
def test_single_vs_tflite_double_rounding_condition(acc, m0, s):
    if s < 31:
        assume(-(2**31) <= acc * 2 ** (31 - s) < 2**31)  # TFLite's int32 pre-shift must not overflow
    ours = int(ops.requantize(np.array([acc], np.int32), m0, s, 0, "int8", backend="reference")[0])
    assert ours == max(-128, min(127, single_rounding(acc, m0, s)))
    assert tflite_double_rounding(acc, m0, s) - single_rounding(acc, m0, s) == predicted_difference(acc, m0, s)


def test_tflite_differs_off_ties():
    assert (single_rounding(5, 2**30, 32), tflite_double_rounding(5, 2**30, 32)) == (1, 2)


# ------------------------------------------------------------------------------------------ §7 length bound


def l_max(frac_bits: int) -> int:
    return (2**63 - 1) // (255 * (2**16 + 92682) * 2**frac_bits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frac_bits", [0, 1, 15, 16, 17, 23, 24])
def test_log2_length_bound_at_the_edge(backend, frac_bits):
    """L * 255 * 2^F * (2^16 + 92682) < 2^63 exactly: L = l_max accepted, l_max + 1 rejected (M = N = 0, so no
    memory is touched). With F = 16 the bound is the spec's 3,488,299."""
    assert l_max(16) == 3_488_299
    length = l_max(frac_bits)
    assert length * 255 * 2**frac_bits * 158218 < 2**63 <= (length + 1) * 255 * 2**frac_bits * 158218
    codes, v = np.zeros((0, length), np.uint8), np.zeros((length, 0), np.uint8)
    assert ops.log2_attn_matmul(codes, v, frac_bits=frac_bits, backend=backend).shape == (0, 0)
    with pytest.raises(ValueError, match=f"L={length + 1}"):
        ops.log2_attn_matmul(np.zeros((0, length + 1), np.uint8), np.zeros((length + 1, 0), np.uint8),
                             frac_bits=frac_bits, backend=backend)
