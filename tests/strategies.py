"""Hypothesis strategies drawing op arguments (data included), shared by the reference and backend tests.

Each strategy returns a dict of keyword arguments accepted by the same-named op in ``pyqsim.ops``.
Values are biased toward the edges: type extremes, zero-size dimensions and tile tails.
"""
from __future__ import annotations

import numpy as np
from hypothesis import example, strategies as st
from hypothesis.extra import numpy as hnp

from pyqsim import _checks as C
from pyqsim.reference import pack_int4, quantize_multiplier

TAILS = [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 65]
ACT_TYPES = ["int8", "uint8"]
F32_MIN_SCALE = float(np.float32(1e-6))


def dims(max_value: int = 70, tails=TAILS):
    """A dimension: usually a tile tail, otherwise any small size."""
    return st.one_of(st.sampled_from([t for t in tails if t <= max_value]), st.integers(0, max_value))


def lead_shapes(max_dims: int = 3, max_size: int = 3):
    """Leading (batch) dimensions: 0..max_dims of them, sizes including 0 and 1."""
    return st.lists(st.integers(0, max_size), min_size=0, max_size=max_dims).map(tuple)


def codes(dtype: str, shape, fill=None):
    """An array of codes of ``dtype`` (int4/uint4 in their containers), with constant fills among the draws."""
    lo, hi = C.RANGES[dtype]
    dt = C.CONTAINERS[dtype]
    elements = st.integers(lo, hi)
    const = st.sampled_from([lo, hi, 0 if lo <= 0 else lo]).map(lambda v: np.full(shape, v, dt))
    return st.one_of(hnp.arrays(dt, shape, elements=elements), const)


@st.composite
def zero_points(draw, dtype: str, n: int | None = None):
    lo, hi = C.RANGES[dtype]
    z = st.one_of(st.sampled_from([lo, hi, 0 if lo <= 0 else lo]), st.integers(lo, hi))
    if n is None:
        return draw(z)
    if draw(st.booleans()):
        return draw(z)
    return np.array(draw(st.lists(z, min_size=n, max_size=n)), np.int32)


# Shifts where the §6 arithmetic changes: the ends of [1, 94], the int32 form of §10.4 (S in [33, 62]) and the
# "S > 62 gives zy" rule; every op's property tests carry @examples at each (at_shift_edges).
SHIFT_EDGES = (1, 31, 32, 62, 63, 94)
MULTIPLIER_EDGES = (0, 1, 2**30, 2**31 - 1)


def shifts():
    return st.one_of(st.sampled_from(SHIFT_EDGES), st.integers(C.SHIFT_MIN, C.SHIFT_MAX))


def multipliers():
    return st.one_of(st.sampled_from(MULTIPLIER_EDGES), st.integers(2**30, 2**31 - 1), st.integers(0, 2**31 - 1))


@st.composite
def fixed_point(draw, shape, reals=None, count: int = 1):
    """``count`` multipliers and one shift of ``shape``, drawn over the whole accepted range (M0 in [0, 2^31 - 1],
    S in [1, 94]), or, half the time when ``reals`` is given, quantize_multiplier of a real scale drawn from it
    (typical scales: mostly in-range outputs)."""
    if reals is not None and draw(st.booleans()):
        m, s = quantize_multiplier(draw(hnp.arrays(np.float64, shape, elements=reals)))
        return [m], s
    ms = [draw(hnp.arrays(np.int32, shape, elements=multipliers())) for _ in range(count)]
    return ms, draw(hnp.arrays(np.int32, shape, elements=shifts()))


REALS = st.floats(2.0**-30, 2.0**-2, allow_nan=False, allow_infinity=False)


@st.composite
def out_stage(draw, n: int, allowed=("int32", "int8", "uint8", "int4", "uint4", "float32")):
    kind = draw(st.sampled_from(allowed))
    kw = {"out_dtype": kind}
    if kind in C.REQUANT_OUT:
        shape = (n,) if draw(st.booleans()) else ()
        (m,), s = draw(fixed_point(shape, REALS))
        kw.update(multiplier=m, shift=s, out_zero_point=draw(zero_points(kind)))
    elif kind == "float32":
        kw["out_scale"] = draw(hnp.arrays(np.float32, (n,), elements=st.floats(F32_MIN_SCALE, 10.0, width=32)))
    return kw


