"""Bad-input battery for the raw bindings (``pyqsim._C``), called directly, below the op layer (spec §11).

Protection guarded: the argument checks of bindings/module.cpp -- ``take()`` (type, dtype, byte order, ndim,
C-contiguity, alignment), ``int_vector()`` / ``scale_vector()`` (length and value ranges), ``make_stage()`` /
``make_split_stage()``, ``check_zero_point()``, ``pair_of()`` / ``geometry()``, the §4.1 and §7 overflow
preconditions, the packed-weight checks (format, width, padding nibble, kind). Every case must raise
TypeError or ValueError whose message names the argument; if one of those checks were removed, the call
would return (or touch memory it must not) and the case would fail.

Cases that could crash or hang the process if a protection were missing -- fake huge shapes (zero-size
arrays whose other dimensions are 2^40..2^62), outputs of petabytes -- run in a child process with a time
limit (:func:`isolated`): a crash or a hang fails that one case, never the test run.

``KNOWN`` cases are strict xfails: protections that are missing today (docs/reliability.md, "Open
findings"). They fail while the gap exists and turn into a failure (XPASS) once it is fixed, so the marker
is removed together with the fix.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.needs_cpu_ext

ISOLATED_TIMEOUT = float(os.environ.get("PYQSIM_ISOLATED_TIMEOUT", "60"))  # a case that should raise at once
HANG_TIMEOUT = 5.0  # a known hang: long enough to start Python and import pyqsim, short enough for CI


# --------------------------------------------------------------------------------------------- array helpers


def arr(shape, dtype=np.int8, fill=0):
    return np.full(shape, fill, dtype)


def misaligned(values, dtype=np.int32):
    """A C-contiguous view of ``values`` whose data pointer is 1 byte off the item alignment."""
    values = np.asarray(values, dtype)
    raw = np.zeros(values.nbytes + 1, np.uint8)
    out = raw[1:].view(dtype).reshape(values.shape)
    out[...] = values
    assert out.ctypes.data % np.dtype(dtype).itemsize != 0
    return out


def strided(a):
    """A non-contiguous view with the values of ``a`` (every other element of a doubled last axis)."""
    return np.repeat(a, 2, axis=-1)[..., ::2]


def fake(shape, dtype=np.int8):
    """A zero-stride view of ``shape`` backed by one element: a huge shape that allocates nothing."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def swapped(a):
    return a.astype(a.dtype.newbyteorder())


def i32(n, fill=0):
    return np.full(n, fill, np.int32)


def f32(n, fill=1.0):
    return np.full(n, fill, np.float32)


# --------------------------------------------------------------------------------------------- bindings


def base_int_gemm():
    return dict(x=arr((2, 4), np.uint8), w=arr((3, 4)), w_format="int8", x_zero_point=0, w_zero_point=i32(3),
                bias=None, out_dtype="int32", multiplier=None, shift=None, out_zero_point=0, out_scale=None)


def base_split_gemm():
    return dict(x1=arr((2, 4), np.uint8), w1=arr((3, 4)), w1_format="int8", x2=arr((2, 5)), w2=arr((3, 5)),
                w2_format="int8", x1_zero_point=0, x2_zero_point=0, w1_zero_point=i32(3), w2_zero_point=i32(3),
                bias=None, out_dtype="int8", multiplier1=i32(3, 2**30), multiplier2=i32(3, 2**30),
                shift=i32(3, 31), out_zero_point=0, out_scale1=None, out_scale2=None)


def base_int_conv2d():
    return dict(x=arr((1, 4, 5, 5), np.uint8), w=arr((6, 2, 3, 3)), w_format="int8", kernel_size=(3, 3),
                stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=2, x_zero_point=0, w_zero_point=i32(6),
                bias=None, out_dtype="int32", multiplier=None, shift=None, out_zero_point=0, out_scale=None)


def base_split_conv2d():
    return dict(x1=arr((1, 2, 4, 4), np.uint8), w1=arr((3, 2, 1, 1)), w1_format="int8", x2=arr((1, 3, 4, 4)),
                w2=arr((3, 3, 1, 1)), w2_format="int8", kernel_size=(1, 1), stride=(1, 1), padding=(0, 0),
                dilation=(1, 1), x1_zero_point=0, x2_zero_point=0, w1_zero_point=i32(3), w2_zero_point=i32(3),
                bias=None, out_dtype="float32", multiplier1=None, multiplier2=None, shift=None,
                out_zero_point=0, out_scale1=f32(3), out_scale2=f32(3))


def base_requantize():
    return dict(acc=arr((2, 3, 4), np.int32), multiplier=i32(3, 2**30), shift=i32(3, 31), zero_point=0,
                out_dtype="int8")


def base_log2_attn_matmul():
    return dict(codes=arr((2, 3), np.uint8), v=arr((3, 4)), v_zero_point=0, bits=4, k=2, frac_bits=16,
                out_dtype="int64", multiplier=None, shift=None, out_zero_point=0, out_scale=None)


def base_int_bmm():
    return dict(a=arr((2, 3, 4), np.uint8), b=arr((2, 5, 4)), a_zero_point=0, b_zero_point=0, out_dtype="int32",
                multiplier=None, shift=None, out_zero_point=0, out_scale=None)


def base_pack_gemm_weight():
    return dict(w=arr((3, 4)), w_format="int8", k=4)


def base_pack_conv_weight():
    return dict(w=arr((4, 2, 3, 3)), w_format="int8", cin_per_group=2, kernel_size=(3, 3), groups=2)


BASES = {
    "int_gemm": base_int_gemm, "split_gemm": base_split_gemm, "int_conv2d": base_int_conv2d,
    "split_conv2d": base_split_conv2d, "requantize": base_requantize, "log2_attn_matmul": base_log2_attn_matmul,
    "int_bmm": base_int_bmm,
    "pack_gemm_weight": base_pack_gemm_weight, "pack_conv_weight": base_pack_conv_weight,
}
REQ = dict(out_dtype="int8", multiplier=i32(3, 2**30), shift=i32(3, 31))
F32OUT = dict(out_dtype="float32", out_scale=f32(3))
U4 = np.uint8


def C_():
    from pyqsim import _C
    return _C


def call(binding: str, **overrides):
    kw = BASES[binding]()
    kw.update(overrides)
    return getattr(C_(), binding)(**kw)


# --------------------------------------------------------------------------------------------- the battery
# (binding, id, overrides, exception, regex the message must match: it names the argument)

