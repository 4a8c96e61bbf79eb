"""Time-bounded fuzzing of the raw bindings (``pyqsim._C``) with hostile arguments (Hypothesis).

Property: a call to a kernel binding either returns a result byte-identical to the reference
(``pyqsim.ops`` with ``backend="reference"`` on the same arguments), or raises TypeError, ValueError or
MemoryError. Anything else fails: another exception type, a crash (it kills the test process), a hang (a
watchdog prints the case and ends the process after PYQSIM_FUZZ_HANG_SECONDS), or a result that differs.
Protection guarded: every validation in bindings/module.cpp together with the kernels' memory safety; under
the sanitizer build (.ci/sanitize.sh) any out-of-bounds access or undefined behaviour aborts the run.

Arguments start from a consistent valid call (random sizes 0..~20 with tile tails, type-extreme values,
every output stage) and 0-3 of them are replaced by hostile values: random dtypes (byte-swapped, bool,
object, str, void, complex, float), wrong ndim or shape, 0-d, non-contiguous, Fortran, reversed, misaligned
(a uint8 buffer offset by one byte), read-only, zero-stride views, zero-size arrays with other dimensions up
to 2^62, Python lists/bytes/None, extreme integers (+-2^63, 2^64), NaN/inf floats, wrong strings.

Budget: PYQSIM_FUZZ_SECONDS (default 30) of Hypothesis batches with seeds PYQSIM_FUZZ_SEED (default 0),
1, 2, ...; run longer by hand, e.g. ``PYQSIM_FUZZ_SECONDS=3600 nice python -m pytest tests/test_fuzz.py -s``.
A failing example is shrunk and printed with its seed and Hypothesis blob.

Not generated (counted): valid requests that would really allocate and write gigabytes on the test machine
-- outputs between MAX_OUT_BYTES and 2^46 bytes, empty weights with 2^20..2^38 rows (resource_hog()).
Larger requests, which must fail with MemoryError/ValueError, are generated.
"""
from __future__ import annotations

import collections
import faulthandler
import math
import os
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from pyqsim import _checks as CK
from pyqsim import ops

pytestmark = pytest.mark.needs_cpu_ext

BUDGET = float(os.environ.get("PYQSIM_FUZZ_SECONDS", "30"))
SEED0 = int(os.environ.get("PYQSIM_FUZZ_SEED", "0"))
HANG_SECONDS = float(os.environ.get("PYQSIM_FUZZ_HANG_SECONDS", "60"))
BATCH = int(os.environ.get("PYQSIM_FUZZ_BATCH", "200"))
OK_ERRORS = (TypeError, ValueError, MemoryError)
BIG = [2**31 - 1, 2**31 + 1, 2**32 + 1, 2**40, 2**62]
MAX_OUT_BYTES = 2**26   # a valid output above this (and below 2^46, which cannot be allocated) is not generated
MAX_ROWS = 2**20        # see resource_hog()

STATS: collections.Counter = collections.Counter()


def _C():
    from pyqsim import _C
    return _C


# --------------------------------------------------------------------------------------------- valid calls


def dims(hi=20):
    return st.one_of(st.sampled_from([0, 1, 3, 4, 8, 15, 16, 17]), st.integers(0, hi))


