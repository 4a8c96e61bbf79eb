"""Reliability: the op-level bad-input battery, concurrency and determinism, memory, calibration inputs.

Memory tolerance: 10^4 repeated calls may grow the resident set by at most RSS_SLACK_MIB = 8 MiB after a
warm-up of WARMUP calls (allocator and interpreter caches settle during the warm-up; a leak of one output
or one packed weight per call is 10^4 times that, far above the slack).

Each group names, in its docstring, the protection it guards; every case would fail without it:
  * op battery: the argument contract of pyqsim._checks (spec §11) on every public op, on the reference and
    the cpu backends (validation happens before dispatch, so a backend cannot bypass it);
  * views: the op layer hands every backend C-contiguous, aligned arrays (_checks.canonical);
  * concurrency: the GIL is released around kernels, concurrent calls share no scratch state, the thread
    pool serializes jobs and thread-count changes (csrc/threadpool.cpp);
  * determinism: results do not depend on the number of native threads, the ISA, the run or the process;
  * memory: no per-call leak in the bindings (arrays, packed weights, exception paths) or the reference;
    a request too large for memory raises MemoryError;
  * calibration: RepQ-ViT / Q-Diffusion reject empty calibration sets and NaN data (see docs/reliability.md).

``python tests/test_reliability.py --table`` prints the case-count table of docs/reliability.md from the
parametrization of this file, test_bindings_errors.py, test_cli_errors.py and test_errors.py.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pyqsim import _checks as C
from pyqsim import ops

RSS_SLACK_MIB = 8
WARMUP = 300
REPEATS = 10_000


def _has_cpu() -> bool:
    return "cpu" in ops.available_backends()


def _sanitized() -> bool:
    """True inside the sanitizer build (.ci/sanitize.sh): ASan's quarantine makes RSS meaningless."""
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.needs_cpu_ext)]

# --------------------------------------------------------------------------------------------- helpers

X8 = np.zeros((2, 4), np.int8)
XU = np.zeros((2, 4), np.uint8)
W8 = np.zeros((3, 4), np.int8)
W4 = np.zeros((3, 2), np.uint8)  # packed int4/uint4, K = 4
REQ = dict(out_dtype="int8", multiplier=2**30, shift=31)
SREQ = dict(out_dtype="int8", multiplier1=2**30, multiplier2=2**30, shift=31)
XC = np.zeros((1, 4, 5, 5), np.int8)
WC = np.zeros((6, 2, 3, 3), np.int8)
CODES = np.zeros((2, 3), np.uint8)
V = np.zeros((3, 4), np.int8)
F = np.zeros((2, 3), np.float32)


def misaligned(values, dtype=np.int32):
    values = np.asarray(values, dtype)
    out = np.zeros(values.nbytes + 1, np.uint8)[1:].view(dtype).reshape(values.shape)
    out[...] = values
    assert not out.flags.aligned
    return out