def _bias_for(draw, n, budget):
    """An int32 bias within what the overflow precondition leaves (``budget``)."""
    if not draw(st.booleans()) or budget <= 0:
        return None
    lim = min(budget, 2**31 - 1)
    return draw(hnp.arrays(np.int32, (n,), elements=st.integers(-lim, lim)))


def _weights(draw, fmt, n, k):
    w = draw(codes(fmt, (n, k)))
    return (w if fmt == "int8" else pack_int4(w, fmt == "int4")), w


@st.composite
def gemm_cases(draw, max_dim: int = 70, formats=("int8", "int4", "uint4")):
    m, n, k = draw(dims(max_dim)), draw(dims(max_dim)), draw(dims(max_dim))
    xt = draw(st.sampled_from(ACT_TYPES))
    fmt = draw(st.sampled_from(formats))
    x = draw(codes(xt, (m, k)))
    w, _ = _weights(draw, fmt, n, k)
    zx = draw(zero_points(xt))
    zw = draw(zero_points(fmt, n))
    zwv = np.broadcast_to(np.asarray(zw, np.int64), (n,))
    used = C.overflow_term(k, xt, zx, fmt, zwv.astype(np.int32))
    kw = dict(x=x, w=w, x_zero_point=zx, w_zero_point=zw, w_format=fmt,
              bias=_bias_for(draw, n, 2**31 - 1 - used))
    kw.update(draw(out_stage(n)))
    return kw


@st.composite
def bmm_cases(draw, max_dim: int = 40, lead=lead_shapes()):
    """int_bmm kwargs: a [..., M, K] and b [..., N, K] activations of either type, any zero points."""
    lead = draw(lead)
    m, n, k = draw(dims(max_dim)), draw(dims(max_dim)), draw(dims(max_dim))
    at, bt = draw(st.sampled_from(ACT_TYPES)), draw(st.sampled_from(ACT_TYPES))
    kw = dict(a=draw(codes(at, (*lead, m, k))), b=draw(codes(bt, (*lead, n, k))), a_zero_point=draw(zero_points(at)),
              b_zero_point=draw(zero_points(bt)))
    kw.update(draw(out_stage(n)))
    return kw


@st.composite
def conv_cases(draw, formats=("int8", "int4", "uint4")):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg = draw(st.integers(1, 4))
    og = draw(st.integers(0, 4))
    b = draw(st.integers(0, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 9))
    wd = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 9))
    xt = draw(st.sampled_from(ACT_TYPES))
    fmt = draw(st.sampled_from(formats))
    c, o = cg * groups, og * groups
    x = draw(codes(xt, (b, c, h, wd)))
    wcodes = draw(codes(fmt, (o, cg, kh, kw)))
    w = wcodes if fmt == "int8" else pack_int4(wcodes.reshape(o, cg * kh * kw), fmt == "int4")
    zx = draw(zero_points(xt))
    zw = draw(zero_points(fmt, o))
    kwargs = dict(x=x, w=w, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups,
                  x_zero_point=zx, w_zero_point=zw, w_format=fmt, kernel_size=(kh, kw),
                  bias=_bias_for(draw, o, 2**20))
    kwargs.update(draw(out_stage(o)))
    return kwargs


@st.composite
def split_gemm_cases(draw, max_dim: int = 40, n=None):
    """split_gemm kwargs; ``n`` draws the output channels (default: up to max_dim)."""
    m, n = draw(dims(max_dim)), draw(dims(max_dim) if n is None else n)
    kw = {}
    for i in ("1", "2"):
        k = draw(dims(max_dim))
        xt = draw(st.sampled_from(ACT_TYPES))
        fmt = draw(st.sampled_from(["int8", "int4", "uint4"]))
        kw[f"x{i}"] = draw(codes(xt, (m, k)))
        kw[f"w{i}"], _ = _weights(draw, fmt, n, k)
        kw[f"x{i}_zero_point"] = draw(zero_points(xt))
        kw[f"w{i}_zero_point"] = draw(zero_points(fmt, n))
        kw[f"w{i}_format"] = fmt
    kw["bias"] = _bias_for(draw, n, 2**20)
    kw.update(draw(split_out_stage(n)))
    return kw