def codes(draw, dtype_name, shape):
    lo, hi = CK.RANGES[dtype_name]
    dt = CK.CONTAINERS[dtype_name]
    mode = draw(st.sampled_from(["random", "lo", "hi", "mixed"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "lo":
        return np.full(shape, lo, dt)
    if mode == "hi":
        return np.full(shape, hi, dt)
    a = rng.integers(lo, hi + 1, shape).astype(dt)
    if mode == "mixed" and a.size:
        a.flat[rng.integers(0, a.size, max(1, a.size // 3))] = rng.choice([lo, hi])
    return a


def packed(draw, fmt, n, k):
    """int8 [n, k] codes, or packed int4/uint4 [n, ceil(k/2)] with a zero padding nibble."""
    c = codes(draw, fmt, (n, k))
    return c if fmt == "int8" else ops.pack_int4(c, fmt == "int4", backend="reference")


def zp(draw, type_name, n=None):
    lo, hi = CK.RANGES[type_name]
    v = st.one_of(st.sampled_from([lo, hi, 0 if lo <= 0 else lo]), st.integers(lo, hi))
    if n is None:
        return draw(v)
    return np.array(draw(st.lists(v, min_size=n, max_size=n)), np.int32)


def out_stage(draw, n, allowed, prefix=""):
    kind = draw(st.sampled_from(allowed))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kw = {"out_dtype": kind, "multiplier": None, "shift": None, "out_zero_point": 0, "out_scale": None}
    if kind in CK.REQUANT_OUT:
        kw["multiplier"] = rng.integers(0, 2**31, n).astype(np.int32)
        kw["shift"] = rng.integers(1, 95, n).astype(np.int32)
        if draw(st.booleans()):
            kw["shift"][:] = draw(st.sampled_from([1, 31, 40, 62, 63, 94]))
        kw["out_zero_point"] = zp(draw, kind)
    elif kind == "float32":
        exps = rng.uniform(-40, 38, n) if draw(st.booleans()) else rng.uniform(-12, 0, n)
        kw["out_scale"] = np.maximum(np.float32(2.0) ** exps.astype(np.float32), np.float32(1e-45)).astype(np.float32)
    return kw


@st.composite
def int_gemm_call(draw):
    m, n, k = draw(dims()), draw(dims()), draw(dims())
    xt = draw(st.sampled_from(["int8", "uint8"]))
    fmt = draw(st.sampled_from(["int8", "int4", "uint4"]))
    st_ = out_stage(draw, n, ["int32", "float32", "int8", "uint8", "int4", "uint4"])
    bias = None
    if draw(st.booleans()):
        bias = np.array(draw(st.lists(st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-1000, 1000)),
                                      min_size=n, max_size=n)), np.int32)
    return "int_gemm", dict(x=codes(draw, xt, (m, k)), w=packed(draw, fmt, n, k), w_format=fmt,
                            x_zero_point=zp(draw, xt), w_zero_point=zp(draw, fmt, n), bias=bias, **st_)


@st.composite
def split_gemm_call(draw):
    m, n = draw(dims()), draw(dims())
    kw = {}
    for i in "12":
        k = draw(dims())
        xt = draw(st.sampled_from(["int8", "uint8"]))
        fmt = draw(st.sampled_from(["int8", "int4", "uint4"]))
        kw.update({f"x{i}": codes(draw, xt, (m, k)), f"w{i}": packed(draw, fmt, n, k), f"w{i}_format": fmt,
                   f"x{i}_zero_point": zp(draw, xt), f"w{i}_zero_point": zp(draw, fmt, n)})
    kw["bias"] = None if draw(st.booleans()) else np.random.default_rng(n).integers(-2**20, 2**20, n).astype(np.int32)
    s = out_stage(draw, n, ["float32", "int8", "uint8", "int4", "uint4"])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kw.update(out_dtype=s["out_dtype"], multiplier1=s["multiplier"], shift=s["shift"], out_zero_point=s["out_zero_point"],
              multiplier2=None if s["multiplier"] is None else rng.integers(0, 2**31, n).astype(np.int32),
              out_scale1=s["out_scale"], out_scale2=None if s["out_scale"] is None else s["out_scale"][::-1].copy())
    return "split_gemm", kw


def _geometry(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 9))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 9))
    return (kh, kw), (sh, sw), (ph, pw), (dh, dw), h, w


def _conv_w(draw, fmt, o, cg, kh, kw):
    c = codes(draw, fmt, (o, cg, kh, kw))
    return c if fmt == "int8" else ops.pack_int4(c.reshape(o, cg * kh * kw), fmt == "int4", backend="reference")


@st.composite
def int_conv2d_call(draw):
    g = draw(st.sampled_from([1, 1, 2, 3]))
    cg, og, b = draw(st.integers(0, 4)), draw(st.integers(0, 4)), draw(st.integers(0, 2))
    ks, stride, pad, dil, h, w = _geometry(draw)
    xt = draw(st.sampled_from(["int8", "uint8"]))
    fmt = draw(st.sampled_from(["int8", "int4", "uint4"]))
    o = og * g
    s = out_stage(draw, o, ["int32", "float32", "int8", "uint8", "int4", "uint4"])
    return "int_conv2d", dict(x=codes(draw, xt, (b, cg * g, h, w)), w=_conv_w(draw, fmt, o, cg, *ks), w_format=fmt,
                              kernel_size=ks, stride=stride, padding=pad, dilation=dil, groups=g,
                              x_zero_point=zp(draw, xt), w_zero_point=zp(draw, fmt, o),
                              bias=None if draw(st.booleans()) else np.arange(o, dtype=np.int32) * 977, **s)


@st.composite
def split_conv2d_call(draw):
    o, b = draw(st.integers(0, 5)), draw(st.integers(0, 2))
    ks, stride, pad, dil, h, w = _geometry(draw)
    kw = dict(kernel_size=ks, stride=stride, padding=pad, dilation=dil)
    for i in "12":
        c = draw(st.integers(0, 4))
        xt = draw(st.sampled_from(["int8", "uint8"]))
        fmt = draw(st.sampled_from(["int8", "int4", "uint4"]))
        kw.update({f"x{i}": codes(draw, xt, (b, c, h, w)), f"w{i}": _conv_w(draw, fmt, o, c, *ks), f"w{i}_format": fmt,
                   f"x{i}_zero_point": zp(draw, xt), f"w{i}_zero_point": zp(draw, fmt, o)})
    kw["bias"] = None
    s = out_stage(draw, o, ["float32", "int8", "uint8", "int4", "uint4"])
    kw.update(out_dtype=s["out_dtype"], multiplier1=s["multiplier"], multiplier2=s["multiplier"], shift=s["shift"],
              out_zero_point=s["out_zero_point"], out_scale1=s["out_scale"], out_scale2=s["out_scale"])
    return "split_conv2d", kw


@st.composite
def requantize_call(draw):
    outer, n, inner = draw(dims(9)), draw(dims(9)), draw(dims(9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    acc = rng.integers(-2**31, 2**31, (outer, n, inner)).astype(np.int32)
    if acc.size and draw(st.booleans()):
        acc.flat[::2] = draw(st.sampled_from([-(2**31), 2**31 - 1, 0, -1]))
    s = out_stage(draw, n, ["int8", "uint8", "int4", "uint4"])
    return "requantize", dict(acc=acc, multiplier=s["multiplier"], shift=s["shift"], zero_point=s["out_zero_point"],
                              out_dtype=s["out_dtype"])


@st.composite
def log2_call(draw):
    m, length, n = draw(dims()), draw(dims()), draw(dims())
    bits = draw(st.integers(2, 8))
    vt = draw(st.sampled_from(["int8", "uint8"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = rng.integers(0, 2**bits, (m, length)).astype(np.uint8)
    s = out_stage(draw, n, ["int64", "float32", "int8", "uint8", "int4", "uint4"])
    return "log2_attn_matmul", dict(codes=c, v=codes(draw, vt, (length, n)), v_zero_point=zp(draw, vt), bits=bits,
                                    k=draw(st.sampled_from([1, 2])), frac_bits=draw(st.sampled_from([0, 4, 16, 24])), **s)


@st.composite
def pack_gemm_call(draw):
    n, k = draw(dims()), draw(dims())
    fmt = draw(st.sampled_from(["int8", "int4", "uint4"]))
    return "pack_gemm_weight", dict(w=packed(draw, fmt, n, k), w_format=fmt, k=k)


@st.composite
def pack_conv_call(draw):
    g = draw(st.sampled_from([1, 2, 3]))
    cg, og = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    fmt = draw(st.sampled_from(["int8", "int4", "uint4"]))
    return "pack_conv_weight", dict(w=_conv_w(draw, fmt, og * g, cg, kh, kw), w_format=fmt, cin_per_group=cg,
                                    kernel_size=(kh, kw), groups=g)


VALID = [int_gemm_call(), split_gemm_call(), int_conv2d_call(), split_conv2d_call(), requantize_call(), log2_call(),
         pack_gemm_call(), pack_conv_call()]

# argument kinds, for the hostile replacements
ARRAYS = {"x", "w", "x1", "x2", "w1", "w2", "acc", "codes", "v"}
VECTORS = {"w_zero_point", "w1_zero_point", "w2_zero_point", "bias", "multiplier", "multiplier1", "multiplier2",
           "shift", "out_scale", "out_scale1", "out_scale2"}
STRINGS = {"w_format", "w1_format", "w2_format", "out_dtype"}
PAIRS = {"kernel_size", "stride", "padding", "dilation"}
INTS = {"x_zero_point", "x1_zero_point", "x2_zero_point", "out_zero_point", "zero_point", "v_zero_point", "bits", "k",
        "frac_bits", "groups", "cin_per_group"}

# --------------------------------------------------------------------------------------------- hostile values

DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float16, np.float32,
          np.float64, np.bool_, np.complex64, ">i4", ">f4", ">i8", "V4", object, "U1", "S2", "m8[s]"]
EDGE_INTS = [-(2**63), -(2**31) - 1, -(2**31), -129, -9, -1, 0, 1, 2, 3, 7, 8, 15, 16, 24, 25, 31, 62, 63, 64, 94, 95,
             127, 128, 255, 256, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1]


def misaligned(a):
    raw = np.zeros(a.nbytes + a.itemsize + 1, np.uint8)[1:1 + a.nbytes]
    out = raw.view(a.dtype).reshape(a.shape) if a.nbytes else np.zeros(a.shape, a.dtype)
    out[...] = a
    return out


def as_dtype(a, dt, rng):
    dt = np.dtype(dt)
    if dt.kind in "OUSVm":
        out = np.zeros(a.shape, dt)
        return out
    if dt.kind == "b":
        return a != 0
    if dt.kind in "iu":
        return rng.integers(-(2**31), 2**31, a.shape).astype(dt)
    vals = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e-45, 3e38, 0.5]), a.shape) if a.size \
        else np.zeros(a.shape)
    with np.errstate(all="ignore"):
        return vals.astype(dt)


@st.composite
def hostile_array(draw, a):
    """A hostile replacement for array argument ``a`` (an ndarray or None)."""
    if not isinstance(a, np.ndarray):
        a = np.zeros((2, 3), np.int8)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["dtype", "ndim+", "ndim-", "0d", "strided", "fortran", "reversed", "misaligned",
                                 "readonly", "zero-stride", "huge-empty", "shape", "list", "none", "int", "bytes",
                                 "memoryview", "extreme"]))
    STATS[f"mutation:{kind}"] += 1
    if kind == "dtype":
        return as_dtype(a, draw(st.sampled_from(DTYPES)), rng)
    if kind == "ndim+":
        return a[None] if draw(st.booleans()) else a[..., None]
    if kind == "ndim-":
        return a.reshape(-1) if a.ndim != 1 else np.array(a.flat[0] if a.size else 0, a.dtype)
    if kind == "0d":
        return np.array(a.flat[0] if a.size else 0, a.dtype)
    if kind == "strided":
        return np.repeat(a, 2, axis=-1)[..., ::2] if a.ndim else a
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "reversed":
        return a[::-1] if a.ndim else a
    if kind == "misaligned":
        return misaligned(a)
    if kind == "readonly":
        r = a.copy()
        r.setflags(write=False)
        return r
    if kind == "zero-stride":
        shape = tuple(draw(st.sampled_from([d, d + 1, 2**20, 2**31 + 1])) for d in a.shape) or (4,)
        try:
            return np.lib.stride_tricks.as_strided(np.zeros(1, a.dtype), shape, (0,) * len(shape))
        except ValueError:  # more elements than numpy can index
            shape = tuple(min(d, 2**10) for d in shape)
            return np.lib.stride_tricks.as_strided(np.zeros(1, a.dtype), shape, (0,) * len(shape))
    if kind == "huge-empty":
        nd = max(a.ndim, 1)
        shape = [draw(st.sampled_from([0, 1, 3] + BIG)) for _ in range(nd)]
        shape[draw(st.integers(0, nd - 1))] = 0
        try:
            return np.zeros(shape, a.dtype)
        except ValueError:  # numpy refuses shapes whose product exceeds intp even when empty
            return np.zeros([0] * nd, a.dtype)
    if kind == "shape":
        shape = list(a.shape) or [1]
        i = draw(st.integers(0, len(shape) - 1))
        shape[i] = max(0, shape[i] + draw(st.sampled_from([-1, 1, 2])))
        return np.zeros(shape, a.dtype)
    if kind == "list":
        return a.tolist()
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.sampled_from([0, 3, -1]))
    if kind == "bytes":
        return a.tobytes()
    if kind == "memoryview":
        return memoryview(np.ascontiguousarray(a)) if a.dtype.kind in "iuf" else memoryview(b"\0" * 4)
    out = a.copy()  # extreme values of the dtype
    if out.size and out.dtype.kind in "iu":
        info = np.iinfo(out.dtype)
        out.flat[::2] = info.min
        out.flat[1::2] = info.max
    elif out.size and out.dtype.kind == "f":
        out.flat[:] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3.4e38], out.size)
    return out