def fake(shape, dtype=np.int8):
    """Zero-stride view: a huge shape backed by one element (no allocation)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))


def gemm(be, **kw):
    return ops.int_gemm(**{"x": X8, "w": W8, **kw}, backend=be)


def conv(be, **kw):
    return ops.int_conv2d(**{"x": XC, "w": WC, "groups": 2, **kw}, backend=be)


def sgemm(be, **kw):
    return ops.split_gemm(**{"x1": X8, "w1": W8, "x2": np.zeros((2, 5), np.uint8), "w2": np.zeros((3, 5), np.int8),
                             **SREQ, **kw}, backend=be)


def sconv(be, **kw):
    base = dict(x1=np.zeros((1, 2, 4, 4), np.int8), w1=np.zeros((3, 2, 1, 1), np.int8),
                x2=np.zeros((1, 3, 4, 4), np.uint8), w2=np.zeros((3, 3, 1, 1), np.int8), **SREQ)
    base.update(kw)
    return ops.split_conv2d(**base, backend=be)


def req(be, **kw):
    base = dict(acc=np.zeros((2, 3), np.int32), multiplier=2**30, shift=31)
    base.update(kw)
    return ops.requantize(**base, backend=be)


def log2(be, **kw):
    return ops.log2_attn_matmul(**{"codes": CODES, "v": V, **kw}, backend=be)


def bmm(be, **kw):
    return ops.int_bmm(**{"a": np.zeros((2, 3, 4), np.uint8), "b": np.zeros((2, 5, 4), np.int8), **kw}, backend=be)


# --------------------------------------------------------------------------------------------- op battery
# (op, id, fn(backend), exception, regex naming the argument). Kernel ops run on every backend; host ops
# (float <-> codes, packing, multipliers) run on the host whatever the backend, so once.

KERNEL_CASES = [
    # int_bmm
    ("int_bmm", "a int32", lambda be: bmm(be, a=np.zeros((2, 3, 4), np.int32)), TypeError, "a must have dtype"),
    ("int_bmm", "a 1-D", lambda be: bmm(be, a=np.zeros(4, np.int8)), ValueError, "a must be at least 2-D"),
    ("int_bmm", "b float", lambda be: bmm(be, b=np.zeros((2, 5, 4), np.float32)), TypeError, "b must have dtype"),
    ("int_bmm", "b 2-D", lambda be: bmm(be, b=np.zeros((5, 4), np.int8)), ValueError, "b must be 3-D"),
    ("int_bmm", "leading dims", lambda be: bmm(be, b=np.zeros((3, 5, 4), np.int8)), ValueError, "leading dimensions"),
    ("int_bmm", "K mismatch", lambda be: bmm(be, b=np.zeros((2, 5, 3), np.int8)), ValueError, "K=4"),
    ("int_bmm", "a_zero_point 256", lambda be: bmm(be, a_zero_point=256), ValueError, "a_zero_point"),
    ("int_bmm", "b_zero_point 128 int8", lambda be: bmm(be, b_zero_point=128), ValueError, "b_zero_point"),
    ("int_bmm", "K beyond §4.1", lambda be: bmm(be, a=fake((1, 1, 70000), np.uint8), b=fake((1, 1, 70000), np.uint8)),
     ValueError, "int_bmm.*K=70000"),
    ("int_bmm", "out_dtype int64", lambda be: bmm(be, out_dtype="int64"), ValueError, "out_dtype"),
    ("int_bmm", "requant without shift", lambda be: bmm(be, out_dtype="int8", multiplier=1), ValueError, "shift"),
    # int_gemm
    ("int_gemm", "x float64", lambda be: gemm(be, x=X8.astype(np.float64)), TypeError, "x must have dtype"),
    ("int_gemm", "x int32", lambda be: gemm(be, x=X8.astype(np.int32)), TypeError, "x must have dtype"),
    ("int_gemm", "x bool", lambda be: gemm(be, x=X8.astype(bool)), TypeError, "x must have dtype"),
    ("int_gemm", "x None", lambda be: gemm(be, x=None), TypeError, "x must be a NumPy array"),
    ("int_gemm", "x dict", lambda be: gemm(be, x={}), TypeError, "x must be a NumPy array"),
    ("int_gemm", "x 0-d", lambda be: gemm(be, x=np.int8(1)), ValueError, "x must be 2-D"),
    ("int_gemm", "x 3-D", lambda be: gemm(be, x=np.zeros((1, 2, 4), np.int8)), ValueError, "x must be 2-D"),
    ("int_gemm", "w float", lambda be: gemm(be, w=W8.astype(np.float32)), TypeError, "w must have dtype int8"),
    ("int_gemm", "w 1-D", lambda be: gemm(be, w=np.zeros(4, np.int8)), ValueError, "w must be 2-D"),
    ("int_gemm", "w int8 for int4", lambda be: gemm(be, w=W8, w_format="int4"), TypeError, "w must have dtype uint8"),
    ("int_gemm", "K mismatch", lambda be: gemm(be, w=np.zeros((3, 5), np.int8)), ValueError, "K=4"),
    ("int_gemm", "packed width", lambda be: gemm(be, w=np.zeros((3, 3), np.uint8), w_format="uint4"), ValueError,
     "ceil\\(K/2\\)=2"),
    ("int_gemm", "w_format 'int2'", lambda be: gemm(be, w_format="int2"), ValueError, "w_format"),
    ("int_gemm", "w_format for a handle", lambda be: gemm(be, w=ops.pack_weight(W8, backend="reference"),
                                                          w_format="int4"), ValueError, "disagrees"),
    ("int_gemm", "w_zero_point for a handle", lambda be: gemm(be, w=ops.pack_weight(W8, backend="reference"),
                                                              w_zero_point=1), ValueError, "pass it to pack_weight"),
    ("int_gemm", "x_zero_point 256 uint8", lambda be: gemm(be, x=XU, x_zero_point=256), ValueError, "x_zero_point"),
    ("int_gemm", "x_zero_point -1 uint8", lambda be: gemm(be, x=XU, x_zero_point=-1), ValueError, "x_zero_point"),
    ("int_gemm", "x_zero_point -129 int8", lambda be: gemm(be, x_zero_point=-129), ValueError, "x_zero_point"),
    ("int_gemm", "x_zero_point bool", lambda be: gemm(be, x_zero_point=True), TypeError, "x_zero_point must be an integer"),
    ("int_gemm", "x_zero_point str", lambda be: gemm(be, x_zero_point="0"), TypeError, "x_zero_point"),
    ("int_gemm", "x_zero_point None", lambda be: gemm(be, x_zero_point=None), TypeError, "x_zero_point"),
    ("int_gemm", "x_zero_point array", lambda be: gemm(be, x_zero_point=np.zeros(2, np.int32)), TypeError,
     "x_zero_point"),
    ("int_gemm", "w_zero_point 8 int4", lambda be: gemm(be, w=W4, w_format="int4", w_zero_point=8), ValueError,
     "w_zero_point values must be in \\[-8, 7\\]"),
    ("int_gemm", "w_zero_point -9 int4", lambda be: gemm(be, w=W4, w_format="int4", w_zero_point=-9), ValueError,
     "w_zero_point"),
    ("int_gemm", "w_zero_point 16 uint4", lambda be: gemm(be, w=W4, w_format="uint4", w_zero_point=16), ValueError,
     "w_zero_point values must be in \\[0, 15\\]"),
    ("int_gemm", "w_zero_point -1 uint4", lambda be: gemm(be, w=W4, w_format="uint4", w_zero_point=-1), ValueError,
     "w_zero_point"),
    ("int_gemm", "w_zero_point 128 int8", lambda be: gemm(be, w_zero_point=[0, 128, 0]), ValueError, "w_zero_point"),
    ("int_gemm", "w_zero_point float", lambda be: gemm(be, w_zero_point=0.5), TypeError, "w_zero_point"),
    ("int_gemm", "w_zero_point bool", lambda be: gemm(be, w_zero_point=False), TypeError, "w_zero_point"),
    ("int_gemm", "w_zero_point 2-D", lambda be: gemm(be, w_zero_point=np.zeros((3, 1), np.int32)), ValueError,
     "w_zero_point must be a scalar or have shape \\(3,\\)"),
    ("int_gemm", "w_zero_point int64 beyond int32", lambda be: gemm(be, w_zero_point=np.full(3, 2**40)), ValueError,
     "w_zero_point"),
    ("int_gemm", "bias float", lambda be: gemm(be, bias=np.zeros(3, np.float32)), TypeError, "bias must have dtype int32"),
    ("int_gemm", "bias big-endian", lambda be: gemm(be, bias=np.zeros(3, ">i4")), TypeError, "bias"),
    ("int_gemm", "bias list", lambda be: gemm(be, bias=[0, 0, 0]), TypeError, "bias must be a NumPy array"),
    ("int_gemm", "bias shape", lambda be: gemm(be, bias=np.zeros((3, 1), np.int32)), ValueError, "bias must have shape"),
    ("int_gemm", "bias overflow", lambda be: gemm(be, bias=np.array([0, 2**31 - 1, 0], np.int32)), ValueError,
     "2\\^31-1"),
    ("int_gemm", "K int4 beyond bound", lambda be: gemm(be, x=np.zeros((1, 2**21), np.uint8), x_zero_point=128,
                                                         w=np.zeros((1, 2**20), np.uint8), w_format="int4"),
     ValueError, "K=2097152"),
    ("int_gemm", "K zero-stride 2^40", lambda be: gemm(be, x=fake((3, 2**40)), w=fake((5, 2**40))), ValueError,
     "K=1099511627776"),
    ("split_gemm", "K1 zero-stride 2^31+1", lambda be: sgemm(be, x1=fake((2, 2**31 + 1)), w1=fake((3, 2**31 + 1))),
     ValueError, "K=2147483649"),
    ("int_gemm", "out_dtype int64", lambda be: gemm(be, out_dtype="int64"), ValueError, "out_dtype must be one of"),
    ("int_gemm", "out_dtype 8", lambda be: gemm(be, out_dtype=8), ValueError, "out_dtype"),
    ("int_gemm", "shift missing", lambda be: gemm(be, out_dtype="uint4", multiplier=1), ValueError,
     "multiplier and shift are required"),
    ("int_gemm", "multiplier 2^31", lambda be: gemm(be, **dict(REQ, multiplier=2**31)), ValueError, "multiplier values"),
    ("int_gemm", "multiplier float", lambda be: gemm(be, **dict(REQ, multiplier=0.5)), TypeError, "multiplier"),
    ("int_gemm", "multiplier shape", lambda be: gemm(be, **dict(REQ, multiplier=[1, 2])), ValueError, "multiplier"),
    ("int_gemm", "shift -5", lambda be: gemm(be, **dict(REQ, shift=-5)), ValueError, "shift values must be in \\[1, 94\\]"),
    ("int_gemm", "shift 2^40", lambda be: gemm(be, **dict(REQ, shift=2**40)), ValueError, "shift"),
    ("int_gemm", "shift float", lambda be: gemm(be, **dict(REQ, shift=31.0)), TypeError, "shift"),
    ("int_gemm", "out_zero_point -129", lambda be: gemm(be, **dict(REQ, out_zero_point=-129)), ValueError,
     "out_zero_point must be in \\[-128, 127\\]"),
    ("int_gemm", "out_zero_point -9 int4", lambda be: gemm(be, **dict(REQ, out_dtype="int4", out_zero_point=-9)),
     ValueError, "out_zero_point"),
    ("int_gemm", "out_zero_point 16 uint4", lambda be: gemm(be, **dict(REQ, out_dtype="uint4", out_zero_point=16)),
     ValueError, "out_zero_point"),
    ("int_gemm", "out_scale missing", lambda be: gemm(be, out_dtype="float32"), ValueError, "out_scale is required"),
    ("int_gemm", "out_scale -inf", lambda be: gemm(be, out_dtype="float32", out_scale=-np.inf), ValueError, "out_scale"),
    ("int_gemm", "out_scale NaN channel", lambda be: gemm(be, out_dtype="float32", out_scale=[1, np.nan, 1]),
     ValueError, "out_scale must be finite and > 0"),
    ("int_gemm", "out_scale underflows float32", lambda be: gemm(be, out_dtype="float32", out_scale=1e-50), ValueError,
     "out_scale"),
    ("int_gemm", "out_scale overflows float32", lambda be: gemm(be, out_dtype="float32", out_scale=1e50), ValueError,
     "out_scale"),
    ("int_gemm", "out_scale str", lambda be: gemm(be, out_dtype="float32", out_scale="1"), TypeError, "out_scale"),
    ("int_gemm", "out_scale complex", lambda be: gemm(be, out_dtype="float32", out_scale=1j), TypeError, "out_scale"),
    ("int_gemm", "backend None", lambda be: gemm(None), ValueError, "backend must be one of"),
    # int_conv2d
    ("int_conv2d", "x float", lambda be: conv(be, x=XC.astype(np.float32)), TypeError, "x must have dtype"),
    ("int_conv2d", "x 5-D", lambda be: conv(be, x=XC[None]), ValueError, "x must be 4-D"),
    ("int_conv2d", "w float", lambda be: conv(be, w=WC.astype(np.float16)), TypeError, "w must have dtype"),
    ("int_conv2d", "w 3-D int8", lambda be: conv(be, w=WC[0]), ValueError, "w must be 4-D"),
    ("int_conv2d", "stride (1, 2, 3)", lambda be: conv(be, stride=(1, 2, 3)), ValueError, "stride must be an int or a pair"),
    ("int_conv2d", "stride -1", lambda be: conv(be, stride=-1), ValueError, "stride must be >= 1"),
    ("int_conv2d", "stride float", lambda be: conv(be, stride=1.5), TypeError, "stride"),
    ("int_conv2d", "stride str", lambda be: conv(be, stride="1"), TypeError, "stride"),
    ("int_conv2d", "padding -1", lambda be: conv(be, padding=(0, -1)), ValueError, "padding must be >= 0"),
    ("int_conv2d", "dilation 0", lambda be: conv(be, dilation=0), ValueError, "dilation must be >= 1"),
    ("int_conv2d", "groups 0", lambda be: conv(be, groups=0), ValueError, "groups must be >= 1"),
    ("int_conv2d", "groups -2", lambda be: conv(be, groups=-2), ValueError, "groups must be >= 1"),
    ("int_conv2d", "groups bool", lambda be: conv(be, groups=True), TypeError, "groups must be an integer"),
    ("int_conv2d", "groups 3 (C=4)", lambda be: conv(be, groups=3), ValueError, "groups=3 must divide the input channels"),
    ("int_conv2d", "groups vs O", lambda be: conv(be, w=np.zeros((5, 2, 3, 3), np.int8)), ValueError,
     "must divide the output channels"),
    ("int_conv2d", "kernel_size disagrees", lambda be: conv(be, kernel_size=2), ValueError, "kernel_size"),
    ("int_conv2d", "kernel_size 0 packed", lambda be: conv(be, w=np.zeros((6, 9), np.uint8), w_format="int4",
                                                          kernel_size=0), ValueError, "kernel_size must be >= 1"),
    ("int_conv2d", "packed width", lambda be: conv(be, w=np.zeros((6, 8), np.uint8), w_format="int4", kernel_size=3),
     ValueError, "ceil\\(18/2\\)=9"),
    ("int_conv2d", "output not positive", lambda be: conv(be, x=np.zeros((1, 4, 2, 2), np.int8)), ValueError,
     "output size"),
    ("int_conv2d", "x_zero_point 128", lambda be: conv(be, x_zero_point=128), ValueError, "x_zero_point"),
    ("int_conv2d", "w_zero_point shape", lambda be: conv(be, w_zero_point=[0] * 5), ValueError, "w_zero_point"),
    ("int_conv2d", "bias shape", lambda be: conv(be, bias=np.zeros(5, np.int32)), ValueError, "bias"),
    ("int_conv2d", "K beyond bound", lambda be: conv(be, x=np.zeros((1, 2, 300, 300), np.int8),
                                                      w=np.zeros((1, 2, 300, 300), np.int8), groups=1), ValueError,
     "C/groups\\*KH\\*KW=180000"),
    ("int_conv2d", "out_dtype int64", lambda be: conv(be, out_dtype="int64"), ValueError, "out_dtype"),
    ("int_conv2d", "out_scale 0", lambda be: conv(be, out_dtype="float32", out_scale=0), ValueError, "out_scale"),
    # split_gemm
    ("split_gemm", "x2 float", lambda be: sgemm(be, x2=np.zeros((2, 5), np.float32)), TypeError, "x2 must have dtype"),
    ("split_gemm", "x1 1-D", lambda be: sgemm(be, x1=np.zeros(4, np.int8)), ValueError, "x1 must be 2-D"),
    ("split_gemm", "M mismatch", lambda be: sgemm(be, x2=np.zeros((3, 5), np.uint8)), ValueError, "x1 and x2"),
    ("split_gemm", "N mismatch", lambda be: sgemm(be, w2=np.zeros((4, 5), np.int8)), ValueError, "w2 must have 3 rows"),
    ("split_gemm", "w1_format bad", lambda be: sgemm(be, w1_format="int16"), ValueError, "w_format"),
    ("split_gemm", "x1_zero_point 128", lambda be: sgemm(be, x1_zero_point=128), ValueError, "x1_zero_point"),
    ("split_gemm", "w2_zero_point 200", lambda be: sgemm(be, w2_zero_point=200), ValueError, "w2_zero_point"),
    ("split_gemm", "K1 + K2 beyond bound", lambda be: sgemm(be, x1=np.zeros((1, 70000), np.int8),
                                                             w1=np.zeros((3, 70000), np.int8),
                                                             x2=np.zeros((1, 70000), np.int8),
                                                             w2=np.zeros((3, 70000), np.int8)), ValueError,
     "K1=70000 \\+ K2=70000"),
    ("split_gemm", "out_dtype int32", lambda be: sgemm(be, out_dtype="int32"), ValueError, "out_dtype"),
    ("split_gemm", "multiplier1 missing", lambda be: sgemm(be, multiplier1=None), ValueError, "multiplier1"),
    ("split_gemm", "multiplier2 -1", lambda be: sgemm(be, multiplier2=-1), ValueError, "multiplier2 values"),
    ("split_gemm", "shift 0", lambda be: sgemm(be, shift=0), ValueError, "shift"),
    ("split_gemm", "out_scale2 missing", lambda be: sgemm(be, out_dtype="float32", out_scale1=1.0), ValueError,
     "out_scale2"),
    ("split_gemm", "out_scale1 NaN", lambda be: sgemm(be, out_dtype="float32", out_scale1=np.nan, out_scale2=1.0),
     ValueError, "out_scale1"),
    # split_conv2d
    ("split_conv2d", "spatial mismatch", lambda be: sconv(be, x2=np.zeros((1, 3, 5, 4), np.uint8)), ValueError,
     "spatial"),
    ("split_conv2d", "O mismatch", lambda be: sconv(be, w2=np.zeros((2, 3, 1, 1), np.int8)), ValueError,
     "same output channels"),
    ("split_conv2d", "kernel mismatch", lambda be: sconv(be, w2=np.zeros((3, 3, 3, 3), np.int8)), ValueError,
     "same kernel size"),
    ("split_conv2d", "x2 int16", lambda be: sconv(be, x2=np.zeros((1, 3, 4, 4), np.int16)), TypeError, "x2 must have dtype"),
    ("split_conv2d", "stride 0", lambda be: sconv(be, stride=0), ValueError, "stride"),
    ("split_conv2d", "padding -1", lambda be: sconv(be, padding=-1), ValueError, "padding"),
    ("split_conv2d", "x1_zero_point -129", lambda be: sconv(be, x1_zero_point=-129), ValueError, "x1_zero_point"),
    ("split_conv2d", "w1_zero_point 128", lambda be: sconv(be, w1_zero_point=128), ValueError, "w1_zero_point"),
    ("split_conv2d", "out_dtype int32", lambda be: sconv(be, out_dtype="int32"), ValueError, "out_dtype"),
    ("split_conv2d", "shift 95", lambda be: sconv(be, shift=95), ValueError, "shift"),
    # requantize
    ("requantize", "acc int64", lambda be: req(be, acc=np.zeros((2, 3), np.int64)), TypeError, "acc must have dtype int32"),
    ("requantize", "acc float", lambda be: req(be, acc=F), TypeError, "acc"),
    ("requantize", "acc list", lambda be: req(be, acc=[[1, 2, 3]]), TypeError, "acc must be a NumPy array"),
    ("requantize", "axis 2", lambda be: req(be, axis=2), ValueError, "axis must be in \\[-2, 1\\]"),
    ("requantize", "axis -3", lambda be: req(be, axis=-3), ValueError, "axis"),
    ("requantize", "axis float", lambda be: req(be, axis=1.0), TypeError, "axis"),
    ("requantize", "multiplier shape", lambda be: req(be, multiplier=[1, 1]), ValueError, "multiplier"),
    ("requantize", "multiplier negative", lambda be: req(be, multiplier=-1), ValueError, "multiplier"),
    ("requantize", "shift 0", lambda be: req(be, shift=0), ValueError, "shift"),
    ("requantize", "shift 95", lambda be: req(be, shift=95), ValueError, "shift"),
    ("requantize", "zero_point 128", lambda be: req(be, zero_point=128), ValueError, "out_zero_point"),
    ("requantize", "zero_point 16 uint4", lambda be: req(be, zero_point=16, out_dtype="uint4"), ValueError,
     "out_zero_point"),
    ("requantize", "out_dtype int32", lambda be: req(be, out_dtype="int32"), ValueError, "out_dtype"),
    ("requantize", "out_dtype float32", lambda be: req(be, out_dtype="float32"), ValueError, "out_dtype"),
    # log2_attn_matmul
    ("log2_attn_matmul", "codes int8", lambda be: log2(be, codes=CODES.astype(np.int8)), TypeError, "codes"),
    ("log2_attn_matmul", "codes float", lambda be: log2(be, codes=F), TypeError, "codes must have dtype uint8"),
    ("log2_attn_matmul", "codes 3-D, v 2-D", lambda be: log2(be, codes=CODES[None]), ValueError, "v must be 3-D"),
    ("log2_attn_matmul", "v float", lambda be: log2(be, v=V.astype(np.float32)), TypeError, "v must have dtype"),
    ("log2_attn_matmul", "v 1-D", lambda be: log2(be, v=np.zeros(3, np.int8)), ValueError, "v must be 2-D"),
    ("log2_attn_matmul", "L mismatch", lambda be: log2(be, v=np.zeros((4, 4), np.int8)), ValueError, "L=3"),
    ("log2_attn_matmul", "bits 1", lambda be: log2(be, bits=1), ValueError, "bits must be in \\[2, 8\\]"),
    ("log2_attn_matmul", "bits 9", lambda be: log2(be, bits=9), ValueError, "bits"),
    ("log2_attn_matmul", "bits float", lambda be: log2(be, bits=4.0), TypeError, "bits"),
    ("log2_attn_matmul", "mode log3", lambda be: log2(be, mode="log3"), ValueError, "mode must be one of"),
    ("log2_attn_matmul", "mode None", lambda be: log2(be, mode=None), ValueError, "mode"),
    ("log2_attn_matmul", "codes 4 for bits 2", lambda be: log2(be, codes=np.full((2, 3), 4, np.uint8), bits=2),
     ValueError, "codes must be in \\[0, 3\\]"),
    ("log2_attn_matmul", "codes 255 for bits 7", lambda be: log2(be, codes=np.full((2, 3), 255, np.uint8), bits=7),
     ValueError, "codes must be in \\[0, 127\\]"),
    ("log2_attn_matmul", "frac_bits -1", lambda be: log2(be, frac_bits=-1), ValueError, "frac_bits"),
    ("log2_attn_matmul", "frac_bits 25", lambda be: log2(be, frac_bits=25), ValueError, "frac_bits must be in \\[0, 24\\]"),
    ("log2_attn_matmul", "v_zero_point 256 uint8", lambda be: log2(be, v=V.astype(np.uint8), v_zero_point=256),
     ValueError, "v_zero_point"),
    ("log2_attn_matmul", "v_zero_point 128 int8", lambda be: log2(be, v_zero_point=128), ValueError, "v_zero_point"),
    ("log2_attn_matmul", "out_dtype int32", lambda be: log2(be, out_dtype="int32"), ValueError, "out_dtype"),
    ("log2_attn_matmul", "out_scale NaN", lambda be: log2(be, out_dtype="float32", out_scale=np.nan), ValueError,
     "out_scale"),
    ("log2_attn_matmul", "shift 0", lambda be: log2(be, out_dtype="int8", multiplier=1, shift=0), ValueError, "shift"),
    ("log2_attn_matmul", "L beyond int64 bound", lambda be: log2(be, codes=np.zeros((0, 2**40), np.uint8),
                                                                 v=np.zeros((2**40, 0), np.int8)), ValueError,
     "L=1099511627776 is too long"),
    # float stages (spec §15)
    ("softmax", "x float64", lambda be: ops.softmax(np.zeros((2, 3)), backend=be), TypeError, "x must have dtype float32"),
    ("softmax", "x 0-d", lambda be: ops.softmax(np.float32(0), backend=be), ValueError, "at least 1 dimension"),
    ("layer_norm", "weight [C+1]", lambda be: ops.layer_norm(np.zeros((2, 3), np.float32), np.ones(4, np.float32),
                                                            backend=be), ValueError, "weight must have shape"),
    ("layer_norm", "eps NaN", lambda be: ops.layer_norm(np.zeros((2, 3), np.float32), eps=np.nan, backend=be),
     ValueError, "eps"),
    ("group_norm", "groups 4 of 6", lambda be: ops.group_norm(np.zeros((1, 6, 2), np.float32), 4, backend=be),
     ValueError, "groups must be >= 1 and divide"),
    ("group_norm", "bias int", lambda be: ops.group_norm(np.zeros((1, 6), np.float32), 2, None, np.zeros(6, np.int32),
                                                        backend=be), TypeError, "bias must have dtype float32"),
    ("gelu", "approximate erf", lambda be: ops.gelu(np.zeros(2, np.float32), "erf", backend=be), ValueError,
     "approximate must be one of"),
    ("silu", "x int8", lambda be: ops.silu(np.zeros(2, np.int8), backend=be), TypeError, "x must have dtype float32"),
    ("silu", "codes zero point", lambda be: ops.silu(np.zeros(2, np.float32), codes={"scale": 1.0, "zero_point": 300},
                                                      backend=be), ValueError, "codes zero_point"),
    ("add", "b float64", lambda be: ops.add(np.zeros(2, np.float32), np.zeros(2), backend=be), TypeError,
     "b must have dtype float32"),
    ("add", "shapes", lambda be: ops.add(np.zeros(2, np.float32), np.zeros(3, np.float32), backend=be), ValueError,
     "a and b must broadcast"),
    ("concat", "empty list", lambda be: ops.concat([], 0, backend=be), TypeError, "xs must be a non-empty list"),
    ("concat", "not a list", lambda be: ops.concat(np.zeros(3), 0, backend=be), TypeError, "xs must be a non-empty"),
    ("concat", "dtypes", lambda be: ops.concat([np.zeros(2, np.uint8), np.zeros(2, np.int8)], 0, backend=be),
     TypeError, r"xs\[1\] must have the dtype of xs\[0\]"),
    ("concat", "shapes", lambda be: ops.concat([np.zeros((2, 2)), np.zeros((3, 3))], 1, backend=be), ValueError,
     r"xs\[1\] has shape"),
    ("concat", "axis", lambda be: ops.concat([np.zeros((2, 2))], -3, backend=be), ValueError, "axis must be in"),
    ("concat", "0-d", lambda be: ops.concat([np.float32(1)], 0, backend=be), ValueError, "axis must be in"),
    ("concat", "object dtype", lambda be: ops.concat([np.array([None])], 0, backend=be), TypeError, "numeric dtype"),
    ("resample_nearest", "1-D x", lambda be: ops.resample_nearest(np.zeros(4), [0], [0], backend=be), ValueError,
     "at least 2 dimensions"),
    ("resample_nearest", "row index", lambda be: ops.resample_nearest(np.zeros((2, 2)), [2], [0], backend=be),
     ValueError, r"rows values must be in \[0, 1\]"),
    ("resample_nearest", "negative column", lambda be: ops.resample_nearest(np.zeros((2, 2)), [0], [-1], backend=be),
     ValueError, r"cols values must be in \[0, 1\]"),
    ("resample_nearest", "float index", lambda be: ops.resample_nearest(np.zeros((2, 2)), [0.0], [0], backend=be),
     TypeError, "rows must be a 1-D integer array"),
    ("resample_nearest", "2-D index", lambda be: ops.resample_nearest(np.zeros((2, 2)), [[0]], [0], backend=be),
     TypeError, "rows must be a 1-D integer array"),
]

_C8 = np.zeros((2, 3), np.uint8)  # log codes [M=2, L=3]
_V8 = np.zeros((3, 4), np.uint8)  # values [L=3, N=4]
_SHARED = np.zeros((3, 4), np.int64)  # its bytes seen as values and as the output
KERNEL_CASES += [
    ("log2_attn_matmul", "out dtype", lambda be: ops.log2_attn_matmul(_C8, _V8, out=np.zeros((2, 4), np.float32),
                                                                       backend=be), TypeError, "out must have dtype int64"),
    ("log2_attn_matmul", "out shape", lambda be: ops.log2_attn_matmul(_C8, _V8, out=np.zeros((2, 5), np.int64),
                                                                       backend=be), ValueError, "out must have shape"),
    ("log2_attn_matmul", "out columns strided", lambda be: ops.log2_attn_matmul(
        _C8, _V8, out=np.zeros((2, 8), np.int64)[:, ::2], backend=be), ValueError, "C-contiguous rows"),
    ("log2_attn_matmul", "out overlaps v", lambda be: ops.log2_attn_matmul(_C8, _SHARED.view(np.uint8)[:, :4],
                                                                            out=_SHARED[:2], backend=be),
     ValueError, "out must not share memory"),
    ("log2_attn_matmul", "out list", lambda be: ops.log2_attn_matmul(_C8, _V8, out=[[0] * 4] * 2, backend=be),
     TypeError, "out must be a NumPy array"),
]

HOST_CASES = [
    # output_stage
    ("output_stage", "n -1", lambda: ops.output_stage(-1), ValueError, "n must be >= 0"),
    ("output_stage", "out_dtype", lambda: ops.output_stage(3, "int16"), ValueError, "out_dtype must be one of"),
    ("output_stage", "no scale", lambda: ops.output_stage(3, "float32"), ValueError, "out_scale is required"),
    ("output_stage", "shift 0", lambda: ops.output_stage(3, "uint8", multiplier=1, shift=0), ValueError, "shift"),
    ("output_stage", "extra keywords", lambda: ops.int_gemm(
        np.zeros((2, 4), np.uint8), np.zeros((3, 4), np.int8), out_dtype=ops.output_stage(3), out_scale=1.0), ValueError,
     "leave those arguments unset"),
    ("output_stage", "channels", lambda: ops.int_gemm(np.zeros((2, 4), np.uint8), np.zeros((3, 4), np.int8),
                                                      out_dtype=ops.output_stage(5)), ValueError, "has 5 channels"),
    ("output_stage", "int64 for a GEMM", lambda: ops.int_gemm(
        np.zeros((2, 4), np.uint8), np.zeros((3, 4), np.int8), out_dtype=ops.output_stage(3, "int64")), ValueError,
     "out_dtype must be one of"),
    # pack_weight
    ("pack_weight", "w float", lambda: ops.pack_weight(np.zeros((3, 4), np.float32)), TypeError, "w must have dtype"),
    ("pack_weight", "kind", lambda: ops.pack_weight(W8, kind="linear"), ValueError, "kind must be one of"),
    ("pack_weight", "w_zero_point range", lambda: ops.pack_weight(W8, w_zero_point=200), ValueError, "w_zero_point"),
    ("pack_weight", "int4 without k", lambda: ops.pack_weight(np.zeros((3, 2), np.uint8), w_format="int4"),
     ValueError, "k \\(the unpacked K\\) is required"),
    ("pack_weight", "conv 2-D int8", lambda: ops.pack_weight(W8, kind="conv"), ValueError, "w must be 4-D"),
    ("pack_weight", "conv groups", lambda: ops.pack_weight(WC, kind="conv", groups=4), ValueError, "groups=4"),
    ("pack_weight", "gemm handle for conv", lambda: conv("reference", w=ops.pack_weight(W8, backend="reference")),
     ValueError, "packed gemm weight"),
    ("pack_weight", "backend", lambda: ops.pack_weight(W8, backend="tpu"), ValueError, "backend"),
    # quantize
    ("quantize", "x int", lambda: ops.quantize(np.zeros(2, np.int32), 1.0), TypeError, "x must be a float array"),
    ("quantize", "x list", lambda: ops.quantize([0.5], 1.0), TypeError, "x must be a NumPy array"),
    ("quantize", "x NaN", lambda: ops.quantize(np.array([0, np.nan], np.float32), 1.0), ValueError, "x must be finite"),
    ("quantize", "x inf", lambda: ops.quantize(np.array([np.inf]), 1.0), ValueError, "x must be finite"),
    ("quantize", "x float64 beyond float32", lambda: ops.quantize(np.array([1e300]), 1.0), ValueError, "x must be finite"),
    ("quantize", "scale 0", lambda: ops.quantize(F, 0.0), ValueError, "scale must be finite and > 0"),
    ("quantize", "scale -1", lambda: ops.quantize(F, -1.0), ValueError, "scale"),
    ("quantize", "scale inf", lambda: ops.quantize(F, np.inf), ValueError, "scale"),
    ("quantize", "scale NaN", lambda: ops.quantize(F, np.nan), ValueError, "scale"),
    ("quantize", "scale str", lambda: ops.quantize(F, "a"), TypeError, "scale must be a float"),
    ("quantize", "scale array without axis", lambda: ops.quantize(F, np.ones(3)), (TypeError, ValueError), "scale must be a"),
    ("quantize", "zero_point 128 int8", lambda: ops.quantize(F, 1.0, 128), ValueError, "zero_point must be in"),
    ("quantize", "zero_point 8 int4", lambda: ops.quantize(F, 1.0, 8, "int4"), ValueError, "zero_point must be in \\[-8, 7\\]"),
    ("quantize", "zero_point 1.5", lambda: ops.quantize(F, 1.0, 1.5), TypeError, "zero_point"),
    ("quantize", "dtype int16", lambda: ops.quantize(F, 1.0, 0, "int16"), ValueError, "dtype must be one of"),
    ("quantize", "bits 1", lambda: ops.quantize(F, 1.0, 0, "int8", bits=1), ValueError, "bits must be in"),
    ("quantize", "bits 5 for int4", lambda: ops.quantize(F, 1.0, 0, "int4", bits=5), ValueError, "bits must be in \\[2, 4\\]"),
    ("quantize", "narrow unsigned", lambda: ops.quantize(F, 1.0, 0, "uint8", narrow=True), ValueError, "narrow"),
    ("quantize", "axis 2", lambda: ops.quantize(F, np.ones(3), 0, axis=2), ValueError, "axis must be in"),
    ("quantize", "per-channel scale 0", lambda: ops.quantize(F, np.array([1, 0, 1.0]), 0, axis=1), ValueError, "scale"),
    ("quantize", "per-channel zero point length", lambda: ops.quantize(F, np.ones(3), [0, 0], axis=1), ValueError,
     "zero_point must be a scalar or have shape \\(3,\\)"),
    ("quantize", "backend bogus", lambda: ops.quantize(F, 1.0, backend="npu"), ValueError, "backend"),
    # dequantize
    ("dequantize", "q float", lambda: ops.dequantize(F, 1.0), TypeError, "q must have dtype"),
    ("dequantize", "q int64", lambda: ops.dequantize(np.zeros(2, np.int64), 1.0), TypeError, "q must have dtype"),
    ("dequantize", "q None", lambda: ops.dequantize(None, 1.0), TypeError, "q must be a NumPy array"),
    ("dequantize", "scale 0", lambda: ops.dequantize(X8, 0.0), ValueError, "scale"),
    ("dequantize", "scale NaN", lambda: ops.dequantize(X8, np.nan), ValueError, "scale"),
    ("dequantize", "zero_point 2^31", lambda: ops.dequantize(X8, 1.0, 2**31), ValueError, "zero_point"),
    ("dequantize", "axis 5", lambda: ops.dequantize(X8, np.ones(4), 0, axis=5), ValueError, "axis"),
    ("dequantize", "per-channel scale length", lambda: ops.dequantize(X8, np.ones(3), axis=1), ValueError, "scale"),
    # quantize_log
    ("quantize_log", "p negative", lambda: ops.quantize_log(np.array([-1e-9], np.float32), 1.0), ValueError,
     "p must be >= 0"),
    ("quantize_log", "p NaN", lambda: ops.quantize_log(np.array([np.nan], np.float32), 1.0), ValueError, "p must be finite"),
    ("quantize_log", "p int", lambda: ops.quantize_log(np.zeros(2, np.uint8), 1.0), TypeError, "p must be a float"),
    ("quantize_log", "delta 0", lambda: ops.quantize_log(F, 0.0), ValueError, "delta must be finite and > 0"),
    ("quantize_log", "delta inf", lambda: ops.quantize_log(F, np.inf), ValueError, "delta"),
    ("quantize_log", "delta NaN", lambda: ops.quantize_log(F, np.nan), ValueError, "delta"),
    ("quantize_log", "bits 9", lambda: ops.quantize_log(F, 1.0, 9), ValueError, "bits"),
    ("quantize_log", "bits bool", lambda: ops.quantize_log(F, 1.0, True), TypeError, "bits"),
    ("quantize_log", "mode bad", lambda: ops.quantize_log(F, 1.0, 4, "ln"), ValueError, "mode"),
    # dequantize_log
    ("dequantize_log", "codes int8", lambda: ops.dequantize_log(X8, 1.0), TypeError, "codes must have dtype uint8"),
    ("dequantize_log", "codes out of range", lambda: ops.dequantize_log(np.array([16], np.uint8), 1.0, 4), ValueError,
     "codes must be in \\[0, 15\\]"),
    ("dequantize_log", "delta -1", lambda: ops.dequantize_log(CODES, -1.0), ValueError, "delta"),
    ("dequantize_log", "bits 1", lambda: ops.dequantize_log(CODES, 1.0, 1), ValueError, "bits"),
    ("dequantize_log", "mode bad", lambda: ops.dequantize_log(CODES, 1.0, 4, 3), ValueError, "mode"),
    # pack_int4 / unpack_int4
    ("pack_int4", "int4 code 8", lambda: ops.pack_int4(np.array([0, 8], np.int8)), ValueError,
     "codes must be in \\[-8, 7\\] for int4"),
    ("pack_int4", "int4 code -9", lambda: ops.pack_int4(np.array([-9], np.int8)), ValueError, "codes must be in"),
    ("pack_int4", "uint4 code 16", lambda: ops.pack_int4(np.array([16], np.uint8), signed=False), ValueError,
     "codes must be in \\[0, 15\\] for uint4"),
    ("pack_int4", "int4 codes uint8", lambda: ops.pack_int4(np.array([1], np.uint8)), TypeError, "codes must have dtype int8"),
    ("pack_int4", "int4 codes int16", lambda: ops.pack_int4(np.array([1], np.int16)), TypeError, "codes"),
    ("pack_int4", "codes 0-d", lambda: ops.pack_int4(np.int8(1)), ValueError, "codes must have at least one axis"),
    ("pack_int4", "codes list", lambda: ops.pack_int4([1, 2]), TypeError, "codes must be a NumPy array"),
    ("unpack_int4", "length -1", lambda: ops.unpack_int4(np.zeros(1, np.uint8), -1), ValueError, "length"),
    ("unpack_int4", "length mismatch", lambda: ops.unpack_int4(np.zeros(3, np.uint8), 4), ValueError,
     "ceil\\(length/2\\)=2"),
    ("unpack_int4", "length float", lambda: ops.unpack_int4(np.zeros(2, np.uint8), 4.0), TypeError, "length"),
    ("unpack_int4", "packed int8", lambda: ops.unpack_int4(np.zeros(2, np.int8), 4), TypeError, "packed must have dtype uint8"),
    ("unpack_int4", "packed 0-d", lambda: ops.unpack_int4(np.uint8(1), 1), ValueError, "packed must have at least one axis"),
    ("unpack_int4", "padding nibble", lambda: ops.unpack_int4(np.array([[0x10]], np.uint8), 1, signed=False), ValueError,
     "padding nibble"),
    # multipliers
    ("quantize_multiplier", "0", lambda: ops.quantize_multiplier(0.0), ValueError, "real_scale must be finite and > 0"),
    ("quantize_multiplier", "-1", lambda: ops.quantize_multiplier(-1.0), ValueError, "real_scale"),
    ("quantize_multiplier", "NaN", lambda: ops.quantize_multiplier(np.nan), ValueError, "real_scale"),
    ("quantize_multiplier", "inf", lambda: ops.quantize_multiplier(-np.inf), ValueError, "real_scale"),
    ("quantize_multiplier", "2^40", lambda: ops.quantize_multiplier(2.0**40), ValueError, "real_scale"),
    ("quantize_multiplier", "2^-80", lambda: ops.quantize_multiplier(2.0**-80), ValueError, "real_scale"),
    ("quantize_multiplier", "str", lambda: ops.quantize_multiplier("0.5"), TypeError, "real_scale"),
    ("quantize_multiplier", "bool", lambda: ops.quantize_multiplier(True), TypeError, "real_scale"),
    ("quantize_multiplier", "one NaN in array", lambda: ops.quantize_multiplier(np.array([0.5, np.nan])), ValueError,
     "real_scale"),
    ("quantize_multiplier_pair", "NaN second", lambda: ops.quantize_multiplier_pair(0.5, np.nan), ValueError,
     "real_scale2"),
    ("quantize_multiplier_pair", "0 first", lambda: ops.quantize_multiplier_pair(0.0, 0.5), ValueError, "real_scale1"),
    ("quantize_multiplier_pair", "shapes", lambda: ops.quantize_multiplier_pair(np.ones(2), np.ones(3)), ValueError,
     "real_scale1 and real_scale2 must broadcast"),
    ("quantize_multiplier_pair", "too large", lambda: ops.quantize_multiplier_pair(2.0**40, 1.0), ValueError, "shift"),
    ("quantize_multiplier_pair", "str", lambda: ops.quantize_multiplier_pair("a", 1.0), TypeError, "real_scale1"),
    ("requant_scale", "profile", lambda: ops.requant_scale(0.5, 0.5, 0.5, numerics="tvm"), ValueError, "numerics"),
    ("requant_scale", "0 x_scale", lambda: ops.requant_scale(0.0, 0.5, 0.5), ValueError, "x_scale"),
    ("requant_scale", "NaN w_scale", lambda: ops.requant_scale(0.5, np.array([0.5, np.nan]), 0.5), ValueError, "w_scale"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,name,fn,exc,match", KERNEL_CASES, ids=[f"{c[0]}: {c[1]}" for c in KERNEL_CASES])
def test_kernel_op_rejects(op, name, fn, exc, match, backend):
    """Protection: the argument contract of pyqsim._checks (spec §11), enforced before dispatch to any backend."""
    with pytest.raises(exc, match=match):
        fn(backend)


@pytest.mark.parametrize("op,name,fn,exc,match", HOST_CASES, ids=[f"{c[0]}: {c[1]}" for c in HOST_CASES])
def test_host_op_rejects(op, name, fn, exc, match):
    """Protection: the argument checks of the host ops (quantizers, int4 packing, multipliers), spec §2-§3, §6.1."""
    with pytest.raises(exc, match=match):
        fn()


def test_every_public_op_has_cases():
    covered = {c[0] for c in KERNEL_CASES + HOST_CASES}
    assert covered == set(ops.__all__), set(ops.__all__) ^ covered


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_dimensions_are_valid(backend):
    """Zero sizes are not errors: each kernel op returns an empty (or bias-only) result equal to the reference."""
    cases = [
        ("int_gemm", dict(x=np.zeros((0, 4), np.int8), w=W8)),
        ("int_gemm", dict(x=X8, w=np.zeros((0, 4), np.int8))),
        ("int_gemm", dict(x=np.zeros((2, 0), np.int8), w=np.zeros((3, 0), np.int8), bias=np.arange(3, dtype=np.int32))),
        ("int_conv2d", dict(x=np.zeros((0, 4, 5, 5), np.int8), w=WC, groups=2)),
        ("int_conv2d", dict(x=XC, w=np.zeros((0, 2, 3, 3), np.int8), groups=2)),
        ("split_gemm", dict(x1=np.zeros((0, 4), np.int8), w1=W8, x2=np.zeros((0, 5), np.int8),
                            w2=np.zeros((3, 5), np.int8), **SREQ)),
        ("requantize", dict(acc=np.zeros((0, 3), np.int32), multiplier=2**30, shift=31)),
        ("log2_attn_matmul", dict(codes=np.zeros((2, 0), np.uint8), v=np.zeros((0, 4), np.int8))),
    ]
    for op, kw in cases:
        got = getattr(ops, op)(**kw, backend=backend)
        ref = getattr(ops, op)(**kw, backend="reference")
        assert got.shape == ref.shape and got.dtype == ref.dtype and np.array_equal(got, ref), op


def test_int4_k_bound_is_exact():
    """Protection: the early K check (K_ALWAYS_OVERFLOWS) rejects no K that the exact §4.1 bound accepts."""
    k = C.K_ALWAYS_OVERFLOWS - 1  # K * 128 * 8 <= 2^31 - 1 with uint8 activations at zero point 128, int4 at 0
    x = np.full((1, k), 255, np.uint8)
    w = ops.pack_int4(np.full((1, k), -8, np.int8))
    y = ops.int_gemm(x, w, x_zero_point=128, w_format="int4", backend="reference")
    assert int(y[0, 0]) == k * 127 * -8
    if _has_cpu():
        assert np.array_equal(ops.int_gemm(x, w, x_zero_point=128, w_format="int4", backend="cpu"), y)
    with pytest.raises(ValueError, match=f"K={k + 1}"):
        ops.int_gemm(np.zeros((1, k + 1), np.uint8), ops.pack_int4(np.zeros((1, k + 1), np.int8)), x_zero_point=128,
                     w_format="int4", backend="reference")


# --------------------------------------------------------------------------------------------- views


@pytest.mark.needs_cpu_ext
def test_views_are_made_canonical_for_every_backend():
    """Protection: _checks.canonical -- non-contiguous, Fortran-order, misaligned (a uint8 buffer offset by one
    byte viewed as int32/float32), read-only and zero-stride views are accepted by the op layer and give the
    reference's result on the cpu backend (whose binding rejects misaligned or strided buffers)."""
    rng = np.random.default_rng(11)
    x = rng.integers(0, 256, (6, 10), dtype=np.uint8)
    w = rng.integers(-128, 128, (5, 10), dtype=np.int8)
    bias = rng.integers(-1000, 1000, 5, dtype=np.int32)
    m, s = ops.quantize_multiplier(rng.uniform(2.0**-10, 2.0**-5, 5))
    ro = w.copy()
    ro.setflags(write=False)
    variants = [
        dict(x=np.repeat(x, 2, axis=1)[:, ::2], w=w),
        dict(x=np.asfortranarray(x), w=np.asfortranarray(w)),
        dict(x=x, w=ro),
        dict(x=np.lib.stride_tricks.as_strided(x[:1], (6, 10), (0, 1)), w=w),
        dict(x=x, w=w, bias=misaligned(bias)),
        dict(x=x, w=w, w_zero_point=misaligned([1, -2, 3, 0, 5])),
        dict(x=x, w=w, out_dtype="int8", multiplier=misaligned(m), shift=misaligned(s), out_zero_point=-3),
        dict(x=x, w=w, out_dtype="float32", out_scale=misaligned(rng.uniform(0.01, 1, 5), np.float32)),
        dict(x=x, w=w, w_zero_point=np.zeros(5, ">i4")),
    ]
    for kw in variants:
        kw.setdefault("x_zero_point", 7)
        ref = ops.int_gemm(**kw, backend="reference")
        assert np.array_equal(ops.int_gemm(**kw, backend="cpu"), ref)
    acc = misaligned(rng.integers(-2**20, 2**20, (4, 5, 3)))
    for kw in (dict(acc=acc, multiplier=misaligned(m), shift=misaligned(s), axis=1),
               dict(acc=acc.transpose(2, 0, 1), multiplier=m[:4], shift=s[:4], axis=1)):
        assert np.array_equal(ops.requantize(**kw, backend="cpu"), ops.requantize(**kw, backend="reference"))
    xc = rng.integers(-128, 128, (2, 4, 6, 6), dtype=np.int8)
    wc = rng.integers(-128, 128, (4, 2, 3, 3), dtype=np.int8)
    kw = dict(x=xc[:, :, ::-1, :], w=wc[::-1], groups=2, bias=misaligned(bias[:4]), padding=1)
    assert np.array_equal(ops.int_conv2d(**kw, backend="cpu"), ops.int_conv2d(**kw, backend="reference"))
    codes = rng.integers(0, 16, (7, 9), dtype=np.uint8)
    v = rng.integers(0, 256, (9, 5), dtype=np.uint8)
    kw = dict(codes=codes.T.copy().T, v=v[:, ::-1], v_zero_point=100)
    assert np.array_equal(ops.log2_attn_matmul(**kw, backend="cpu"), ops.log2_attn_matmul(**kw, backend="reference"))