@st.composite
def split_out_stage(draw, n: int):
    from pyqsim.reference import quantize_multiplier_pair
    kind = draw(st.sampled_from(["int8", "uint8", "int4", "uint4", "float32"]))
    kw = {"out_dtype": kind}
    if kind == "float32":
        for i in ("1", "2"):
            kw[f"out_scale{i}"] = draw(hnp.arrays(np.float32, (n,), elements=st.floats(F32_MIN_SCALE, 10.0, width=32)))
        return kw
    if draw(st.booleans()):
        r1 = draw(hnp.arrays(np.float64, (n,), elements=REALS))
        r2 = draw(hnp.arrays(np.float64, (n,), elements=REALS))
        m1, m2, s = quantize_multiplier_pair(r1, r2)
    else:
        (m1, m2), s = draw(fixed_point((n,) if draw(st.booleans()) else (), count=2))
    kw.update(multiplier1=m1, multiplier2=m2, shift=s, out_zero_point=draw(zero_points(kind)))
    return kw


@st.composite
def split_conv_cases(draw, o=st.integers(0, 5)):
    """split_conv2d kwargs; ``o`` draws the output channels."""
    b = draw(st.integers(0, 2))
    o = draw(o)
    kh, kw_ = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    stride = draw(st.integers(1, 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 7))
    w = draw(st.integers(max(1, kw_ - 2 * pw), 7))
    kw = dict(stride=stride, padding=(ph, pw), kernel_size=(kh, kw_))
    for i in ("1", "2"):
        c = draw(st.integers(1, 4))
        xt = draw(st.sampled_from(ACT_TYPES))
        fmt = draw(st.sampled_from(["int8", "int4", "uint4"]))
        kw[f"x{i}"] = draw(codes(xt, (b, c, h, w)))
        wc = draw(codes(fmt, (o, c, kh, kw_)))
        kw[f"w{i}"] = wc if fmt == "int8" else pack_int4(wc.reshape(o, c * kh * kw_), fmt == "int4")
        kw[f"x{i}_zero_point"] = draw(zero_points(xt))
        kw[f"w{i}_zero_point"] = draw(zero_points(fmt, o))
        kw[f"w{i}_format"] = fmt
    kw["bias"] = _bias_for(draw, o, 2**20)
    kw.update(draw(split_out_stage(o)))
    return kw


@st.composite
def log2_cases(draw, max_dim: int = 40, lead=st.just(())):
    """log2_attn_matmul kwargs; ``lead`` draws the leading dimensions shared by codes and v."""
    bits = draw(st.integers(2, 8))
    mode = draw(st.sampled_from(["log2", "sqrt2"]))
    frac_bits = draw(st.sampled_from([16, 16, 0, 4, 8, 24]))
    lead = draw(lead)
    m, length, n = draw(dims(max_dim)), draw(dims(max_dim)), draw(dims(max_dim))
    vt = draw(st.sampled_from(ACT_TYPES))
    zero_code = 2**bits - 1
    cshape = (*lead, m, length)
    cd = draw(st.one_of(hnp.arrays(np.uint8, cshape, elements=st.integers(0, zero_code)),
                        st.sampled_from([0, zero_code, zero_code - 1]).map(lambda c: np.full(cshape, c, np.uint8))))
    v = draw(codes(vt, (*lead, length, n)))
    kw = dict(codes=cd, v=v, v_zero_point=draw(zero_points(vt)), bits=bits, mode=mode, frac_bits=frac_bits)
    kind = draw(st.sampled_from(["int64", "int8", "uint8", "int4", "uint4", "float32"]))
    kw["out_dtype"] = kind
    if kind in C.REQUANT_OUT:
        (mm,), s = draw(fixed_point((n,), st.floats(2.0**-60, 2.0**-20)))
        kw.update(multiplier=mm, shift=s, out_zero_point=draw(zero_points(kind)))
    elif kind == "float32":
        kw["out_scale"] = draw(hnp.arrays(np.float32, (n,), elements=st.floats(float(np.float32(1e-12)), float(np.float32(1e-3)), width=32)))
    return kw