def hostile_scalar(draw):
    return draw(st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**64), 2**64),
                          st.sampled_from([None, 1.5, float("nan"), float("inf"), "1", True, np.int64(3),
                                           np.uint64(2**64 - 1), np.array(3), np.array([1, 2]), 2**70])))


def hostile_string(draw):
    return draw(st.sampled_from(["", "INT8", "int8 ", "int16", "int64", "float64", "int32", "float32", "uint8", "int4",
                                 "uint4", "int2", "\0", "int8\0", None, 8, b"int8", b"\xff"]))


def hostile_pair(draw):
    ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-5, 5))
    return draw(st.one_of(st.tuples(ints, ints), st.lists(ints, min_size=0, max_size=3),
                          st.sampled_from([None, 1, 3, "ab", (1.5, 1), (np.int64(2), 2), np.array([1, 1]), (None, 1),
                                           (2**64, 1)])))


@st.composite
def hostile_call(draw):
    name, kw = draw(st.one_of(*VALID))
    keys = sorted(kw)
    n_mut = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))
    for key in draw(st.lists(st.sampled_from(keys), min_size=n_mut, max_size=n_mut, unique=True)):
        if key in ARRAYS or key in VECTORS:
            kw[key] = draw(hostile_array(kw[key]))
        elif key in STRINGS:
            kw[key] = hostile_string(draw)
        elif key in PAIRS:
            kw[key] = hostile_pair(draw)
        else:
            kw[key] = hostile_scalar(draw)
    STATS[f"mutations:{n_mut}"] += 1
    return name, kw