# --------------------------------------------------------------------------------------------- concurrency

def _workloads():
    """(op, kwargs) for every kernel op, each large enough to split into several native tasks."""
    rng = np.random.default_rng(2024)
    m8, s8 = ops.quantize_multiplier(rng.uniform(2.0**-14, 2.0**-8, 96))
    m1, m2, sh = ops.quantize_multiplier_pair(rng.uniform(2.0**-14, 2.0**-8, 40), rng.uniform(2.0**-14, 2.0**-8, 40))
    w4 = ops.pack_int4(rng.integers(-8, 8, (96, 130), dtype=np.int8))
    return [
        ("int_gemm", dict(x=rng.integers(0, 256, (150, 130), dtype=np.uint8), w=w4, w_format="int4", x_zero_point=131,
                          w_zero_point=rng.integers(-8, 8, 96).astype(np.int32), out_dtype="int8", multiplier=m8,
                          shift=s8, out_zero_point=-5, bias=rng.integers(-9999, 9999, 96, dtype=np.int32))),
        ("int_gemm", dict(x=rng.integers(-128, 128, (70, 300), dtype=np.int8),
                          w=rng.integers(-128, 128, (90, 300), dtype=np.int8), x_zero_point=-3, out_dtype="float32",
                          out_scale=rng.uniform(1e-4, 1e-2, 90).astype(np.float32))),
        ("int_conv2d", dict(x=rng.integers(0, 256, (2, 12, 15, 15), dtype=np.uint8),
                            w=rng.integers(-128, 128, (24, 4, 3, 3), dtype=np.int8), groups=3, padding=1, stride=(1, 2),
                            x_zero_point=100)),
        ("split_gemm", dict(x1=rng.integers(0, 256, (80, 50), dtype=np.uint8), w1=rng.integers(-127, 128, (40, 50), dtype=np.int8),
                            x2=rng.integers(-128, 128, (80, 70), dtype=np.int8), w2=rng.integers(-127, 128, (40, 70), dtype=np.int8),
                            x1_zero_point=128, out_dtype="uint8", multiplier1=m1, multiplier2=m2, shift=sh, out_zero_point=9)),
        ("split_conv2d", dict(x1=rng.integers(0, 256, (2, 5, 9, 9), dtype=np.uint8), w1=rng.integers(-127, 128, (40, 5, 3, 3), dtype=np.int8),
                              x2=rng.integers(-128, 128, (2, 3, 9, 9), dtype=np.int8), w2=rng.integers(-127, 128, (40, 3, 3, 3), dtype=np.int8),
                              padding=1, out_dtype="int4", multiplier1=m1, multiplier2=m2, shift=sh, out_zero_point=1)),
        ("requantize", dict(acc=rng.integers(-2**31, 2**31, (40, 96, 30), dtype=np.int64).astype(np.int32),
                            multiplier=m8, shift=s8, axis=1, out_dtype="uint4", zero_point=3)),
        ("log2_attn_matmul", dict(codes=rng.integers(0, 16, (120, 64), dtype=np.uint8),
                                  v=rng.integers(0, 256, (64, 48), dtype=np.uint8), v_zero_point=128, bits=4,
                                  mode="sqrt2", frac_bits=16, out_dtype="int64")),
    ]