@st.composite
def requant_cases(draw):
    shape = tuple(draw(st.lists(dims(9, [0, 1, 3, 8, 9]), min_size=1, max_size=3)))
    acc = draw(hnp.arrays(np.int32, shape, elements=st.one_of(st.integers(-(2**31), 2**31 - 1),
                                                                 st.sampled_from([-(2**31), 2**31 - 1, 0, -1, 1]))))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    kind = draw(st.sampled_from(list(C.REQUANT_OUT)))
    per_channel = draw(st.booleans())
    msize = (n,) if per_channel else ()
    mult = draw(hnp.arrays(np.int32, msize, elements=multipliers()))
    shift = draw(hnp.arrays(np.int32, msize, elements=shifts()))
    return dict(acc=acc, multiplier=mult, shift=shift, zero_point=draw(zero_points(kind)), out_dtype=kind, axis=axis)


def log2_deep_cases(bits: int, mode: str, frac_bits: int, m: int = 13, length: int = 40, n: int = 19):
    """Fixed log2_attn_matmul kwargs (one per output type) with the deepest codes, the zero code, code 0
    and V at its extremes: the shared edge set of the CPU and CUDA suites."""
    rng = np.random.default_rng(bits * 31 + frac_bits)
    z = 2**bits - 1
    codes = rng.integers(0, z + 1, (m, length), dtype=np.uint8)
    codes[0] = z
    codes[1] = z - 1
    codes[2] = 0
    v = rng.integers(0, 256, (length, n), dtype=np.uint8)
    v[:, 0] = 255
    v[:, 1] = 0
    for out in ("int64", "float32", "int8", "uint4"):
        kw = dict(codes=codes, v=v, v_zero_point=255, bits=bits, mode=mode, frac_bits=frac_bits, out_dtype=out)
        if out == "float32":
            kw["out_scale"] = np.full(n, 2.0**-20, np.float32)
        elif out != "int64":
            m0, s0 = quantize_multiplier(rng.uniform(2.0**-60, 2.0**-20, n))
            kw.update(multiplier=m0, shift=s0, out_zero_point=1)
        yield kw


def max_k(xt: str, zx: int, fmt: str, zw: int) -> int:
    """The largest K that spec §4.1 admits for these types and zero points (no bias), stated independently of
    pyqsim._checks so that tests of its K limit are not circular."""
    xlo, xhi = C.RANGES[xt]
    wlo, whi = C.RANGES[fmt]
    a = max(abs(xlo - zx), abs(xhi - zx))
    b = max(abs(wlo - zw), abs(whi - zw))
    return (2**31 - 1) // (a * b)


# ------------------------------------------------------------------------------------------ shift edges


