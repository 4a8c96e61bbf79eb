"""Bad inputs raise TypeError/ValueError naming the argument (spec §11), on the op table and the reference.

Every case runs through ``pyqsim.ops`` with ``backend="reference"``; validation happens before dispatch,
so the same checks protect every backend.
"""
from __future__ import annotations

import numpy as np
import pytest

from pyqsim import ops

X8 = np.zeros((2, 4), np.int8)
W8 = np.zeros((3, 4), np.int8)
REQ = dict(out_dtype="int8", multiplier=2**30, shift=31)
SREQ = dict(out_dtype="int8", multiplier1=2**30, multiplier2=2**30, shift=31)


def gemm(**kw):
    args = dict(x=X8, w=W8, backend="reference")
    args.update(kw)
    return ops.int_gemm(**args)


CASES = [
    ("gemm x float", lambda: gemm(x=X8.astype(np.float32)), TypeError, "x must have dtype"),
    ("gemm x list", lambda: gemm(x=[[1, 2]]), TypeError, "x must be a NumPy array"),
    ("gemm w int16", lambda: gemm(w=W8.astype(np.int16)), TypeError, "w must have dtype"),
    ("gemm x 1-D", lambda: gemm(x=np.zeros(4, np.int8)), ValueError, "x must be 2-D"),
    ("gemm K mismatch", lambda: gemm(w=np.zeros((3, 5), np.int8)), ValueError, "K=4"),
    ("gemm packed width", lambda: gemm(w=np.zeros((3, 4), np.uint8), w_format="int4"), ValueError, "ceil"),
    ("gemm bad format", lambda: gemm(w_format="int2"), ValueError, "w_format"),
    ("gemm zx out of type", lambda: gemm(x_zero_point=128), ValueError, "x_zero_point"),
    ("gemm zx float", lambda: gemm(x_zero_point=1.5), TypeError, "x_zero_point"),
    ("gemm zw out of int4", lambda: gemm(w=np.zeros((3, 2), np.uint8), w_format="int4", w_zero_point=8), ValueError, "w_zero_point"),
    ("gemm zw wrong length", lambda: gemm(w_zero_point=np.zeros(2, np.int32)), ValueError, "w_zero_point"),
    ("gemm bias dtype", lambda: gemm(bias=np.zeros(3, np.int64)), TypeError, "bias"),
    ("gemm bias shape", lambda: gemm(bias=np.zeros(4, np.int32)), ValueError, "bias"),
    ("gemm K overflow", lambda: gemm(x=np.zeros((1, 131072), np.int8), w=np.zeros((1, 131072), np.int8)), ValueError, "K=131072"),
    ("gemm bias overflow", lambda: gemm(bias=np.full(3, 2**31 - 1, np.int32)), ValueError, "2\\^31-1"),
    ("gemm out dtype", lambda: gemm(out_dtype="int16"), ValueError, "out_dtype"),
    ("gemm missing multiplier", lambda: gemm(out_dtype="int8"), ValueError, "multiplier"),
    ("gemm multiplier negative", lambda: gemm(**dict(REQ, multiplier=-1)), ValueError, "multiplier"),
    ("gemm shift zero", lambda: gemm(**dict(REQ, shift=0)), ValueError, "shift"),
    ("gemm shift too large", lambda: gemm(**dict(REQ, shift=95)), ValueError, "shift"),
    ("gemm out zp", lambda: gemm(**dict(REQ, out_zero_point=200)), ValueError, "out_zero_point"),
    ("gemm out scale nan", lambda: gemm(out_dtype="float32", out_scale=np.nan), ValueError, "out_scale"),
    ("gemm out scale zero", lambda: gemm(out_dtype="float32", out_scale=0.0), ValueError, "out_scale"),
    ("gemm out scale negative", lambda: gemm(out_dtype="float32", out_scale=-1.0), ValueError, "out_scale"),
    ("gemm out scale inf", lambda: gemm(out_dtype="float32", out_scale=np.inf), ValueError, "out_scale"),
    ("gemm bad backend", lambda: gemm(backend="tpu"), ValueError, "backend"),
    ("conv x 3-D", lambda: ops.int_conv2d(np.zeros((1, 2, 3), np.int8), np.zeros((1, 2, 1, 1), np.int8)), ValueError, "x must be 4-D"),
    ("conv groups", lambda: ops.int_conv2d(np.zeros((1, 3, 4, 4), np.int8), np.zeros((2, 3, 1, 1), np.int8), groups=2), ValueError, "groups"),
    ("conv stride 0", lambda: ops.int_conv2d(np.zeros((1, 2, 4, 4), np.int8), np.zeros((1, 2, 1, 1), np.int8), stride=0), ValueError, "stride"),
    ("conv padding -1", lambda: ops.int_conv2d(np.zeros((1, 2, 4, 4), np.int8), np.zeros((1, 2, 1, 1), np.int8), padding=-1), ValueError, "padding"),
    ("conv kernel too big", lambda: ops.int_conv2d(np.zeros((1, 2, 2, 2), np.int8), np.zeros((1, 2, 3, 3), np.int8)), ValueError, "output size"),
    ("conv packed needs kernel", lambda: ops.int_conv2d(np.zeros((1, 2, 4, 4), np.int8), np.zeros((1, 1), np.uint8), w_format="int4"), ValueError, "kernel_size"),
    ("conv channels", lambda: ops.int_conv2d(np.zeros((1, 2, 4, 4), np.int8), np.zeros((1, 3, 1, 1), np.int8)), ValueError, "input channels"),
    ("pack int4 range", lambda: ops.pack_int4(np.array([8], np.int8)), ValueError, "codes must be in"),
    ("pack uint4 dtype", lambda: ops.pack_int4(np.array([1], np.int8), signed=False), TypeError, "codes"),
    ("unpack length", lambda: ops.unpack_int4(np.zeros(2, np.uint8), 5), ValueError, "length"),
    ("unpack padding nibble", lambda: ops.unpack_int4(np.array([0xF0], np.uint8), 1), ValueError, "padding nibble"),
    # every backend, the reference included, rejects a non-zero padding nibble of a packed weight (§1.1, §11)
    ("gemm padding nibble", lambda: ops.int_gemm(np.zeros((2, 3), np.uint8), np.full((4, 2), 0x10, np.uint8),
                                                 w_format="uint4", backend="reference"), ValueError, "w padding nibble"),
    ("conv padding nibble", lambda: ops.int_conv2d(np.zeros((1, 1, 4, 4), np.int8), np.full((2, 5), 0x70, np.uint8),
                                                   w_format="int4", kernel_size=3, backend="reference"),
     ValueError, "w padding nibble"),
    ("split padding nibble", lambda: ops.split_gemm(np.zeros((2, 3), np.int8), np.zeros((4, 3), np.int8),
                                                    np.zeros((2, 1), np.int8), np.full((4, 1), 0x80, np.uint8),
                                                    w2_format="int4", multiplier1=1 << 30, multiplier2=1 << 30, shift=31,
                                                    backend="reference"), ValueError, "w2 padding nibble"),
    ("quantize nan", lambda: ops.quantize(np.array([np.nan], np.float32), 1.0), ValueError, "finite"),
    ("quantize scale zero", lambda: ops.quantize(np.zeros(2, np.float32), 0.0), ValueError, "scale"),
    ("quantize scale nan", lambda: ops.quantize(np.zeros(2, np.float32), np.nan), ValueError, "scale"),
    ("quantize int input", lambda: ops.quantize(np.zeros(2, np.int32), 1.0), TypeError, "x must be a float"),
    ("quantize zp range", lambda: ops.quantize(np.zeros(2, np.float32), 1.0, 300, "uint8"), ValueError, "zero_point"),
    ("quantize bits", lambda: ops.quantize(np.zeros(2, np.float32), 1.0, 0, "int8", bits=9), ValueError, "bits"),
    ("quantize per-channel len", lambda: ops.quantize(np.zeros((2, 3), np.float32), np.ones(2), 0, axis=1), ValueError, "scale"),
    ("quantize_log negative", lambda: ops.quantize_log(np.array([-0.1], np.float32), 1.0), ValueError, "p must be >= 0"),
    ("quantize_log delta", lambda: ops.quantize_log(np.array([0.1], np.float32), -1.0), ValueError, "delta"),
    ("quantize_log mode", lambda: ops.quantize_log(np.array([0.1], np.float32), 1.0, 4, "log3"), ValueError, "mode"),
    ("quantize_log bits", lambda: ops.quantize_log(np.array([0.1], np.float32), 1.0, 1), ValueError, "bits"),
    ("multiplier zero", lambda: ops.quantize_multiplier(0.0), ValueError, "real_scale"),
    ("multiplier inf", lambda: ops.quantize_multiplier(np.inf), ValueError, "real_scale"),
    ("multiplier huge", lambda: ops.quantize_multiplier(2.0**31), ValueError, "real_scale"),
    ("multiplier tiny", lambda: ops.quantize_multiplier(2.0**-70), ValueError, "real_scale"),
    ("pair nan", lambda: ops.quantize_multiplier_pair(np.nan, 1.0), ValueError, "real_scale1"),
    ("requant dtype", lambda: ops.requantize(np.zeros(3, np.int64), 2**30, 31), TypeError, "acc"),
    ("requant axis", lambda: ops.requantize(np.zeros(3, np.int32), 2**30, 31, axis=2), ValueError, "axis"),
    ("requant multiplier len", lambda: ops.requantize(np.zeros((2, 3), np.int32), np.ones(2, np.int32), 31), ValueError, "multiplier"),
    ("log2 codes dtype", lambda: ops.log2_attn_matmul(np.zeros((2, 3), np.int8), np.zeros((3, 2), np.int8)), TypeError, "codes"),
    ("log2 codes range", lambda: ops.log2_attn_matmul(np.full((2, 3), 16, np.uint8), np.zeros((3, 2), np.int8), bits=4), ValueError, "codes must be in"),
    ("log2 L mismatch", lambda: ops.log2_attn_matmul(np.zeros((2, 3), np.uint8), np.zeros((4, 2), np.int8)), ValueError, "L=3"),
    ("log2 frac bits", lambda: ops.log2_attn_matmul(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.int8), frac_bits=25), ValueError, "frac_bits"),
    ("log2 L overflow", lambda: ops.log2_attn_matmul(np.zeros((1, 2**22), np.uint8), np.zeros((2**22, 1), np.int8), frac_bits=16), ValueError, "L="),
    ("split M mismatch", lambda: ops.split_gemm(X8, W8, np.zeros((3, 4), np.int8), W8, **SREQ), ValueError, "x1 and x2"),
    ("split N mismatch", lambda: ops.split_gemm(X8, W8, X8, np.zeros((2, 4), np.int8), **SREQ), ValueError, "w2"),
    ("split missing m2", lambda: ops.split_gemm(X8, W8, X8, W8, out_dtype="int8", multiplier1=1, shift=3), ValueError, "multiplier2"),
    ("split int32 out", lambda: ops.split_gemm(X8, W8, X8, W8, out_dtype="int32"), ValueError, "out_dtype"),
    ("split x2 zp", lambda: ops.split_gemm(X8, W8, X8, W8, x2_zero_point=300, **SREQ), ValueError, "x2_zero_point"),
    ("split conv spatial", lambda: ops.split_conv2d(np.zeros((1, 2, 4, 4), np.int8), np.zeros((1, 2, 1, 1), np.int8),
                                                  np.zeros((1, 2, 5, 5), np.int8), np.zeros((1, 2, 1, 1), np.int8),
                                                  out_dtype="float32", out_scale1=1.0, out_scale2=1.0), ValueError, "spatial"),
    ("split conv w2 zp", lambda: ops.split_conv2d(np.zeros((1, 2, 4, 4), np.int8), np.zeros((1, 2, 1, 1), np.int8),
                                                np.zeros((1, 2, 4, 4), np.int8), np.zeros((1, 2, 1, 1), np.int8), w2_zero_point=999,
                                                out_dtype="float32", out_scale1=1.0, out_scale2=1.0), ValueError, "w2_zero_point"),
]