WORKLOADS = _workloads()
WORKLOAD_IDS = [f"{op}-{i}" for i, (op, _) in enumerate(WORKLOADS)]


@pytest.fixture(scope="module")
def expected():
    """Reference results of WORKLOADS (the golden model, computed once)."""
    return [getattr(ops, op)(**kw, backend="reference") for op, kw in WORKLOADS]


def _run_threads(n, fn):
    """Run ``fn(i)`` on n threads released together; return the results, re-raising the first error."""
    barrier = threading.Barrier(n)
    out, errs = [None] * n, []

    def body(i):
        try:
            barrier.wait()
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - collected and re-raised in the caller
            errs.append(e)

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise errs[0]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx", range(len(WORKLOADS)), ids=WORKLOAD_IDS)
def test_same_call_from_8_threads_is_identical(backend, idx, expected):
    """Protection: concurrent calls share no mutable state (per-call buffers, thread-local scratch, the pool's
    job lock): 8 Python threads calling the same op at once, 3 times each, all get the reference's result."""
    op, kw = WORKLOADS[idx]
    fn = getattr(ops, op)
    results = _run_threads(8, lambda i: [fn(**kw, backend=backend) for _ in range(3)])
    for per_thread in results:
        for y in per_thread:
            assert y.dtype == expected[idx].dtype and np.array_equal(y, expected[idx])