# --------------------------------------------------------------------------------------------- resource guards


def _shape(v):
    return tuple(v.shape) if isinstance(v, np.ndarray) else None


def _int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _pair(v):
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(_int(e) is not None for e in v):
        return v
    return None


def resource_hog(name, kw) -> str | None:
    """A valid request that would really allocate and touch gigabytes on this machine (not generated): an
    empty weight with 2^20..2^38 rows packs per-row column sums of 4 MiB..1 TiB. Above 2^38 rows the
    allocation cannot succeed and must end in MemoryError/ValueError, which is generated."""
    for key in ("w", "w1", "w2"):
        s = _shape(kw.get(key))
        if s and MAX_ROWS < s[0] < 2**38:
            return "rows"
    return None


def too_big_output(name, kw) -> bool:
    """A valid output between MAX_OUT_BYTES and 2^46 bytes could really be allocated and written: skip."""
    try:
        if name in ("int_gemm", "split_gemm"):
            x, w = _shape(kw.get("x", kw.get("x1"))), _shape(kw.get("w", kw.get("w1")))
            elems = x[0] * w[0] if x and w else 0
        elif name in ("int_conv2d", "split_conv2d"):
            x, w = _shape(kw.get("x", kw.get("x1"))), _shape(kw.get("w", kw.get("w1")))
            pad = _pair(kw.get("padding")) or (0, 0)
            elems = x[0] * w[0] * (x[2] + 2 * abs(pad[0]) + 1) * (x[3] + 2 * abs(pad[1]) + 1) if x and w and len(x) == 4 else 0
        elif name == "log2_attn_matmul":
            c, v = _shape(kw.get("codes")), _shape(kw.get("v"))
            elems = c[0] * v[-1] if c and v else 0
        elif name == "requantize":
            a = _shape(kw.get("acc"))
            elems = math.prod(a) if a else 0
        else:
            return False
    except (TypeError, IndexError):
        return False
    return MAX_OUT_BYTES < elems * 8 < 2**46