CASES = [
    # ---- int_gemm: x
    ("int_gemm", "x list", dict(x=[[1, 2, 3, 4]]), TypeError, "x must be a NumPy array"),
    ("int_gemm", "x None", dict(x=None), TypeError, "x must be a NumPy array"),
    ("int_gemm", "x int16", dict(x=arr((2, 4), np.int16)), TypeError, "x must have dtype int8 or uint8"),
    ("int_gemm", "x float32", dict(x=arr((2, 4), np.float32)), TypeError, "x must have dtype"),
    ("int_gemm", "x bool", dict(x=arr((2, 4), np.bool_)), TypeError, "x must have dtype"),
    ("int_gemm", "x object", dict(x=np.zeros((2, 4), object)), TypeError, "x must have dtype"),
    ("int_gemm", "x bytes", dict(x=b"\0" * 8), TypeError, "x must have dtype"),
    ("int_gemm", "x 0-d", dict(x=np.array(3, np.int8)), ValueError, "x must be 2-D"),
    ("int_gemm", "x 3-D", dict(x=arr((1, 2, 4), np.uint8)), ValueError, "x must be 2-D"),
    ("int_gemm", "x strided", dict(x=strided(arr((2, 4), np.uint8))), ValueError, "x must be C-contiguous"),
    ("int_gemm", "x Fortran", dict(x=np.asfortranarray(arr((2, 4), np.uint8))), ValueError, "x must be C-contiguous"),
    ("int_gemm", "x zero-stride 2^40 rows", dict(x=fake((2**40, 4), np.uint8)), ValueError, "x must be C-contiguous"),
    ("int_gemm", "x zero-stride 2^31 x 2^31", dict(x=fake((2**31, 2**31), np.uint8)), ValueError,
     "x must be C-contiguous"),
    # ---- int_gemm: w
    ("int_gemm", "w None", dict(w=None), TypeError, "w must be a NumPy array"),
    ("int_gemm", "w uint8 for int8", dict(w=arr((3, 4), np.uint8)), TypeError, "w must have dtype int8"),
    ("int_gemm", "w int8 for int4", dict(w=arr((3, 2)), w_format="int4"), TypeError, "w must have dtype uint8"),
    ("int_gemm", "w 1-D", dict(w=arr(4)), ValueError, "w must be 2-D"),
    ("int_gemm", "w strided", dict(w=strided(arr((3, 4)))), ValueError, "w must be C-contiguous"),
    ("int_gemm", "w zero-stride 2^40 rows", dict(w=fake((2**40, 4))), ValueError, "w must be C-contiguous"),
    ("int_gemm", "w K mismatch", dict(w=arr((3, 5))), ValueError, "w must have K=4"),
    ("int_gemm", "w packed width", dict(w=arr((3, 4), U4), w_format="int4"), ValueError, "ceil\\(K/2\\)=2"),
    ("int_gemm", "w packed width uint4", dict(w=arr((3, 3), U4), w_format="uint4"), ValueError, "ceil\\(K/2\\)"),
    ("int_gemm", "w padding nibble", dict(x=arr((2, 3), np.uint8), w=arr((3, 2), U4, 0xF0), w_format="int4"),
     ValueError, "padding nibble"),
    ("int_gemm", "w_format int2", dict(w_format="int2"), ValueError, "w_format must be one of"),
    ("int_gemm", "w_format empty", dict(w_format=""), ValueError, "w_format"),
    ("int_gemm", "w_format None", dict(w_format=None), TypeError, "w_format: str"),
    # ---- int_gemm: zero points
    ("int_gemm", "x_zero_point 256 uint8", dict(x_zero_point=256), ValueError, "x_zero_point must be in \\[0, 255\\]"),
    ("int_gemm", "x_zero_point -1 uint8", dict(x_zero_point=-1), ValueError, "x_zero_point"),
    ("int_gemm", "x_zero_point 128 int8", dict(x=arr((2, 4)), x_zero_point=128), ValueError,
     "x_zero_point must be in \\[-128, 127\\]"),
    ("int_gemm", "x_zero_point 2^63", dict(x_zero_point=2**63), TypeError, "x_zero_point: "),
    ("int_gemm", "x_zero_point float", dict(x_zero_point=1.5), TypeError, "x_zero_point: "),
    ("int_gemm", "w_zero_point None", dict(w_zero_point=None), TypeError, "w_zero_point must be a NumPy array"),
    ("int_gemm", "w_zero_point length", dict(w_zero_point=i32(2)), ValueError, "w_zero_point must have shape \\(3,\\)"),
    ("int_gemm", "w_zero_point int64", dict(w_zero_point=np.zeros(3, np.int64)), TypeError, "w_zero_point must have dtype int32"),
    ("int_gemm", "w_zero_point big-endian", dict(w_zero_point=swapped(i32(3))), TypeError, "w_zero_point must have dtype"),
    ("int_gemm", "w_zero_point misaligned", dict(w_zero_point=misaligned([0, 0, 0])), ValueError,
     "w_zero_point must be aligned"),
    ("int_gemm", "w_zero_point strided", dict(w_zero_point=strided(i32(3))), ValueError, "w_zero_point must be C-contiguous"),
    ("int_gemm", "w_zero_point 2-D", dict(w_zero_point=np.zeros((3, 1), np.int32)), ValueError, "w_zero_point must be 1-D"),
    ("int_gemm", "w_zero_point 128 int8", dict(w_zero_point=np.array([0, 0, 128], np.int32)), ValueError,
     "w_zero_point values must be in \\[-128, 127\\]"),
    ("int_gemm", "w_zero_point 8 int4", dict(w=arr((3, 2), U4), w_format="int4", w_zero_point=i32(3, 8)), ValueError,
     "w_zero_point values must be in \\[-8, 7\\]"),
    ("int_gemm", "w_zero_point -1 uint4", dict(w=arr((3, 2), U4), w_format="uint4", w_zero_point=i32(3, -1)),
     ValueError, "w_zero_point values must be in \\[0, 15\\]"),
    ("int_gemm", "w_zero_point 16 uint4", dict(w=arr((3, 2), U4), w_format="uint4", w_zero_point=i32(3, 16)),
     ValueError, "w_zero_point values must be in \\[0, 15\\]"),
    # ---- int_gemm: bias and the §4.1 bound
    ("int_gemm", "bias int64", dict(bias=np.zeros(3, np.int64)), TypeError, "bias must have dtype int32"),
    ("int_gemm", "bias list", dict(bias=[0, 0, 0]), TypeError, "bias must be a NumPy array"),
    ("int_gemm", "bias length", dict(bias=i32(2)), ValueError, "bias must have shape \\(3,\\)"),
    ("int_gemm", "bias misaligned (uint8 buffer + 1 as int32)", dict(bias=misaligned([1, 2, 3])), ValueError,
     "bias must be aligned"),
    ("int_gemm", "bias strided", dict(bias=strided(i32(3))), ValueError, "bias must be C-contiguous"),
    ("int_gemm", "bias overflow", dict(bias=i32(3, 2**31 - 1)), ValueError, "2\\^31-1"),
    ("int_gemm", "bias INT32_MIN", dict(bias=i32(3, -(2**31))), ValueError, "2\\^31-1"),
    ("int_gemm", "K int8 beyond bound", dict(x=arr((1, 131072)), w=arr((3, 131072))), ValueError, "K=131072"),
    ("int_gemm", "K int4 beyond bound", dict(x=arr((1, 2**21), np.uint8), x_zero_point=128, w=arr((1, 2**20), U4),
                                             w_format="int4", w_zero_point=i32(1)), ValueError, "K=2097152"),
    ("int_gemm", "K bound with worst zero point", dict(x=arr((1, 40000)), x_zero_point=127, w=arr((2, 40000)),
                                                       w_zero_point=np.array([-128, 127], np.int32)), ValueError,
     "K=40000"),
    # ---- int_gemm: output stage
    ("int_gemm", "out_dtype int16", dict(out_dtype="int16"), ValueError, "out_dtype must be one of"),
    ("int_gemm", "out_dtype int64", dict(out_dtype="int64"), ValueError, "out_dtype must be one of"),
    ("int_gemm", "out_dtype None", dict(out_dtype=None), TypeError, "out_dtype: str"),
    ("int_gemm", "requant without multiplier", dict(out_dtype="int8"), ValueError, "multiplier and shift are required"),
    ("int_gemm", "multiplier -1", dict(REQ, multiplier=i32(3, -1)), ValueError, "multiplier values must be in"),
    ("int_gemm", "multiplier INT32_MIN", dict(REQ, multiplier=i32(3, -(2**31))), ValueError, "multiplier values"),
    ("int_gemm", "multiplier length", dict(REQ, multiplier=i32(4, 1)), ValueError, "multiplier must have shape"),
    ("int_gemm", "multiplier float", dict(REQ, multiplier=f32(3)), TypeError, "multiplier must have dtype int32"),
    ("int_gemm", "multiplier misaligned", dict(REQ, multiplier=misaligned([1, 1, 1])), ValueError, "multiplier must be aligned"),
    ("int_gemm", "shift 0", dict(REQ, shift=i32(3, 0)), ValueError, "shift values must be in \\[1, 94\\]"),
    ("int_gemm", "shift 95", dict(REQ, shift=i32(3, 95)), ValueError, "shift values must be in \\[1, 94\\]"),
    ("int_gemm", "shift -1", dict(REQ, shift=i32(3, -1)), ValueError, "shift values"),
    ("int_gemm", "shift INT32_MAX", dict(REQ, shift=i32(3, 2**31 - 1)), ValueError, "shift values"),
    ("int_gemm", "shift misaligned", dict(REQ, shift=misaligned([31, 31, 31])), ValueError, "shift must be aligned"),
    ("int_gemm", "out_zero_point 128 int8", dict(REQ, out_zero_point=128), ValueError, "out_zero_point must be in"),
    ("int_gemm", "out_zero_point -1 uint8", dict(REQ, out_dtype="uint8", out_zero_point=-1), ValueError, "out_zero_point"),
    ("int_gemm", "out_zero_point 8 int4", dict(REQ, out_dtype="int4", out_zero_point=8), ValueError, "out_zero_point"),
    ("int_gemm", "out_zero_point 16 uint4", dict(REQ, out_dtype="uint4", out_zero_point=16), ValueError, "out_zero_point"),
    ("int_gemm", "out_zero_point 2^40", dict(REQ, out_zero_point=2**40), ValueError, "out_zero_point"),
    ("int_gemm", "float32 without out_scale", dict(out_dtype="float32"), ValueError, "out_scale is required"),
    ("int_gemm", "out_scale 0", dict(F32OUT, out_scale=np.array([1, 0, 1], np.float32)), ValueError,
     "out_scale must be finite and > 0"),
    ("int_gemm", "out_scale -0.0", dict(F32OUT, out_scale=np.array([1, -0.0, 1], np.float32)), ValueError, "out_scale"),
    ("int_gemm", "out_scale negative", dict(F32OUT, out_scale=f32(3, -1.0)), ValueError, "out_scale"),
    ("int_gemm", "out_scale NaN", dict(F32OUT, out_scale=f32(3, np.nan)), ValueError, "out_scale"),
    ("int_gemm", "out_scale inf", dict(F32OUT, out_scale=f32(3, np.inf)), ValueError, "out_scale"),
    ("int_gemm", "out_scale -inf", dict(F32OUT, out_scale=f32(3, -np.inf)), ValueError, "out_scale"),
    ("int_gemm", "out_scale float64", dict(F32OUT, out_scale=np.ones(3)), TypeError, "out_scale must have dtype float32"),
    ("int_gemm", "out_scale float16", dict(F32OUT, out_scale=np.ones(3, np.float16)), TypeError, "out_scale"),
    ("int_gemm", "out_scale length", dict(F32OUT, out_scale=f32(2)), ValueError, "out_scale must have shape"),
    ("int_gemm", "out_scale misaligned", dict(F32OUT, out_scale=misaligned([1, 1, 1], np.float32)), ValueError,
     "out_scale must be aligned"),
    # ---- split_gemm
    ("split_gemm", "x2 float", dict(x2=arr((2, 5), np.float32)), TypeError, "x2 must have dtype"),
    ("split_gemm", "x1 strided", dict(x1=strided(arr((2, 4), np.uint8))), ValueError, "x1 must be C-contiguous"),
    ("split_gemm", "M mismatch", dict(x2=arr((3, 5))), ValueError, "x1 and x2 must have the same number of rows"),
    ("split_gemm", "N mismatch", dict(w2=arr((2, 5))), ValueError, "w2 must have 3 rows"),
    ("split_gemm", "w2 K mismatch", dict(w2=arr((3, 4))), ValueError, "w2 must have K=5"),
    ("split_gemm", "w1 packed width", dict(w1=arr((3, 3), U4), w1_format="int4"), ValueError, "w1 \\(packed int4\\)"),
    ("split_gemm", "w2_format bad", dict(w2_format="int3"), ValueError, "w_format"),
    ("split_gemm", "x2_zero_point 128", dict(x2_zero_point=128), ValueError, "x2_zero_point"),
    ("split_gemm", "x1_zero_point -1 uint8", dict(x1_zero_point=-1), ValueError, "x1_zero_point"),
    ("split_gemm", "w1_zero_point length", dict(w1_zero_point=i32(2)), ValueError, "w1_zero_point"),
    ("split_gemm", "w2_zero_point range", dict(w2_zero_point=i32(3, -129)), ValueError, "w2_zero_point"),
    ("split_gemm", "bias length", dict(bias=i32(4)), ValueError, "bias"),
    ("split_gemm", "K1 + K2 beyond bound", dict(x1=arr((1, 70000)), w1=arr((3, 70000)), x2=arr((1, 70000)),
                                                w2=arr((3, 70000))), ValueError, "K1 \\+ K2"),
    ("split_gemm", "out_dtype int32", dict(out_dtype="int32"), ValueError, "out_dtype must be one of"),
    ("split_gemm", "multiplier2 missing", dict(multiplier2=None), ValueError, "multiplier1, multiplier2 and shift"),
    ("split_gemm", "multiplier1 negative", dict(multiplier1=i32(3, -5)), ValueError, "multiplier1 values"),
    ("split_gemm", "shift 95", dict(shift=i32(3, 95)), ValueError, "shift values"),
    ("split_gemm", "out_zero_point 200", dict(out_zero_point=200), ValueError, "out_zero_point"),
    ("split_gemm", "float32 missing out_scale2", dict(out_dtype="float32", out_scale1=f32(3)), ValueError,
     "out_scale1 and out_scale2 are required"),
    ("split_gemm", "out_scale2 NaN", dict(out_dtype="float32", out_scale1=f32(3), out_scale2=f32(3, np.nan)),
     ValueError, "out_scale2"),
    # ---- int_conv2d
    ("int_conv2d", "x float", dict(x=arr((1, 4, 5, 5), np.float32)), TypeError, "x must have dtype"),
    ("int_conv2d", "x 3-D", dict(x=arr((4, 5, 5), np.uint8)), ValueError, "x must be 4-D"),
    ("int_conv2d", "x strided", dict(x=strided(arr((1, 4, 5, 5), np.uint8))), ValueError, "x must be C-contiguous"),
    ("int_conv2d", "x zero-stride 2^40 channels", dict(x=fake((1, 2**40, 5, 5), np.uint8)), ValueError,
     "x must be C-contiguous"),
    ("int_conv2d", "groups 3", dict(groups=3), ValueError, "groups=3 must divide the input channels"),
    ("int_conv2d", "groups 0", dict(groups=0), ValueError, "groups must be >= 1"),
    ("int_conv2d", "groups -1", dict(groups=-1), ValueError, "groups must be >= 1"),
    ("int_conv2d", "groups float", dict(groups=2.0), TypeError, "groups: "),
    ("int_conv2d", "w C/groups mismatch", dict(w=arr((6, 4, 3, 3))), ValueError, "w must have shape"),
    ("int_conv2d", "kernel_size disagrees", dict(kernel_size=(2, 3)), ValueError, "w must have shape"),
    ("int_conv2d", "kernel_size 0", dict(kernel_size=(0, 3)), ValueError, "kernel_size must be >= 1"),
    ("int_conv2d", "kernel_size triple", dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be a pair"),
    ("int_conv2d", "O not divisible by groups", dict(w=arr((5, 2, 3, 3))), ValueError, "groups must divide"),
    ("int_conv2d", "w packed width", dict(w=arr((6, 8), U4), w_format="int4"), ValueError, "w \\(packed int4\\)"),
    ("int_conv2d", "w packed padding nibble", dict(x=arr((1, 2, 5, 5), np.uint8), w=arr((6, 5), U4, 0xF0),
                                                   w_format="int4", groups=2, kernel_size=(3, 3)), ValueError,
     "padding nibble"),
    ("int_conv2d", "output not positive", dict(x=arr((1, 4, 2, 2), np.uint8)), ValueError, "output size is not positive"),
    ("int_conv2d", "stride 0", dict(stride=(0, 1)), ValueError, "stride must be >= 1"),
    ("int_conv2d", "stride -1", dict(stride=(1, -1)), ValueError, "stride must be >= 1"),
    ("int_conv2d", "padding -1", dict(padding=(-1, 0)), ValueError, "padding must be >= 0"),
    ("int_conv2d", "dilation 0", dict(dilation=(1, 0)), ValueError, "dilation must be >= 1"),
    ("int_conv2d", "padding 2^41", dict(padding=(2**41, 0)), ValueError, "geometry is out of range"),
    ("int_conv2d", "x_zero_point 256", dict(x_zero_point=256), ValueError, "x_zero_point"),
    ("int_conv2d", "w_zero_point length", dict(w_zero_point=i32(5)), ValueError, "w_zero_point"),
    ("int_conv2d", "w_zero_point int4 range", dict(w=arr((6, 9), U4), w_format="int4", w_zero_point=i32(6, 9)),
     ValueError, "w_zero_point values must be in \\[-8, 7\\]"),
    ("int_conv2d", "bias misaligned", dict(bias=misaligned(np.zeros(6))), ValueError, "bias must be aligned"),
    ("int_conv2d", "K beyond bound", dict(x=arr((1, 1, 400, 400)), w=arr((1, 1, 400, 400)), kernel_size=(400, 400),
                                          groups=1, w_zero_point=i32(1)), ValueError, "C/groups\\*KH\\*KW=160000"),
    ("int_conv2d", "out_dtype int64", dict(out_dtype="int64"), ValueError, "out_dtype"),
    ("int_conv2d", "shift 0", dict(out_dtype="uint4", multiplier=i32(6, 1), shift=i32(6, 0)), ValueError, "shift values"),
    ("int_conv2d", "out_scale NaN", dict(out_dtype="float32", out_scale=f32(6, np.nan)), ValueError, "out_scale"),
    # ---- split_conv2d
    ("split_conv2d", "spatial mismatch", dict(x2=arr((1, 3, 5, 4))), ValueError, "x1 and x2 must share batch and spatial"),
    ("split_conv2d", "batch mismatch", dict(x2=arr((2, 3, 4, 4))), ValueError, "x1 and x2 must share"),
    ("split_conv2d", "O mismatch", dict(w2=arr((2, 3, 1, 1)), w2_zero_point=i32(2)), ValueError,
     "w1 and w2 must have the same output channels"),
    ("split_conv2d", "w2 kernel mismatch", dict(w2=arr((3, 3, 3, 3))), ValueError, "w2 must have shape"),
    ("split_conv2d", "x1 int16", dict(x1=arr((1, 2, 4, 4), np.int16)), TypeError, "x1 must have dtype"),
    ("split_conv2d", "x2 3-D", dict(x2=arr((3, 4, 4))), ValueError, "x2 must be 4-D"),
    ("split_conv2d", "stride 0", dict(stride=(0, 0)), ValueError, "stride"),
    ("split_conv2d", "x2_zero_point range", dict(x2_zero_point=-129), ValueError, "x2_zero_point"),
    ("split_conv2d", "w1_zero_point range", dict(w1_zero_point=i32(3, 128)), ValueError, "w1_zero_point"),
    ("split_conv2d", "out_dtype int32", dict(out_dtype="int32"), ValueError, "out_dtype"),
    ("split_conv2d", "out_scale1 zero", dict(out_scale1=f32(3, 0.0)), ValueError, "out_scale1"),
    ("split_conv2d", "requant missing shift", dict(out_dtype="int8", multiplier1=i32(3, 1), multiplier2=i32(3, 1)),
     ValueError, "shift"),
    # ---- requantize
    ("requantize", "acc int64", dict(acc=arr((2, 3, 4), np.int64)), TypeError, "acc must have dtype int32"),
    ("requantize", "acc float", dict(acc=arr((2, 3, 4), np.float32)), TypeError, "acc must have dtype"),
    ("requantize", "acc 2-D", dict(acc=arr((3, 4), np.int32)), ValueError, "acc must be 3-D"),
    ("requantize", "acc strided", dict(acc=strided(arr((2, 3, 4), np.int32))), ValueError, "acc must be C-contiguous"),
    ("requantize", "acc misaligned", dict(acc=misaligned(np.zeros((2, 3, 4)))), ValueError, "acc must be aligned"),
    ("requantize", "acc zero-stride 2^40", dict(acc=fake((2**40, 3, 4), np.int32)), ValueError, "acc must be C-contiguous"),
    ("requantize", "multiplier length", dict(multiplier=i32(4, 1)), ValueError, "multiplier must have shape \\(3,\\)"),
    ("requantize", "multiplier missing", dict(multiplier=None), ValueError, "multiplier and shift are required"),
    ("requantize", "shift 95", dict(shift=i32(3, 95)), ValueError, "shift values"),
    ("requantize", "zero_point 128", dict(zero_point=128), ValueError, "out_zero_point"),
    ("requantize", "zero_point uint4 16", dict(zero_point=16, out_dtype="uint4"), ValueError, "out_zero_point"),
    ("requantize", "out_dtype int32", dict(out_dtype="int32"), ValueError, "out_dtype"),
    ("requantize", "out_dtype float32", dict(out_dtype="float32"), ValueError, "out_dtype"),
    # ---- int_bmm
    ("int_bmm", "a int32", dict(a=arr((2, 3, 4), np.int32)), TypeError, "a must have dtype"),
    ("int_bmm", "a 1-D", dict(a=arr(4, np.uint8)), ValueError, "a must be at least 2-D"),
    ("int_bmm", "a strided", dict(a=strided(arr((2, 3, 4), np.uint8))), ValueError, "a must have C-contiguous rows or columns"),
    ("int_bmm", "b reversed rows", dict(b=arr((2, 5, 4))[:, ::-1]), ValueError, "b must not have negative strides"),
    ("int_bmm", "b float", dict(b=arr((2, 5, 4), np.float32)), TypeError, "b must have dtype"),
    ("int_bmm", "b leading dims", dict(b=arr((3, 5, 4))), ValueError, "leading dimensions of a"),
    ("int_bmm", "b ndim", dict(b=arr((5, 4))), ValueError, "leading dimensions of a"),
    ("int_bmm", "K mismatch", dict(b=arr((2, 5, 3))), ValueError, "K=4"),
    ("int_bmm", "a_zero_point 256", dict(a_zero_point=256), ValueError, "a_zero_point"),
    ("int_bmm", "b_zero_point -129", dict(b_zero_point=-129), ValueError, "b_zero_point"),
    ("int_bmm", "K beyond §4.1", dict(a=arr((1, 1, 70000), np.uint8), b=arr((1, 1, 70000), np.uint8)), ValueError,
     "int_bmm: worst-case"),
    ("int_bmm", "out_dtype int64", dict(out_dtype="int64"), ValueError, "out_dtype"),
    ("int_bmm", "float32 without scale", dict(out_dtype="float32"), ValueError, "out_scale is required"),
    # ---- log2_attn_matmul
    ("log2_attn_matmul", "codes out of range", dict(codes=arr((2, 3), np.uint8, 16)), ValueError,
     "codes must be in \\[0, 15\\]"),
    ("log2_attn_matmul", "codes bits=2", dict(codes=arr((2, 3), np.uint8, 4), bits=2), ValueError,
     "codes must be in \\[0, 3\\]"),
    ("log2_attn_matmul", "codes int8", dict(codes=arr((2, 3))), TypeError, "codes must have dtype uint8"),
    ("log2_attn_matmul", "codes strided", dict(codes=strided(arr((2, 3), np.uint8))), ValueError, "codes must be C-contiguous"),
    ("log2_attn_matmul", "codes 1-D", dict(codes=arr(3, np.uint8)), ValueError, "codes must be at least 2-D"),
    ("log2_attn_matmul", "v leading dims", dict(codes=arr((2, 2, 3), np.uint8), v=arr((3, 3, 4))), ValueError,
     "leading dimensions of codes"),
    ("log2_attn_matmul", "v ndim", dict(codes=arr((2, 2, 3), np.uint8)), ValueError, "leading dimensions of codes"),
    ("log2_attn_matmul", "v int32", dict(v=arr((3, 4), np.int32)), TypeError, "v must have dtype"),
    ("log2_attn_matmul", "v strided", dict(v=strided(arr((3, 4)))), ValueError, "v must have C-contiguous rows or columns"),
    ("log2_attn_matmul", "v L mismatch", dict(v=arr((4, 4))), ValueError, "L=3"),
    ("log2_attn_matmul", "bits 1", dict(bits=1), ValueError, "bits must be in \\[2, 8\\]"),
    ("log2_attn_matmul", "bits 9", dict(bits=9), ValueError, "bits"),
    ("log2_attn_matmul", "bits 2^40", dict(bits=2**40), TypeError, "bits: "),
    ("log2_attn_matmul", "k 3", dict(k=3), ValueError, "mode k must be 1"),
    ("log2_attn_matmul", "k 0", dict(k=0), ValueError, "mode k"),
    ("log2_attn_matmul", "frac_bits -1", dict(frac_bits=-1), ValueError, "frac_bits must be in \\[0, 24\\]"),
    ("log2_attn_matmul", "frac_bits 25", dict(frac_bits=25), ValueError, "frac_bits"),
    ("log2_attn_matmul", "v_zero_point -129", dict(v_zero_point=-129), ValueError, "v_zero_point"),
    ("log2_attn_matmul", "v_zero_point 256 uint8", dict(v=arr((3, 4), np.uint8), v_zero_point=256), ValueError,
     "v_zero_point"),
    ("log2_attn_matmul", "out_dtype int32", dict(out_dtype="int32"), ValueError, "out_dtype"),
    ("log2_attn_matmul", "float32 without scale", dict(out_dtype="float32"), ValueError, "out_scale is required"),
    ("log2_attn_matmul", "out_scale inf", dict(out_dtype="float32", out_scale=f32(4, np.inf)), ValueError, "out_scale"),
    ("log2_attn_matmul", "requant shift 0", dict(out_dtype="int8", multiplier=i32(4, 1), shift=i32(4, 0)), ValueError,
     "shift values"),
    ("log2_attn_matmul", "L beyond int64 bound", dict(codes=arr((0, 2**40), np.uint8), v=arr((2**40, 0))), ValueError,
     "L=1099511627776 is too long"),
    ("log2_attn_matmul", "L at bound for frac_bits 24", dict(codes=arr((0, 2**31), np.uint8), v=arr((2**31, 0)),
                                                             frac_bits=24), ValueError, "too long for frac_bits=24"),
    # ---- pack_gemm_weight
    ("pack_gemm_weight", "k negative", dict(k=-1), ValueError, "k must be >= 0"),
    ("pack_gemm_weight", "k mismatch", dict(k=5), ValueError, "w must have K=5"),
    ("pack_gemm_weight", "w float", dict(w=arr((3, 4), np.float32)), TypeError, "w must have dtype int8"),
    ("pack_gemm_weight", "w strided", dict(w=strided(arr((3, 4)))), ValueError, "w must be C-contiguous"),
    ("pack_gemm_weight", "w_format uint8", dict(w_format="uint8"), ValueError, "w_format"),
    ("pack_gemm_weight", "int4 width", dict(w=arr((3, 3), U4), w_format="int4", k=4), ValueError, "ceil\\(K/2\\)=2"),
    ("pack_gemm_weight", "int4 padding nibble", dict(w=arr((3, 2), U4, 0x10), w_format="uint4", k=3), ValueError,
     "padding nibble"),
    # ---- pack_conv_weight
    ("pack_conv_weight", "groups 0", dict(groups=0), ValueError, "groups must be >= 1"),
    ("pack_conv_weight", "kernel_size 0", dict(kernel_size=(0, 3)), ValueError, "kernel_size must be >= 1"),
    ("pack_conv_weight", "kernel_size triple", dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be a pair"),
    ("pack_conv_weight", "shape mismatch", dict(cin_per_group=3), ValueError, "w must have shape"),
    ("pack_conv_weight", "O not divisible", dict(w=arr((3, 2, 3, 3))), ValueError, "groups must divide"),
    ("pack_conv_weight", "w 2-D int8", dict(w=arr((4, 18))), ValueError, "w must be 4-D"),
    ("pack_conv_weight", "int4 width", dict(w=arr((4, 8), U4), w_format="int4"), ValueError, "w \\(packed int4\\)"),
    ("pack_conv_weight", "int4 padding nibble", dict(w=arr((4, 5), U4, 0xF0), w_format="int4", cin_per_group=1),
     ValueError, "padding nibble"),
]


@pytest.mark.parametrize("binding,name,overrides,exc,match", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_binding_rejects(binding, name, overrides, exc, match):
    """Each bad argument is rejected by the binding with TypeError/ValueError naming it (spec §11)."""
    with pytest.raises(exc, match=match):
        call(binding, **overrides)


# --------------------------------------------------------------------------------------------- packed weights,
# thread and ISA controls, info functions


def _packed_gemm():
    return C_().pack_gemm_weight(arr((3, 4)), "int8", 4)


def _packed_conv():
    return C_().pack_conv_weight(arr((6, 2, 3, 3)), "int8", 2, (3, 3), 2)


MISC = [
    ("int_gemm", "packed conv weight as GEMM weight", lambda: call("int_gemm", w=_packed_conv()), ValueError,
     "w is a packed conv weight"),
    ("int_gemm", "packed weight K mismatch", lambda: call("int_gemm", x=arr((2, 5), np.uint8), w=_packed_gemm()),
     ValueError, "packed with K=4"),
    ("int_gemm", "packed weight format mismatch", lambda: call("int_gemm", w=_packed_gemm(), w_format="uint4"),
     ValueError, "was packed as int8"),
    ("int_conv2d", "packed GEMM weight as conv weight", lambda: call("int_conv2d", w=_packed_gemm()), ValueError,
     "w is a packed GEMM weight"),
    ("int_conv2d", "packed conv weight groups mismatch",
     lambda: call("int_conv2d", x=arr((1, 2, 5, 5), np.uint8), w=_packed_conv(), groups=1), ValueError,
     "was packed for C/groups=2"),
    ("set_num_threads", "0", lambda: C_().set_num_threads(0), ValueError, "threads must be >= 1"),
    ("set_num_threads", "-1", lambda: C_().set_num_threads(-1), ValueError, "threads must be >= 1"),
    ("set_num_threads", "2^31", lambda: C_().set_num_threads(2**31), TypeError, "n: "),
    ("set_num_threads", "str", lambda: C_().set_num_threads("2"), TypeError, "n: "),
    ("set_cpu_isa", "neon", lambda: C_().set_cpu_isa("neon"), ValueError, "cpu ISA override must be"),
    ("build_info", "extra argument", lambda: C_().build_info(1), TypeError, "build_info"),
    ("get_num_threads", "extra argument", lambda: C_().get_num_threads(1), TypeError, "get_num_threads"),
    # pair_of(): non-pair geometry arguments (R7, fixed)
    ("int_conv2d", "kernel_size str", lambda: call("int_conv2d", kernel_size="ab"), TypeError,
     "kernel_size must be a pair of ints"),
    ("int_conv2d", "kernel_size None", lambda: call("int_conv2d", kernel_size=None), TypeError, "kernel_size"),
    ("int_conv2d", "kernel_size floats", lambda: call("int_conv2d", kernel_size=(3.0, 3.0)), TypeError, "kernel_size"),
    ("int_conv2d", "stride int", lambda: call("int_conv2d", stride=1), TypeError, "stride must be a pair of ints"),
    ("int_conv2d", "padding 2^64", lambda: call("int_conv2d", padding=(2**64, 0)), TypeError, "padding"),
    ("split_conv2d", "dilation None", lambda: call("split_conv2d", dilation=None), TypeError, "dilation"),
    ("pack_conv_weight", "kernel_size int", lambda: call("pack_conv_weight", kernel_size=3), TypeError, "kernel_size"),
]


@pytest.mark.parametrize("binding,name,fn,exc,match", MISC, ids=[f"{c[0]}: {c[1]}" for c in MISC])
def test_binding_misc_rejects(binding, name, fn, exc, match):
    """Packed-weight kind/format/shape checks, thread-count and ISA setters, argument-less info functions."""
    old = C_().get_num_threads()
    try:
        with pytest.raises(exc, match=match):
            fn()
    finally:
        C_().set_num_threads(old)
        C_().set_cpu_isa(None)


# --------------------------------------------------------------------------------------------- fixed gaps
# Protections added for findings R5, R8, R9 of docs/reliability.md (in-process: they neither crash nor hang).

def _set_threads_huge():
    _C = C_()
    old = _C.get_num_threads()
    try:
        _C.set_num_threads(10**6)  # once accepted: the next kernel call spawned threads until the OS refused
    finally:
        _C.set_num_threads(old)


KNOWN = [
    ("set_cpu_isa", "int (R8)", lambda: C_().set_cpu_isa(5), TypeError, "name"),
    ("set_num_threads", "10^6 (R9)", _set_threads_huge, ValueError, "threads"),
    ("pack_conv_weight", "negative cin_per_group (R5)",
     lambda: C_().pack_conv_weight(arr((0, 0), U4), "int4", -1, (1, 1), 1), ValueError, "cin_per_group"),
]


@pytest.mark.parametrize("binding,name,fn,exc,match", KNOWN, ids=[f"{c[0]}: {c[1]}" for c in KNOWN])
def test_binding_fixed_gap(binding, name, fn, exc, match):
    """Guards the checks added for R5, R8, R9 (docs/reliability.md): the binding raises as expected."""
    with pytest.raises(exc, match=match):
        fn()


# --------------------------------------------------------------------------------------------- isolated cases

PRELUDE = """
import numpy as np
from pyqsim import _C
Z = lambda *shape, dt=np.int8: np.zeros(shape, dt)
z32 = lambda n: np.zeros(n, np.int32)
def report(fn):
    try:
        r = fn()
    except BaseException as e:
        print("RAISED", type(e).__name__, str(e).replace(chr(10), " ")[:300], flush=True)
    else:
        print("RETURNED", getattr(r, "shape", r), flush=True)
"""


def isolated(code: str, timeout: float = ISOLATED_TIMEOUT) -> tuple[int | None, str, str]:
    """Run ``code`` after PRELUDE in a fresh interpreter; (returncode or None on timeout, stdout, stderr)."""
    src = PRELUDE + "\n" + textwrap.dedent(code)
    try:
        p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, "timeout"
    return p.returncode, p.stdout, p.stderr


def assert_isolated_raises(code: str, excs: tuple, match: str | None = None, timeout: float = ISOLATED_TIMEOUT):
    rc, out, err = isolated(code, timeout)
    assert rc is not None, f"hung for more than {timeout} s (no exception, no result): {out}"
    assert rc == 0, f"child process died with status {rc} (crash):\n{err[-3000:]}"
    line = [l for l in out.splitlines() if l.startswith(("RAISED", "RETURNED"))][-1]
    assert line.startswith("RAISED"), f"accepted: {line}"
    kind = line.split()[1]
    assert kind in excs, line
    if match:
        import re
        assert re.search(match, line), line


# (id, code, allowed exception names, message regex or None, timeout); a zero-size array with huge other
# dimensions allocates nothing, so the binding alone has to stop the request.
ISOLATED = [
    ("int_gemm: output 2^64 bytes (M=2^62)",
     "report(lambda: _C.int_gemm(Z(2**62, 0), Z(4, 0), 'int8', 0, z32(4), None, 'int32', None, None, 0, None))",
     ("ValueError", "MemoryError"), None),
    ("int_gemm: output of petabytes (M=2^40, N=2^10)",
     "report(lambda: _C.int_gemm(Z(2**40, 0), Z(2**10, 0), 'int8', 0, z32(2**10), None, 'int32', None, None, 0, None))",
     ("MemoryError", "ValueError"), None),
    ("int_gemm: K=2^41 with M=N=0",
     "report(lambda: _C.int_gemm(Z(0, 2**41), Z(0, 2**41), 'int8', 0, z32(0), None, 'int32', None, None, 0, None))",
     ("RETURNED",), None),
    ("int_conv2d: output of petabytes (B=2^40)",
     "report(lambda: _C.int_conv2d(Z(2**40, 0, 4, 4), Z(1, 0, 1, 1), 'int8', (1, 1), (1, 1), (0, 0), (1, 1), 1, 0,"
     " z32(1), None, 'int32', None, None, 0, None))",
     ("MemoryError", "ValueError"), None),
    ("int_conv2d: H, W = 2^40 with C=0",
     "report(lambda: _C.int_conv2d(Z(1, 0, 2**40, 2**40), Z(1, 0, 1, 1), 'int8', (1, 1), (1, 1), (0, 0), (1, 1), 1,"
     " 0, z32(1), None, 'int32', None, None, 0, None))",
     ("MemoryError", "ValueError"), None),
    ("int_conv2d: H = 2^41 beyond the geometry range",
     "report(lambda: _C.int_conv2d(Z(1, 0, 2**41, 1), Z(1, 0, 1, 1), 'int8', (1, 1), (1, 1), (0, 0), (1, 1), 1, 0,"
     " z32(1), None, 'int32', None, None, 0, None))",
     ("ValueError",), "geometry is out of range"),
    ("split_conv2d: output of petabytes",
     "report(lambda: _C.split_conv2d(Z(2**40, 0, 4, 4), Z(1, 0, 1, 1), 'int8', Z(2**40, 0, 4, 4), Z(1, 0, 1, 1),"
     " 'int8', (1, 1), (1, 1), (0, 0), (1, 1), 0, 0, z32(1), z32(1), None, 'float32', None, None, None, 0,"
     " np.ones(1, np.float32), np.ones(1, np.float32)))",
     ("MemoryError", "ValueError"), None),
    ("split_gemm: output 2^64 bytes",
     "report(lambda: _C.split_gemm(Z(2**62, 0), Z(4, 0), 'int8', Z(2**62, 0), Z(4, 0), 'int8', 0, 0, z32(4), z32(4),"
     " None, 'float32', None, None, None, 0, np.ones(4, np.float32), np.ones(4, np.float32)))",
     ("ValueError", "MemoryError"), None),
    ("log2_attn_matmul: output of petabytes (M=2^40)",
     "report(lambda: _C.log2_attn_matmul(Z(2**40, 0, dt=np.uint8), Z(0, 2**10), 0, 4, 2, 16, 'int64', None, None, 0,"
     " None))",
     ("MemoryError", "ValueError"), None),
    ("requantize: outer 2^40, inner 2^20, N=0 gives an empty result",
     "report(lambda: _C.requantize(Z(2**40, 0, 2**20, dt=np.int32), z32(0), z32(0), 0, 'int8'))",
     ("RETURNED",), None),
]


@pytest.mark.parametrize("name,code,excs,match", ISOLATED, ids=[c[0] for c in ISOLATED])
def test_binding_huge_shapes_isolated(name, code, excs, match):
    """Fake huge shapes (zero-size arrays, products beyond 2^32 and 2^64): the binding raises MemoryError or a
    ValueError (or returns an empty result), never crashes or hangs. Guards the output-size and geometry checks
    (and numpy's allocation check that the binding relies on)."""
    if excs == ("RETURNED",):
        rc, out, err = isolated(code)
        assert rc == 0, err[-3000:]
        assert "RETURNED" in out, out
        return
    assert_isolated_raises(code, excs, match)


# Former hangs / undefined behaviour with fake huge shapes (R1-R6, fixed; isolated, short time limit).
KNOWN_ISOLATED = [
    ("pack_gemm_weight: N=2^40 rows with K=0 hangs (R1)",
     "report(lambda: _C.pack_gemm_weight(Z(2**40, 0), 'int8', 0))", ("ValueError", "MemoryError"), None),
    ("int_gemm: N=2^40 with K=0 hangs before the output check (R1)",
     "report(lambda: _C.int_gemm(Z(1, 0), Z(2**40, 0), 'int8', 0, z32(1), None, 'int32', None, None, 0, None))", ("ValueError", "MemoryError"), None),
    ("int_conv2d: groups=2^40 with C=0 hangs (R2)",
     "report(lambda: _C.int_conv2d(Z(1, 0, 3, 3), Z(0, 0, 1, 1), 'int8', (1, 1), (1, 1), (0, 0), (1, 1), 2**40, 0,"
     " z32(0), None, 'int32', None, None, 0, None))", ("ValueError", "MemoryError"), "groups"),
    ("int_conv2d: 2^40 kernel taps with C=0 hang (R3)",
     "report(lambda: _C.int_conv2d(Z(1, 0, 2**20, 2**20), Z(1, 0, 2**20, 2**20), 'int8', (2**20, 2**20), (1, 1),"
     " (0, 0), (1, 1), 1, 0, z32(1), None, 'int32', None, None, 0, None))", ("RETURNED",), None),
    ("int_conv2d: dilation*(kernel-1) overflows int64 (R4)",
     "report(lambda: _C.int_conv2d(Z(1, 0, 4, 4), Z(1, 0, 2**40, 1), 'int8', (2**40, 1), (1, 1), (0, 0), (2**40, 1),"
     " 1, 0, z32(1), None, 'int32', None, None, 0, None))", ("ValueError",), "geometry|output size|dilation"),
    ("pack_conv_weight: C/g*KH*KW overflows int64 (R5)",
     "report(lambda: _C.pack_conv_weight(Z(0, 2**62, dt=np.uint8), 'int4', 2**21, (2**21, 2**21), 1))",
     ("ValueError",), "^RAISED ValueError [^-]*$"),
    ("pack_gemm_weight: k=2^63-1 overflows k+1 (R6)",
     "report(lambda: _C.pack_gemm_weight(Z(0, 2**62, dt=np.uint8), 'int4', 2**63 - 1))",
     ("ValueError",), "^RAISED ValueError [^-]*$"),
]


@pytest.mark.parametrize("name,code,excs,match", KNOWN_ISOLATED, ids=[c[0] for c in KNOWN_ISOLATED])
def test_binding_fixed_gap_isolated(name, code, excs, match):
    """Guards R1-R6 of docs/reliability.md (work loops over a dimension of a zero-size array, signed 64-bit
    overflow): the binding rejects the request at once, or (R3, an empty reduction) returns the bias at once."""
    if excs == ("RETURNED",):
        rc, out, err = isolated(code, timeout=HANG_TIMEOUT)
        assert rc == 0 and "RETURNED" in out, (out, err[-3000:])
        return
    assert_isolated_raises(code, excs, match, timeout=HANG_TIMEOUT)


def test_isolated_harness_detects_a_crash():
    """The harness itself: a child killed by a signal is reported as a crash, a sleeping one as a hang."""
    rc, _, _ = isolated("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert rc is not None and rc != 0
    with pytest.raises(AssertionError, match="crash"):
        assert_isolated_raises("import os, signal; os.kill(os.getpid(), signal.SIGABRT)", ("ValueError",))
    with pytest.raises(AssertionError, match="hung"):
        assert_isolated_raises("import time; time.sleep(30)", ("ValueError",), timeout=3)


# --------------------------------------------------------------------------------------------- results stay right


def test_valid_edge_inputs_still_compute():
    """Read-only inputs, buffer-protocol inputs and zero-size dimensions are valid and equal the reference."""
    from pyqsim import ops
    x = np.arange(8, dtype=np.uint8).reshape(2, 4)
    x.setflags(write=False)
    w = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    w.setflags(write=False)
    y = call("int_gemm", x=x, w=w, x_zero_point=3)
    assert np.array_equal(y, ops.int_gemm(x, w, x_zero_point=3, backend="reference"))
    y = call("int_gemm", x=memoryview(x.tobytes()).cast("B", (2, 4)), w=w, x_zero_point=3)
    assert np.array_equal(y, ops.int_gemm(x, w, x_zero_point=3, backend="reference"))
    for m, n, k in [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0)]:
        y = call("int_gemm", x=arr((m, k), np.uint8), w=arr((n, k)), w_zero_point=i32(n))
        assert y.shape == (m, n) and not y.any()
    acc = np.arange(24, dtype=np.int32).reshape(2, 3, 4) * 1000
    assert np.array_equal(call("requantize", acc=acc),
                          ops.requantize(acc, 2**30, 31, axis=1, out_dtype="int8", backend="reference"))