@pytest.mark.needs_cpu_ext
def test_calls_stay_exact_while_threads_and_isa_change(expected):
    """Protection: ThreadPool serializes jobs with set_num_threads (workers are never stopped or restarted
    under a running job) and the ISA switch is read per call: 6 threads computing every op while another
    thread keeps changing the native thread count and the ISA still get exact results."""
    from pyqsim.backends import cpu
    isas = cpu.isas()
    old = cpu.get_num_threads()
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            cpu.set_num_threads(1 + i % 4)
            cpu.set_isa(isas[i % len(isas)])
            i += 1
            time.sleep(0.001)

    t = threading.Thread(target=churn)
    t.start()
    try:
        def work(i):
            bad = []
            for rep in range(2):
                for j, (op, kw) in enumerate(WORKLOADS):
                    if not np.array_equal(getattr(ops, op)(**kw, backend="cpu"), expected[j]):
                        bad.append((i, rep, op))
            return bad
        results = _run_threads(6, work)
    finally:
        stop.set()
        t.join()
        cpu.set_num_threads(old)
        cpu.set_isa(None)
    assert not [b for r in results for b in r]


def _max_tick_gap(call, reps: int) -> tuple[int, float]:
    """Run ``call`` reps times on a thread while this thread ticks every millisecond: (ticks, largest gap)."""
    done = threading.Event()

    def body():
        for _ in range(reps):
            call()
        done.set()

    ticks = []
    th = threading.Thread(target=body)
    th.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    th.join()
    return len(ticks), float(np.diff(ticks).max()) if len(ticks) > 1 else float("inf")