# --------------------------------------------------------------------------------------------- the property


def _norm(v, key=""):
    """Values the binding converts implicitly, as the op layer expects them (the binding is the lenient one:
    bytes for str, bool for int, an integer ndarray for a pair)."""
    if key in PAIRS and isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu":
        return tuple(int(e) for e in v)
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            return v
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    return v


def reference(name, kw):
    n = {k: _norm(v, k) for k, v in kw.items()}
    r = dict(backend="reference")
    if name == "int_gemm":
        return ops.int_gemm(n["x"], n["w"], x_zero_point=n["x_zero_point"], w_zero_point=n["w_zero_point"],
                            bias=n["bias"], w_format=n["w_format"], out_dtype=n["out_dtype"], multiplier=n["multiplier"],
                            shift=n["shift"], out_zero_point=n["out_zero_point"], out_scale=n["out_scale"], **r)
    if name == "split_gemm":
        keys = ("x1_zero_point", "x2_zero_point", "w1_zero_point", "w2_zero_point", "bias", "w1_format", "w2_format",
                "out_dtype", "multiplier1", "multiplier2", "shift", "out_zero_point", "out_scale1", "out_scale2")
        return ops.split_gemm(n["x1"], n["w1"], n["x2"], n["w2"], **{k: n[k] for k in keys}, **r)
    if name == "int_conv2d":
        keys = ("stride", "padding", "dilation", "groups", "x_zero_point", "w_zero_point", "bias", "w_format",
                "kernel_size", "out_dtype", "multiplier", "shift", "out_zero_point", "out_scale")
        return ops.int_conv2d(n["x"], n["w"], **{k: n[k] for k in keys}, **r)
    if name == "split_conv2d":
        keys = ("stride", "padding", "dilation", "x1_zero_point", "x2_zero_point", "w1_zero_point", "w2_zero_point",
                "bias", "w1_format", "w2_format", "kernel_size", "out_dtype", "multiplier1", "multiplier2", "shift",
                "out_zero_point", "out_scale1", "out_scale2")
        return ops.split_conv2d(n["x1"], n["w1"], n["x2"], n["w2"], **{k: n[k] for k in keys}, **r)
    if name == "requantize":
        return ops.requantize(n["acc"], n["multiplier"], n["shift"], n["zero_point"], n["out_dtype"], axis=1, **r)
    if name == "log2_attn_matmul":
        return ops.log2_attn_matmul(n["codes"], n["v"], v_zero_point=n["v_zero_point"], bits=n["bits"],
                                    mode={1: "log2", 2: "sqrt2"}[n["k"]], frac_bits=n["frac_bits"],
                                    out_dtype=n["out_dtype"], multiplier=n["multiplier"], shift=n["shift"],
                                    out_zero_point=n["out_zero_point"], out_scale=n["out_scale"], **r)
    raise KeyError(name)