def _edge_base(op: str, rng, n: int) -> tuple[dict, int]:
    """Fixed arguments of ``op`` with ``n`` output channels, and log2 of a typical |accumulator| (so that a
    multiplier 2^(S - bits) gives outputs of a few codes)."""
    def act(shape, xt):
        lo, hi = C.RANGES[xt]
        return rng.integers(lo, hi + 1, shape, dtype=C.CONTAINERS[xt])

    def wts(fmt, shape):
        lo, hi = C.RANGES[fmt]
        w = rng.integers(lo, hi + 1, shape).astype(C.CONTAINERS[fmt])
        return w if fmt == "int8" else pack_int4(w.reshape(shape[0], -1), fmt == "int4")

    bias = rng.integers(-3000, 3000, n, dtype=np.int32)
    if op == "int_gemm":
        return dict(x=act((5, 9), "uint8"), w=wts("int8", (n, 9)), w_format="int8", x_zero_point=3,
                    w_zero_point=rng.integers(-5, 5, n, dtype=np.int32), bias=bias), 14
    if op == "int_conv2d":
        return dict(x=act((1, 3, 4, 5), "int8"), w=wts("int4", (n, 3, 3, 3)), w_format="int4", kernel_size=(3, 3),
                    stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, x_zero_point=-7, w_zero_point=-1,
                    bias=bias), 12
    if op == "split_gemm":
        return dict(x1=act((4, 7), "uint8"), w1=wts("int8", (n, 7)), x2=act((4, 6), "int8"), w2=wts("uint4", (n, 6)),
                    w1_format="int8", w2_format="uint4", x1_zero_point=250, x2_zero_point=-3, w1_zero_point=2,
                    w2_zero_point=rng.integers(0, 16, n, dtype=np.int32), bias=bias), 14
    if op == "split_conv2d":
        return dict(x1=act((1, 2, 4, 4), "int8"), w1=wts("int4", (n, 2, 2, 2)), x2=act((1, 3, 4, 4), "uint8"),
                    w2=wts("int8", (n, 3, 2, 2)), w1_format="int4", w2_format="int8", kernel_size=(2, 2), stride=1,
                    padding=(1, 1), x1_zero_point=5, x2_zero_point=9, w1_zero_point=3,
                    w2_zero_point=-2, bias=bias), 14
    if op == "log2_attn_matmul":
        codes = rng.integers(0, 16, (4, 8), dtype=np.uint8)
        return dict(codes=codes, v=act((8, n), "uint8"), v_zero_point=131, bits=4, mode="sqrt2", frac_bits=16), 38
    if op == "requantize":
        acc = rng.integers(-(2**31), 2**31, (3, n), dtype=np.int64).astype(np.int32)
        acc[0, :2] = [-(2**31), 2**31 - 1]
        return dict(acc=acc, zero_point=1, axis=1), 28
    raise ValueError(op)


def shift_edge_cases(op: str) -> list[dict]:
    """Fixed kwargs of ``op`` with shifts at SHIFT_EDGES: for each edge one case with every channel at that shift
    (the CPU and CUDA kernels choose their epilogue per call, from all the shifts), and one case with all the
    edges across channels. Channels alternate a largest multiplier and one giving outputs of a few codes."""
    rng = np.random.default_rng(sum(map(ord, op)))
    n = 2 * len(SHIFT_EDGES)
    base, bits = _edge_base(op, rng, n)
    zp_key = "zero_point" if op == "requantize" else "out_zero_point"
    cases = []
    for edge in SHIFT_EDGES + (None,):
        shift = np.repeat(SHIFT_EDGES, 2) if edge is None else np.full(n, edge)
        small = np.array([min(2**31 - 1, 2 ** max(int(s) - bits, 0)) for s in shift])
        big = np.full(n, 2**31 - 1)
        alt = np.where(np.arange(n) % 2 == 0, big, small).astype(np.int32)
        out = "int8" if edge is not None else "uint4"
        kw = dict(base, out_dtype=out, shift=shift.astype(np.int32))
        kw[zp_key] = C.RANGES[out][0] + 2
        if op.startswith("split"):
            kw.update(multiplier1=alt, multiplier2=np.where(np.arange(n) % 2 == 0, small, big).astype(np.int32))
        else:
            kw["multiplier"] = alt
        cases.append(kw)
    return cases


def at_shift_edges(op: str, name: str | None = "kw"):
    """Decorator: one Hypothesis @example per shift_edge_cases(op) (keyword ``name``, or positional if None)."""
    def deco(test):
        for kw in shift_edge_cases(op):
            test = (example(kw) if name is None else example(**{name: kw}))(test)
        return test
    return deco


# --------------------------------------------------------------------------- float32 data (spec §15 stages)

FLOAT_EDGES = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38,
               88.72284, -103.97, 1.0, -1.0]


@st.composite
def float32_arrays(draw, shape, finite=None):
    """float32 data over the whole range or a realistic spread, NaN / inf / subnormal edges mixed in or not
    (``finite`` fixes that choice)."""
    nonfinite = draw(st.booleans()) if finite is None else not finite
    width = draw(st.sampled_from([None, 1.0, 100.0]))  # whole range, or a realistic spread
    if width is None:
        elems = st.floats(width=32, allow_nan=nonfinite, allow_infinity=nonfinite)
    else:
        elems = st.floats(-width, width, width=32) | (st.sampled_from(FLOAT_EDGES) if nonfinite else st.nothing())
    return draw(hnp.arrays(np.float32, shape, elements=elems))