def _gil_verdict(call) -> tuple[bool, str]:
    """(this thread kept running while ``call`` ran, details). One call must take >= ~0.1 s."""
    t0 = time.perf_counter()
    call()
    single = time.perf_counter() - t0
    reps = max(1, int(np.ceil(0.6 / max(single, 1e-3))))
    n, gap = _max_tick_gap(call, reps)
    # a call holding the GIL stops this thread for `single` seconds at a time
    return n >= 10 and gap < max(0.5 * single, 0.05) + 0.1, f"ticks={n} max_gap={gap:.3f}s call={single:.3f}s"


@pytest.mark.needs_cpu_ext
def test_gil_is_released_during_kernels():
    """Protection: py::gil_scoped_release around every kernel. A pure-Python thread keeps running while a
    long single-threaded kernel call is in flight; with the GIL held it would stall for the whole call."""
    from pyqsim import _C
    from pyqsim.backends import cpu
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (600, 1024), dtype=np.uint8)
    w = cpu.pack_weight(rng.integers(-127, 128, (600, 1024), dtype=np.int8))
    zw = np.zeros(600, np.int32)
    old = cpu.get_num_threads()
    cpu.set_num_threads(1)
    try:
        ok, why = _gil_verdict(lambda: _C.int_gemm(x, w, "int8", 128, zw, None, "int32", None, None, 0, None))
    finally:
        cpu.set_num_threads(old)
    assert ok, why