@pytest.mark.parametrize("name,call,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_forced_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("PYQSIM_BACKEND", "gpu")
    with pytest.raises(ValueError, match="PYQSIM_BACKEND"):
        gemm(backend="auto")


def test_unavailable_backend_says_so(monkeypatch):
    if "cuda" in ops.available_backends():
        pytest.skip("cuda is available here")
    with pytest.raises(RuntimeError, match="not available"):
        gemm(backend="cuda")


def test_overflow_bound_is_exact():
    """K at the bound is accepted; one more is rejected (int8 x int8, zero points 0: K*128*128 <= 2^31-1)."""
    k = (2**31 - 1) // (128 * 128)
    x = np.full((1, k), -128, np.int8)
    w = np.full((1, k), -128, np.int8)
    assert int(gemm(x=x, w=w)[0, 0]) == k * 128 * 128
    with pytest.raises(ValueError, match="K="):
        gemm(x=np.zeros((1, k + 1), np.int8), w=np.zeros((1, k + 1), np.int8))


def test_noncontiguous_inputs_are_accepted():
    x = np.arange(40, dtype=np.int8).reshape(4, 10)[:, ::2]
    w = np.arange(15, dtype=np.int8).reshape(3, 5)
    assert np.array_equal(gemm(x=x, w=w), np.ascontiguousarray(x).astype(np.int64) @ w.astype(np.int64).T)


def test_overflow_bound_uses_worst_weight_zero_point():
    """B of spec §4.1 is max_n max(|wmin - zw[n]|, |wmax - zw[n]|): a zero point of 127 gives |-128 - 127| = 255."""
    k = (2**31 - 1) // (128 * 255)
    x = np.full((1, k + 1), -128, np.int8)
    w = np.full((2, k + 1), -128, np.int8)
    with pytest.raises(ValueError, match="K="):
        gemm(x=x, w=w, w_zero_point=np.array([0, 127], np.int32))
    y = gemm(x=x[:, :k], w=w[:, :k], w_zero_point=np.array([0, 127], np.int32))
    assert int(y[0, 1]) == k * (-128) * (-255)