def describe(name, kw) -> str:
    def one(v):
        if isinstance(v, np.ndarray):
            return (f"ndarray(shape={v.shape}, dtype={v.dtype}, strides={v.strides}, C={v.flags.c_contiguous}, "
                    f"aligned={v.flags.aligned})")
        r = repr(v)
        return r if len(r) < 80 else r[:77] + "..."
    return f"{name}(" + ", ".join(f"{k}={one(v)}" for k, v in kw.items()) + ")"


class Watchdog:
    """Ends the process when one call runs longer than HANG_SECONDS: writes the case to stderr and to
    <tmp>/pyqsim-fuzz-hang-<pid>.txt (pytest's fd capture discards stderr on exit; run with -s to see it),
    then faulthandler dumps every stack and exits even if the hung call holds the GIL."""

    def __init__(self):
        import tempfile
        self.case, self.deadline = None, None
        self.lock = threading.Lock()
        self.path = os.path.join(tempfile.gettempdir(), f"pyqsim-fuzz-hang-{os.getpid()}.txt")
        self.err = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
        t = threading.Thread(target=self._run, daemon=True)
        t.start()

    def arm(self, case):
        with self.lock:
            self.case, self.deadline = case, time.monotonic() + HANG_SECONDS
        faulthandler.dump_traceback_later(HANG_SECONDS + 5, exit=True, file=self.err)

    def disarm(self):
        faulthandler.cancel_dump_traceback_later()
        with self.lock:
            self.deadline = None

    def _run(self):
        while True:
            time.sleep(0.5)
            with self.lock:
                late = self.deadline is not None and time.monotonic() > self.deadline
                case = self.case
            if late:
                msg = f"\nFUZZ HANG (> {HANG_SECONDS} s): {case}\n"
                with open(self.path, "w") as f:
                    f.write(msg)
                self.err.write(msg + f"(also in {self.path})\n")
                self.err.flush()
                faulthandler.dump_traceback(file=self.err, all_threads=True)
                os._exit(70)


WATCHDOG = None