def test_gil_detector_detects_a_held_gil():
    """The detector itself: sum(range(N)) runs in C holding the GIL, and is caught."""
    n = 10**6
    t0 = time.perf_counter()
    sum(range(n))
    n = int(n * 0.3 / max(time.perf_counter() - t0, 1e-4))  # about 0.3 s per call
    ok, why = _gil_verdict(lambda: sum(range(n)))
    assert not ok, why


# --------------------------------------------------------------------------------------------- determinism


@pytest.mark.needs_cpu_ext
def test_results_identical_for_1_and_n_native_threads_and_runs(expected):
    """Protection: each output element is computed by exactly one task with fixed arithmetic (csrc/driver.h),
    so results do not depend on the native thread count (1, 2, 3, 8), the ISA or the repetition."""
    from pyqsim.backends import cpu
    isas = cpu.isas()
    old = cpu.get_num_threads()
    try:
        for isa in isas:
            cpu.set_isa(isa)
            for n in (1, 2, 3, 8):
                cpu.set_num_threads(n)
                for j, (op, kw) in enumerate(WORKLOADS):
                    for _ in range(2):
                        assert np.array_equal(getattr(ops, op)(**kw, backend="cpu"), expected[j]), (isa, n, op)
    finally:
        cpu.set_num_threads(old)
        cpu.set_isa(None)


def _digest(backend: str) -> str:
    h = hashlib.sha256()
    for op, kw in WORKLOADS:
        y = getattr(ops, op)(**kw, backend=backend)
        h.update(op.encode() + str(y.dtype).encode() + str(y.shape).encode() + y.tobytes())
    return h.hexdigest()


@pytest.mark.needs_cpu_ext
def test_results_identical_across_processes():
    """Results do not depend on the process: the cpu backend in a fresh interpreter with one native thread and
    the scalar ISA computes outputs byte-identical to the reference in this process. (The reference against
    itself in another process would compare the same NumPy code with itself, so it is not a case here.)"""
    env = dict(os.environ, PYQSIM_NUM_THREADS="1", PYQSIM_CPU_ISA="scalar")
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_reliability as T; print(T._digest('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == _digest("reference")


# --------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Return free heap pages to the OS (glibc), so that RSS counts live memory only: memory freed by earlier
    tests stays resident otherwise, and a leak could grow into it without growing RSS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _growth(fn, repeats=REPEATS) -> float:
    """RSS growth in MiB over ``repeats`` calls of fn after WARMUP calls."""
    for _ in range(WARMUP):
        fn()
    gc.collect()
    _trim()
    before = rss_bytes()
    for _ in range(repeats):
        fn()
    gc.collect()
    _trim()
    return (rss_bytes() - before) / 2**20


def _leak_cases():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    w = rng.integers(-128, 128, (64, 64), dtype=np.int8)
    zw = np.zeros(64, np.int32)
    xc = rng.integers(0, 256, (1, 8, 8, 8), dtype=np.uint8)
    wc = rng.integers(-128, 128, (16, 8, 3, 3), dtype=np.int8)
    m, s = ops.quantize_multiplier(np.full(64, 0.001))
    acc = rng.integers(-2**20, 2**20, (64, 64), dtype=np.int32)
    codes = rng.integers(0, 16, (64, 64), dtype=np.uint8)

    def binding_errors():
        from pyqsim import _C
        for bad in (dict(x_zero_point=300), dict(w_zero_point=zw[:3]), dict(x=x.astype(np.int16))):
            kw = dict(x=x, w=w, w_format="int8", x_zero_point=0, w_zero_point=zw, bias=None, out_dtype="int32",
                      multiplier=None, shift=None, out_zero_point=0, out_scale=None)
            kw.update(bad)
            try:
                _C.int_gemm(**kw)
            except (TypeError, ValueError):
                pass

    def packed_weights():
        from pyqsim.backends import cpu
        cpu.pack_weight(w)
        cpu.pack_weight(wc, kind="conv")

    cpu_cases = [
        ("int_gemm", lambda: ops.int_gemm(x, w, x_zero_point=128, out_dtype="int8", multiplier=m, shift=s, backend="cpu")),
        ("int_conv2d", lambda: ops.int_conv2d(xc, wc, padding=1, backend="cpu")),
        ("split_gemm", lambda: ops.split_gemm(x, w, x, w, out_dtype="float32", out_scale1=1.0, out_scale2=2.0, backend="cpu")),
        ("requantize", lambda: ops.requantize(acc, m, s, backend="cpu")),
        ("log2_attn_matmul", lambda: ops.log2_attn_matmul(codes, w, bits=4, backend="cpu")),
        ("binding errors", binding_errors),
        ("packed weights", packed_weights),
    ]
    ref_cases = [
        ("reference int_gemm", lambda: ops.int_gemm(x[:16], w[:16], x_zero_point=3, backend="reference")),
        ("reference errors", lambda: pytest.raises(ValueError, ops.int_gemm, x, w, x_zero_point=300, backend="reference")),
    ]
    return [pytest.param(n, f, marks=pytest.mark.needs_cpu_ext) for n, f in cpu_cases] + \
        [pytest.param(n, f) for n, f in ref_cases]


@pytest.mark.skipif(_sanitized(), reason="ASan's quarantine holds freed memory: RSS is not a leak signal there")
@pytest.mark.parametrize("name,fn", _leak_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_repeated_calls_do_not_grow_rss(name, fn):
    """Protection: no per-call leak (output arrays, packed weights, exception paths hold no references).
    10^4 calls after warm-up grow the resident set by at most RSS_SLACK_MIB."""
    grown = _growth(fn)
    assert grown <= RSS_SLACK_MIB, f"{name}: RSS grew {grown:.1f} MiB over {REPEATS} calls"


@pytest.mark.skipif(_sanitized(), reason="RSS is not meaningful under ASan")
def test_leak_detector_detects_a_leak():
    """The detector itself: keeping one 16 KiB array per call is caught (10^4 * 16 KiB = 160 MiB)."""
    kept = []
    grown = _growth(lambda: kept.append(np.ones(4096, np.int32)), repeats=REPEATS)
    assert grown > RSS_SLACK_MIB


@pytest.mark.parametrize("backend", BACKENDS)
def test_petabyte_output_raises_memory_error(backend):
    """Protection: a request too large for memory ends in MemoryError (output allocation is checked before
    any kernel writes), not a crash. x [2^23, 1] and w [2^23, 1] are zero-stride views; the int32 output
    would need 2^46 * 4 bytes (256 TiB)."""
    x = fake((2**23, 1), np.uint8)
    w = fake((2**23, 1), np.int8)
    with pytest.raises(MemoryError):
        ops.int_gemm(x, w, backend=backend)
    with pytest.raises(MemoryError):  # K = 0: nothing is copied, the output alone would be 2^50 elements
        ops.int_gemm(np.zeros((2**40, 0), np.uint8), np.zeros((2**10, 0), np.int8), backend=backend)
    with pytest.raises(MemoryError):  # an empty weight of 2^40 rows: its per-channel zero points need 8 TiB
        ops.int_gemm(np.zeros((1, 0), np.uint8), np.zeros((2**40, 0), np.int8), backend=backend)


@pytest.mark.needs_cpu_ext
def test_petabyte_output_raises_memory_error_in_the_binding():
    """The same request straight to pyqsim._C (no op layer): MemoryError, then the process carries on."""
    from pyqsim import _C
    with pytest.raises(MemoryError):
        _C.int_gemm(np.zeros((2**40, 0), np.uint8), np.zeros((2**10, 0), np.int8), "int8", 0, np.zeros(2**10, np.int32),
                    None, "int32", None, None, 0, None)
    with pytest.raises(MemoryError):
        _C.log2_attn_matmul(np.zeros((2**40, 0), np.uint8), np.zeros((0, 2**10), np.uint8), 0, 4, 2, 16, "float32",
                            None, None, 0, np.ones(2**10, np.float32))
    y = _C.int_gemm(np.ones((2, 3), np.uint8), np.ones((2, 3), np.int8), "int8", 0, np.zeros(2, np.int32), None, "int32",
                    None, None, 0, None)
    assert np.array_equal(y, np.full((2, 2), 3, np.int32))


@pytest.mark.skipif(os.environ.get("PYQSIM_BIG_MEMORY_TESTS") != "1", reason="needs ~3 GiB; set PYQSIM_BIG_MEMORY_TESTS=1")
@pytest.mark.needs_cpu_ext
def test_output_index_beyond_2_31():
    """M * N > 2^31 output elements (uint8): the kernels index the output with 64-bit offsets. Run by hand."""
    m, n = 2**16 + 3, 2**15 + 5
    x = np.ones((m, 1), np.uint8)
    x[-1, 0] = 2
    w = np.ones((n, 1), np.int8)
    w[-1, 0] = 3
    y = ops.int_gemm(x, w, out_dtype="uint8", multiplier=2**30, shift=30, backend="cpu")
    assert y.shape == (m, n) and y[0, 0] == 1 and y[-1, -1] == 6 and y[-1, 0] == 2 and y[0, -1] == 3


def test_conv_groups_with_no_channels_on_the_op_layer():
    """Guards R2 (fixed) through pyqsim.ops: C = O = 0 with groups = 2^40 once looped over the groups
    (reference: a Python loop; cpu: one packed matrix per group). Run isolated: it raises a ValueError naming
    groups at once."""
    from test_bindings_errors import HANG_TIMEOUT, assert_isolated_raises
    code = ("from pyqsim import ops\n"
            "report(lambda: ops.int_conv2d(Z(1, 0, 3, 3), Z(0, 0, 1, 1), groups=2**40, backend='reference'))")
    assert_isolated_raises(code, ("ValueError",), "groups", timeout=HANG_TIMEOUT)


# --------------------------------------------------------------------------------------------- calibration

CALIB_GUARD = pytest.mark.needs_torch  # R11 fixed: the Q-Diffusion calibration validates its data


@pytest.fixture(scope="module")
def torch_mod():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="module")
def vit(torch_mod):
    from pyqsim.models.vit import digits_vit
    return digits_vit()


@pytest.fixture(scope="module")
def unet(torch_mod):
    from pyqsim.models.unet import load_digits_unet
    return load_digits_unet()


def _repq(model, calib):
    from pyqsim.calib import repqvit as R
    return R.calibrate(model, calib, R.RepQConfig())


def _qdiff(model, cali):
    from pyqsim.calib import qdiffusion as Q
    return Q.calibrate(model, cali, Q.QDiffConfig(w_bits=4, a_bits=8, weight_iters=0, act_iters=0, init_samples=8))


def _cali(n=8):
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 1, 8, 8)).astype(np.float32), "t": np.full(n, 500, np.int64)}


@pytest.mark.needs_torch
def test_repqvit_rejects_empty_calibration_set(vit, torch_mod):
    """Protection (R10, fixed): ``repqvit.calibrate`` with zero images raises ValueError naming calib."""
    with pytest.raises(ValueError, match="calib"):
        _repq(vit, torch_mod.zeros(0, 1, 8, 8))


@pytest.mark.needs_torch
def test_repqvit_rejects_nan_calibration_images(vit, torch_mod):
    """Protection (R10, fixed): NaN in the calibration images is rejected up front, naming calib."""
    x = torch_mod.rand(4, 1, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="calib.*(NaN|finite)|(NaN|finite).*calib"):
        _repq(vit, x)


@pytest.mark.needs_torch
def test_repqvit_names_the_layer_with_nan_activations(vit, torch_mod):
    """Protection (R10, fixed): finite images but a NaN bias inside the model: the error names the quantizer
    (layer) that saw the non-finite activations."""
    import copy
    m = copy.deepcopy(vit)
    with torch_mod.no_grad():
        m.blocks[1].mlp.fc1.bias[0] = float("nan")
    with pytest.raises(ValueError, match="blocks"):
        _repq(m, torch_mod.rand(4, 1, 8, 8))


@pytest.mark.needs_torch
def test_repqvit_rejects_integer_calibration_images(vit, torch_mod):
    """Protection (R10, fixed): integer images that the model cannot run raise TypeError/ValueError naming
    calib (not a RuntimeError from torch.fx)."""
    with pytest.raises((TypeError, ValueError), match="calib"):
        _repq(vit, torch_mod.zeros(4, 1, 8, 8, dtype=torch_mod.uint8))


@pytest.mark.needs_torch
def test_repqvit_valid_calibration_still_works(vit, torch_mod):
    res = _repq(vit, torch_mod.rand(4, 1, 8, 8))
    assert all(np.isfinite(float(q.scale.flatten()[0])) for q in res.quantizers() if hasattr(q, "scale"))


@pytest.mark.needs_torch
@CALIB_GUARD
def test_qdiffusion_rejects_empty_calibration_set(unet):
    """R11: ``qdiffusion.calibrate`` with zero samples must raise ValueError naming cali (today: IndexError)."""
    c = _cali()
    with pytest.raises(ValueError, match="cali"):
        _qdiff(unet, {"x": c["x"][:0], "t": c["t"][:0]})


@pytest.mark.needs_torch
@CALIB_GUARD
def test_qdiffusion_rejects_nan_calibration_inputs(unet):
    """R11: NaN in cali['x'] must be rejected (today: accepted silently, calibration completes)."""
    c = _cali()
    c["x"][2, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="cali"):
        _qdiff(unet, c)


@pytest.mark.needs_torch
@CALIB_GUARD
def test_qdiffusion_names_the_layer_with_nan_activations(unet, torch_mod):
    """R11: a NaN bias inside the UNet: the error must name the layer whose activations are NaN (today:
    'cannot convert float NaN to integer')."""
    import copy
    m = copy.deepcopy(unet)
    with torch_mod.no_grad():
        m.get_submodule("down.0.block.0.conv1").bias[0] = float("nan")
    with pytest.raises(ValueError, match="down\\.0"):
        _qdiff(m, _cali())


@pytest.mark.needs_torch
@CALIB_GUARD
def test_qdiffusion_rejects_mismatched_x_and_t(unet):
    """R11: len(cali['x']) != len(cali['t']) must raise ValueError naming them (today: RuntimeError from torch)."""
    c = _cali()
    c["t"] = c["t"][:3]
    with pytest.raises(ValueError, match="cali"):
        _qdiff(unet, c)


@pytest.mark.needs_torch
@CALIB_GUARD
def test_qdiffusion_generate_calibration_data_rejects_zero_samples(unet):
    """R11: ``generate_calibration_data(cali_n=0)`` must raise ValueError naming cali_n (today: numpy's
    'need at least one array to concatenate')."""
    from pyqsim.calib import qdiffusion as Q
    from pyqsim.models.ddim import DDIMSampler
    with pytest.raises(ValueError, match="cali_n"):
        Q.generate_calibration_data(unet, DDIMSampler(steps=10), cali_n=0, cali_st=4, shape=(1, 8, 8))


# --------------------------------------------------------------------------------------------- the docs table


def battery_counts() -> list[tuple[str, str, int, int, int]]:
    """(layer, name, cases, isolated, known-open) for every op, binding and CLI command, from the test tables."""
    import test_bindings_errors as B
    import test_cli_errors as L
    import test_errors as E

    rows: dict[tuple[str, str], list[int]] = {}

    def add(layer, name, isolated=0, known=0):
        r = rows.setdefault((layer, name), [0, 0, 0])
        r[0] += 1
        r[1] += isolated
        r[2] += known

    prefixes = [("split conv", "split_conv2d"), ("split", "split_gemm"), ("gemm", "int_gemm"), ("conv", "int_conv2d"),
                ("quantize_log", "quantize_log"), ("quantize", "quantize"), ("pack", "pack_int4"),
                ("unpack", "unpack_int4"), ("multiplier", "quantize_multiplier"),
                ("pair", "quantize_multiplier_pair"), ("requant", "requantize"), ("log2", "log2_attn_matmul")]
    for c in E.CASES:
        add("op", next(op for p, op in prefixes if c[0].startswith(p)))
    for c in KERNEL_CASES + HOST_CASES:
        add("op", c[0])
    add("op", "int_conv2d", isolated=1)  # test_conv_groups_with_no_channels_on_the_op_layer
    for c in B.CASES + B.MISC:
        add("binding", c[0])
    for c in B.KNOWN:
        add("binding", c[0])
    for name, *_ in B.ISOLATED:
        add("binding", name.split(":")[0], isolated=1)
    for name, *_ in B.KNOWN_ISOLATED:
        add("binding", name.split(":")[0], isolated=1)
    for c in L.CASES:
        add("cli", c.command or "(no command)", isolated=int(c.subprocess), known=int(c.known))
    for name, fn in sorted(globals().items()):
        if name.startswith(("test_repqvit_", "test_qdiffusion_")) and "still_works" not in name:
            entry = ("repqvit.calibrate" if "repqvit" in name else
                     "qdiffusion.generate_calibration_data" if "generate" in name else "qdiffusion.calibrate")
            xfail = any(m.name == "xfail" for m in getattr(fn, "pytestmark", []))
            add("calibration", entry, known=int(xfail))
    order = {"op": 0, "binding": 1, "cli": 2, "calibration": 3}
    return sorted(((k[0], k[1], *v) for k, v in rows.items()), key=lambda r: (order[r[0]], r[1]))


def render_table() -> str:
    lines = ["| layer | op / binding / command | cases | isolated | known open |", "|---|---|---:|---:|---:|"]
    tot = [0, 0, 0]
    for layer, name, n, iso, known in battery_counts():
        lines.append(f"| {layer} | `{name}` | {n} | {iso} | {known} |")
        tot = [tot[0] + n, tot[1] + iso, tot[2] + known]
    lines.append(f"| **total** | | **{tot[0]}** | **{tot[1]}** | **{tot[2]}** |")
    return "\n".join(lines)


def test_reliability_doc_table_is_current():
    """docs/reliability.md carries the table that render_table() generates from the parametrization."""
    doc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "reliability.md")
    if not os.path.exists(doc):
        pytest.skip("docs/reliability.md is not part of this checkout (installed package)")
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    assert render_table() in text, "regenerate it: python tests/test_reliability.py --table"


if __name__ == "__main__":  # pragma: no cover
    if "--table" in sys.argv:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        print(render_table())