def check_call(name, kw):
    """The property for one call."""
    global WATCHDOG
    if WATCHDOG is None:
        WATCHDOG = Watchdog()
    hog = resource_hog(name, kw) or ("output" if too_big_output(name, kw) else None)
    if hog:
        STATS[f"not generated: huge valid {hog}"] += 1
    assume(hog is None)
    WATCHDOG.arm(describe(name, kw))
    try:
        got = getattr(_C(), name)(**kw)
    except OK_ERRORS as e:
        STATS[f"raised {type(e).__name__}"] += 1
        return
    except BaseException as e:
        raise AssertionError(f"{type(e).__name__} (not TypeError/ValueError/MemoryError): {e}\n{describe(name, kw)}") from e
    finally:
        WATCHDOG.disarm()
    STATS["returned"] += 1
    if name.startswith("pack_"):
        _check_packed(name, kw, got)
        return
    ks, g = _pair(kw.get("kernel_size")), _int(kw.get("groups"))
    if (ks and ks[0] * ks[1] > 4096) or (g is not None and g > 4096):
        STATS["reference skipped (python loops too long)"] += 1  # the reference loops over taps and groups
        return
    try:
        ref = reference(name, kw)
    except OK_ERRORS as e:
        raise AssertionError(f"the binding accepted what the op layer rejects ({type(e).__name__}: {e}):\n"
                             f"{describe(name, kw)}") from e
    assert got.dtype == ref.dtype and got.shape == ref.shape, (got.dtype, got.shape, ref.dtype, ref.shape)
    assert got.tobytes() == ref.tobytes(), f"result differs from the reference:\n{describe(name, kw)}"
    STATS["equal to reference"] += 1


def _check_packed(name, kw, pw):
    """A packed weight reports what was packed and computes like the plain weight."""
    w, fmt = np.asarray(kw["w"]), _norm(kw["w_format"])
    assert pw.w_format == fmt and pw.n == w.shape[0]
    if name == "pack_gemm_weight":
        k = pw.k
        assert k == int(kw["k"]) and pw.kind == "gemm"
        if w.size == 0 or pw.n > 64:
            return
        x = np.random.default_rng(k).integers(0, 256, (3, k), dtype=np.uint8)
        zw = np.zeros(pw.n, np.int32)
        got = _C().int_gemm(x, pw, fmt, 5, zw, None, "int32", None, None, 0, None)
        ref = ops.int_gemm(x, np.ascontiguousarray(w), x_zero_point=5, w_format=fmt, backend="reference")
        assert got.tobytes() == ref.tobytes()
        STATS["equal to reference"] += 1
    else:
        assert pw.kind == "conv" and pw.groups == int(kw["groups"]) and pw.cin_per_group == int(kw["cin_per_group"])


# --------------------------------------------------------------------------------------------- the run


def _batch(seed_value: int):
    @seed(seed_value)
    @settings(max_examples=BATCH, derandomize=False, database=None, deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(case=hostile_call())
    def run(case):
        STATS["examples"] += 1
        check_call(*case)
    return run


def test_fuzz_bindings_with_hostile_arguments():
    """Runs Hypothesis batches over all kernel and packing bindings for PYQSIM_FUZZ_SECONDS."""
    STATS.clear()
    t0 = time.monotonic()
    batches = 0
    while True:
        _batch(SEED0 + batches)()
        batches += 1
        if time.monotonic() - t0 >= BUDGET:
            break
    took = time.monotonic() - t0
    summary = ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()) if not k.startswith("mutation:"))
    print(f"\nfuzz: {took:.1f} s, {batches} batches from seed {SEED0}, {summary}")
    assert STATS["examples"] > 0 and STATS["returned"] > 0 and STATS["raised ValueError"] > 0


def test_fuzz_watchdog_and_filters():
    """The guards of the run itself: valid requests that would really allocate gigabytes are not generated;
    larger ones (which must fail) and small ones are."""
    assert resource_hog("pack_gemm_weight", dict(w=np.zeros((2**31 + 1, 0), np.int8), w_format="int8", k=0))
    assert not resource_hog("pack_gemm_weight", dict(w=np.zeros((2**40, 0), np.int8), w_format="int8", k=0))
    assert not resource_hog("int_gemm", dict(x=np.zeros((2, 3), np.int8), w=np.zeros((4, 3), np.int8)))
    assert too_big_output("int_gemm", dict(x=np.zeros((2**31 + 1, 0), np.int8), w=np.zeros((1, 0), np.int8)))
    assert not too_big_output("int_gemm", dict(x=np.zeros((2**40, 0), np.int8), w=np.zeros((2**10, 0), np.int8)))
