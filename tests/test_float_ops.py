"""Float stages (spec §15) and native quantize (§2, §3): CPU == reference bit for bit, and accuracy against binary64.

Bit equality: outputs are compared as uint32 bit patterns (NaN, infinities and -0.0 included), on the scalar
and the AVX2 path, with Hypothesis drawing values over the whole float32 range (subnormals, +-FLT_MAX, +-inf,
NaN, -0.0) and fully or partly masked (-inf) softmax rows.

Tolerance policy for the accuracy tests (u = 2^-24, the float32 unit roundoff; ``tiny`` = 2^-149). The
exact value Y is computed in binary64 from the same float32 inputs; each bound adds up the roundings of §15:

- exp (§15.2): range reduction loses nothing measurable (LN2_HI * n is exact, |LN2_HI + LN2_LO - ln 2| < 2^-38,
  |n| <= 150), the degree-7 Taylor tail is below 0.35^8 / 8! < 0.1 ulp, Horner without FMA adds at most about
  one ulp near 1, and scaling by 2^n1 * 2^n2 is exact for normal results. Bound: 2 ulp of e^x for normal
  results (measured 1.22), ``tiny`` for subnormal ones (one rounding of p * 2^n at the subnormal spacing).
- softmax (§15.5), element i of a row of length C with d_i = x_i - max and D = min(max_j |d_j|, 104):
  d_i is rounded (relative error u, so e^d_i gains u |d_i|), exp adds 2 ulp (<= 4u), the sum S of §15.1 adds
  (ceil(C/32) + 5) u and inherits the largest term error (D + 4) u, the division u:
  |y - Y| <= (|d_i| + D + ceil(C/32) + 16) u Y + 2^-147 (subnormal e_i). Measured at most 0.45 of it.
- layer_norm (§15.6) without weight, rows of length C: the mean's error |mean - mu| <= (C/32 + 7) u mean|x|
  shifts every d_i; var's relative error (C/32 + 8) u halves under sqrt; rstd and the products add 4u:
  |y - Y| <= (C/64 + 8) u |Y| + (C/32 + 7) u rstd mean|x|. Measured at most 0.33 of it.
- gelu erf form (§15.3-4): the exp argument q = P - x^2/2 is rounded twice (x^2 and q, |q| <= x^2/2 + 1.3,
  together about u x^2 / 2 relative after exp), the fitted P is within 1.6u, exp 2 ulp, t = 1/(1 + u/2) two
  roundings amplified by at most 2, three final products: |y - Y| <= (8 + x^2) u |Y| + (4|x| + 2) tiny.
- gelu tanh form and SiLU: y = x / (1 + e^w) with w = -2z (tanh form) or -x (SiLU). w carries a relative
  error up to 4u (tanh form: two rounded constants, four rounded operations; SiLU: none), which e^w turns into
  an absolute exponent error 4u|w|, damped by e^w / (1 + e^w) <= 1; exp adds 2 ulp, the sum and division 2u:
  |y - Y| <= (4 min(|w|, 110) + 8) u |Y| + A (tanh form; |w| stops mattering past exp's clamp) and
  (min(|x|, 110) + 8) u |Y| + A (SiLU), with A = tiny + |x| 2^-127: where e^w overflows float32 (w > 88.72)
  the result is a signed zero although |Y| = |x| / (1 + e^w) can still be up to |x| e^-88.72 < |x| 2^-127.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import strategies as S
from pyqsim import ops
from pyqsim.reference import floatops as RF
from test_cpu_ops import ISAS, isa  # noqa: F401  (the per-test ISA fixture)

pytestmark = pytest.mark.needs_cpu_ext

U = 2.0**-24
TINY = 2.0**-149
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large])
F32 = np.float32
EDGE = S.FLOAT_EDGES


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def same(op: str, *args, **kw):
    ref = getattr(ops, op)(*args, **kw, backend="reference")
    got = getattr(ops, op)(*args, **kw, backend="cpu")
    assert bits_equal(got, ref), (op, got, ref)
    assert got.flags.c_contiguous
    return got


# --------------------------------------------------------------------------- strategies


@st.composite
def float_arrays(draw, min_dims=1, max_dims=3, max_side=40, min_last=0, finite=None):
    """float32 arrays over the whole range: sometimes only finite values, sometimes with NaN / inf mixed in."""
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=max_side))
    if shape and shape[-1] < min_last:
        shape = shape[:-1] + (min_last,)
    return draw(S.float32_arrays(shape, finite))


@st.composite
def masked_rows(draw):
    """Attention-score rows with some (or all) entries masked to -inf."""
    rows = draw(st.integers(1, 6))
    c = draw(st.integers(1, 70))
    x = draw(hnp.arrays(np.float32, (rows, c), elements=st.floats(-1e4, 1e4, width=32)))
    mask = draw(hnp.arrays(np.bool_, (rows, c)))
    x[mask] = -np.inf
    return x


def _vec(draw, c, finite=True):
    return draw(hnp.arrays(np.float32, (c,), elements=st.floats(width=32, allow_nan=not finite,
                                                                 allow_infinity=not finite)))


# --------------------------------------------------------------------------- bit equality, reference vs cpu


@FIXTURE_OK
@given(x=float_arrays())
@example(x=np.full((2, 33), -np.inf, F32))
@example(x=np.array([[np.nan, 1.0], [np.inf, 1.0], [-np.inf, 0.0]], F32))
@example(x=np.array([EDGE], F32))
@example(x=np.zeros((3, 0), F32))
@example(x=np.array([[1e-45, -0.0, 0.0, 3e38, -3e38]], F32))
def test_softmax_bits(isa, x):
    same("softmax", x)


@FIXTURE_OK
@given(x=masked_rows())
@example(x=np.full((1, 197), -np.inf, F32))
def test_softmax_masked_bits(isa, x):
    y = same("softmax", x)
    full = np.all(np.isneginf(x), axis=-1)
    assert np.all(y[full].view(np.uint32) == 0)  # fully masked rows are +0.0
    assert np.all(y[np.isneginf(x)].view(np.uint32) == 0)


@FIXTURE_OK
@given(data=st.data(), x=float_arrays(min_last=1), affine=st.booleans(), eps=st.sampled_from([1e-5, 0.0, 1e-12, 1.0]))
@example(data=None, x=np.zeros((2, 1), F32), affine=False, eps=0.0)
@example(data=None, x=np.array([[3e38, -3e38, 1.0]], F32), affine=False, eps=1e-5)
def test_layer_norm_bits(isa, data, x, affine, eps):
    c = x.shape[-1]
    w = b = None
    if affine and data is not None:
        w, b = _vec(data.draw, c, False), _vec(data.draw, c, False)
    same("layer_norm", x, w, b, eps)


@st.composite
def group_inputs(draw):
    n = draw(st.integers(0, 3))
    groups = draw(st.integers(1, 4))
    c = groups * draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(0 if n else 1, 9), max_size=2))
    finite = draw(st.booleans())
    elems = st.floats(width=32, allow_nan=not finite, allow_infinity=not finite) if draw(st.booleans()) \
        else st.floats(-50, 50, width=32)
    x = draw(hnp.arrays(np.float32, (n, c, *spatial), elements=elems))
    return x, groups


@FIXTURE_OK
@given(data=st.data(), xg=group_inputs(), affine=st.booleans())
@example(data=None, xg=(np.ones((1, 4), F32), 2), affine=False)
@example(data=None, xg=(np.zeros((2, 6, 0), F32), 3), affine=False)
def test_group_norm_bits(isa, data, xg, affine):
    x, groups = xg
    w = b = None
    if affine and data is not None:
        w, b = _vec(data.draw, x.shape[1], False), _vec(data.draw, x.shape[1], False)
    same("group_norm", x, groups, w, b)


@FIXTURE_OK
@given(x=float_arrays(min_dims=0, max_dims=3))
@example(x=np.array(EDGE, F32))
@example(x=np.array(-1.5, F32))
@example(x=np.linspace(-20, 20, 101).astype(F32))
def test_elementwise_bits(isa, x):
    same("gelu", x)
    same("gelu", x, "tanh")
    same("silu", x)


@st.composite
def add_operands(draw):
    """Two float32 operands (whole range, NaN and inf included) of broadcastable shapes: b a block of a's axes, a
    scattered broadcast, a scalar, or a itself the broadcast operand."""
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9))
    a = draw(S.float32_arrays(shape))
    b_shape = draw(hnp.broadcastable_shapes(shape, min_dims=0, max_dims=len(shape), min_side=0))
    b = draw(S.float32_arrays(b_shape))
    return (b, a) if draw(st.booleans()) else (a, b)


@FIXTURE_OK
@given(ab=add_operands())
@example(ab=(np.array([np.inf, -np.inf, np.nan, 3e38, -0.0, TINY], F32),
             np.array([-np.inf, -np.inf, 1.0, 3e38, -0.0, -TINY], F32)))
@example(ab=(np.arange(2 * 3 * 35, dtype=F32).reshape(2, 3, 35), np.array([[0.5], [-0.0], [np.nan]], F32)))
@example(ab=(np.ones((1, 70001), F32), np.float32(2.0**-24)))
@example(ab=(np.zeros((0, 4), F32), np.ones(4, F32)))
def test_add_bits(isa, ab):
    """§15.8: one correctly rounded addition per element (NumPy's bits), NaN results 0x7FC00000, either order."""
    a, b = ab
    got = same("add", a, b)
    assert bits_equal(got, same("add", b, a))
    with np.errstate(invalid="ignore", over="ignore"):
        want = np.asarray(np.asarray(a) + np.asarray(b), F32)
    assert bits_equal(got, np.where(want != want, RF.NAN, want))


@st.composite
def codes_specs(draw, log):
    """Codes of a stage's result (§15.9) over the whole accepted range: uniform (scale, zero point, bits) or log."""
    bits = draw(st.integers(2, 8))
    if log:
        return {"delta": draw(st.floats(TINY, float(np.finfo(F32).max), width=32) | st.floats(2.0**-10, 2.0, width=32)),
                "bits": bits, "mode": draw(st.sampled_from(["log2", "sqrt2"]))}
    return {"scale": draw(st.floats(TINY, float(np.finfo(F32).max), width=32) | st.floats(2.0**-10, 10.0, width=32)),
            "zero_point": draw(st.integers(0, 2**bits - 1)), "bits": bits}


STAGES = {"gelu": lambda x, **kw: ops.gelu(x, **kw), "gelu_tanh": lambda x, **kw: ops.gelu(x, "tanh", **kw),
          "silu": lambda x, **kw: ops.silu(x, **kw), "softmax": lambda x, **kw: ops.softmax(x, **kw),
          "layer_norm": lambda x, **kw: ops.layer_norm(x, **kw),
          "group_norm": lambda x, **kw: ops.group_norm(x.reshape(1, -1, 1) if x.ndim < 2 else x, 1, **kw)}


@FIXTURE_OK
@given(data=st.data(), stage=st.sampled_from(sorted(STAGES)), x=float_arrays(min_last=1))
@example(data=None, stage="softmax", x=np.array([[0.0, -np.inf, 5.0], [np.nan, 1.0, 2.0]], F32))
@example(data=None, stage="gelu", x=np.array([[np.inf, -np.inf, 0.0]], F32))
def test_stage_codes_bits(isa, data, stage, x):
    """§15.9: a stage with ``codes`` returns exactly quantize / quantize_log of its float32 result, on every backend,
    and raises ValueError where those would (a result that is not finite, or negative for log codes)."""
    f = STAGES[stage]
    log = stage == "softmax" and (data is None or data.draw(st.booleans()))
    codes = data.draw(codes_specs(log)) if data is not None else {"delta": 0.5, "bits": 4} if log else \
        {"scale": 0.1, "zero_point": 3, "bits": 8}
    y = f(x, backend="reference")
    try:
        want = (ops.quantize_log(y, codes["delta"], codes["bits"], codes["mode"] if "mode" in codes else "sqrt2",
                                 backend="reference") if log else
                ops.quantize(y, codes["scale"], codes["zero_point"], "uint8", bits=codes["bits"], backend="reference"))
    except ValueError:
        want = None
    for backend in ("reference", "cpu"):
        if want is None:
            with pytest.raises(ValueError):
                f(x, codes=codes, backend=backend)
        else:
            got = f(x, codes=codes, backend=backend)
            assert got.dtype == np.uint8 and np.array_equal(got, want), backend


def test_threads_do_not_change_bits():
    from pyqsim.backends import cpu
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 40, 97)) * 7).astype(F32)
    g = (rng.standard_normal((4, 8, 33, 5)) * 3).astype(F32)
    big = (rng.standard_normal(70001) * 4).astype(F32)
    before = cpu.get_num_threads()
    try:
        runs = []
        for n in (1, 3):
            cpu.set_num_threads(n)
            runs.append([ops.add(big, big[::-1].copy(), backend="cpu"), ops.softmax(x, backend="cpu"),
                         ops.layer_norm(x, backend="cpu"),
                         ops.group_norm(g, 4, backend="cpu"), ops.gelu(big, backend="cpu"), ops.silu(big, backend="cpu")])
        assert all(bits_equal(a, b) for a, b in zip(*runs))
    finally:
        cpu.set_num_threads(before)


# --------------------------------------------------------------------------- quantize (§2), native == reference


@st.composite
def quantize_inputs(draw):
    dtype = draw(st.sampled_from(["int8", "uint8", "int4", "uint4"]))
    full = 8 if dtype in ("int8", "uint8") else 4
    bits = draw(st.none() | st.integers(2, full))
    from pyqsim._checks import code_range
    lo, hi = code_range(dtype, bits)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=20))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
                        | st.floats(-300, 300, width=32)))
    scales = st.floats(TINY, float(np.finfo(F32).max), width=32) | st.floats(float(F32(1e-3)), 10.0, width=32)
    axis = draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    if axis is None:
        return x, draw(scales), draw(st.integers(lo, hi)), dtype, axis, bits
    n = shape[axis]
    s = draw(hnp.arrays(np.float32, (n,), elements=scales))
    z = draw(hnp.arrays(np.int32, (n,), elements=st.integers(lo, hi)))
    return x, s, z, dtype, axis, bits


@given(args=quantize_inputs())
@example(args=(np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.4e38, -3.4e38, 1e-45], F32), 1.0, 0, "int8", None, None))
@example(args=(np.array([[127.5, -128.5]], F32), np.array([1.0], F32), np.array([0], np.int32), "int8", 0, None))
@example(args=(np.zeros((0, 3), F32), 0.1, 0, "uint4", None, None))
def test_quantize_native_equals_reference(args):
    x, s, z, dtype, axis, bits = args
    from pyqsim import _C
    for path in ISAS:
        _C.set_cpu_isa(path)
        try:
            got = ops.quantize(x, s, z, dtype, axis=axis, bits=bits, backend="cpu")
        finally:
            _C.set_cpu_isa(None)
        want = ops.quantize(x, s, z, dtype, axis=axis, bits=bits, backend="reference")
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


@st.composite
def fused_qkv(draw):
    """A fused [B, L, 3, H, D] float32 buffer (drawn data over the whole float32 range), which of q/k/v to take,
    and whether to take it as [B, L, H, D] or transposed to [B, H, L, D]."""
    b, l, h, d = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 4)), draw(st.integers(1, 40))
    base = draw(hnp.arrays(np.float32, (b, l, 3, h, d), elements=st.floats(width=32, allow_nan=False,
                                                                          allow_infinity=False)
                           | st.sampled_from([0.5, 1.5, -2.5, 1e-45, 3.4e38])))
    return base, draw(st.integers(0, 2)), draw(st.booleans())


_FUSED = np.arange(3 * 2 * 3 * 2 * 16, dtype=F32).reshape(3, 2, 3, 2, 16) - 100.5  # rows of H * D = 32 floats


@given(data=fused_qkv(), scale=st.floats(2.0**-20, 2.0**20, width=32), zp=st.integers(0, 255))
@example(data=(_FUSED, 1, False), scale=1.0, zp=7)
@example(data=(_FUSED, 2, True), scale=0.25, zp=250)
def test_quantize_row_views_read_in_place(data, scale, zp):
    """Per-tensor codes of a strided view (the native kernel reads whole rows of the buffer in place, spec §2) equal
    the reference's codes of a contiguous copy, on every ISA; values outside the view are never read."""
    from pyqsim import _C
    base, which, transposed = data
    base = base.copy()
    view = base[:, :, which].transpose(0, 2, 1, 3) if transposed else base[:, :, which]
    base[:, :, (which + 1) % 3] = np.inf  # outside the view
    want = ops.quantize(np.ascontiguousarray(view), scale, zp, "uint8", backend="reference")
    for path in ISAS:
        _C.set_cpu_isa(path)
        try:
            got = ops.quantize(view, scale, zp, "uint8", backend="cpu")
            assert got.shape == want.shape and np.array_equal(got, want)
            saved = base[0, 0, which, 0, 0]
            base[0, 0, which, 0, 0] = np.nan  # inside the view: rejected
            with pytest.raises(ValueError, match="finite"):
                ops.quantize(view, scale, zp, "uint8", backend="cpu")
            base[0, 0, which, 0, 0] = saved
        finally:
            _C.set_cpu_isa(None)


@given(p=hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=20),
                   elements=st.floats(0, float(np.finfo(F32).max), width=32)
                   | st.sampled_from([0.0, 1.0, 2.0**-0.5, 2.0**-0.25, 2.0**-0.75, TINY, 2.0**-126])),
       delta=st.floats(TINY, float(np.finfo(F32).max), width=32) | st.floats(2.0**-4, 2.0, width=32),
       bits=st.integers(2, 8), mode=st.sampled_from(["log2", "sqrt2"]))
@example(p=np.array([0.0, TINY, float(np.finfo(F32).max), 1.0, 0.7071067], F32), delta=TINY, bits=8, mode="sqrt2")
@example(p=np.array([0.0, TINY, float(np.finfo(F32).max), 1.0, 0.5946035], F32),
         delta=float(np.finfo(F32).max), bits=2, mode="log2")
@example(p=np.array([-0.0, 0.0, TINY, 3 * TINY, 2.0**-126 - TINY, 2.0**-126, 0.5, 0.70710677, 0.70710683, 0.8408964,
                     0.84089643, 0.59460354, 0.5946036, 1.0, 1e-30, 3e38], F32), delta=1.0, bits=8, mode="sqrt2")
@example(p=np.linspace(0, 1, 23).astype(F32), delta=2.0**-4, bits=4, mode="log2")
def test_quantize_log_native_equals_reference(p, delta, bits, mode):
    """§3 codes: the native loop reads frexp from the float64 bits; the reference calls np.frexp."""
    from pyqsim import _C
    want = ops.quantize_log(p, delta, bits, mode, backend="reference")
    for path in ISAS:
        _C.set_cpu_isa(path)
        try:
            got = ops.quantize_log(p, delta, bits, mode, backend="cpu")
        finally:
            _C.set_cpu_isa(None)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


# --------------------------------------------------------------------------- accuracy against binary64


def test_exp_accuracy():
    x = np.linspace(-104, 89, 2_000_001).astype(F32)
    got = RF.exp(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    normal = (want >= 2.0**-126) & (want < float(np.finfo(F32).max))
    ulp = np.spacing(want[normal].astype(F32)).astype(np.float64)
    assert np.max(np.abs(got[normal] - want[normal]) / ulp) <= 2.0
    sub = want < 2.0**-126
    assert np.max(np.abs(got[sub] - want[sub])) <= TINY
    assert np.all(np.isinf(got[want > 3.4028235e38]))


@pytest.mark.parametrize("c", [1, 5, 33, 197, 1000])
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0, 300.0])
def test_softmax_accuracy(c, scale):
    x = (np.random.default_rng(c).standard_normal((64, c)) * scale).astype(F32)
    y = ops.softmax(x, backend="cpu").astype(np.float64)
    xd = x.astype(np.float64)
    d = xd - xd.max(axis=1, keepdims=True)
    e = np.exp(d)
    want = e / e.sum(axis=1, keepdims=True)
    big = np.minimum(np.abs(d), 104).max(axis=1, keepdims=True)
    bound = (np.abs(d) + big + math.ceil(c / 32) + 16) * U * want + 2.0**-147
    assert np.all(np.abs(y - want) <= bound)


@pytest.mark.parametrize("c", [1, 2, 7, 33, 384, 1536])
@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1e-3, 1.0), (100.0, 1e3), (1.0, 1e3)])
def test_layer_norm_accuracy(c, scale, offset):
    x = (np.random.default_rng(c).standard_normal((32, c)) * scale + offset).astype(F32)
    y = ops.layer_norm(x, backend="cpu").astype(np.float64)
    xd = x.astype(np.float64)
    mu = xd.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((xd - mu) ** 2).mean(axis=1, keepdims=True) + float(F32(1e-5)))
    want = (xd - mu) * rstd
    bound = (c / 64 + 8) * U * np.abs(want) + (c / 32 + 7) * U * rstd * np.abs(xd).mean(axis=1, keepdims=True)
    assert np.all(np.abs(y - want) <= bound)


def _grid():
    rng = np.random.default_rng(3)
    return np.concatenate([np.linspace(-20, 20, 200_001), rng.standard_normal(50_000) * 3,
                           np.linspace(-1e-3, 1e-3, 2001), [1e-30, -1e-30, 1e-40]]).astype(F32)


def test_gelu_erf_accuracy():
    from math import erfc
    x = _grid()
    xd = x.astype(np.float64)
    want = xd * 0.5 * np.vectorize(erfc)(-xd / math.sqrt(2))
    got = ops.gelu(x, backend="cpu").astype(np.float64)
    assert np.all(np.abs(got - want) <= (8 + xd**2) * U * np.abs(want) + (4 * np.abs(xd) + 2) * TINY)


def test_gelu_tanh_and_silu_accuracy():
    x = _grid()
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):
        w = -2 * math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3)
        want = xd / (1 + np.exp(w))
        got = ops.gelu(x, "tanh", backend="cpu").astype(np.float64)
        floor = TINY + np.abs(xd) * 2.0**-127
        assert np.all(np.abs(got - want) <= (4 * np.minimum(np.abs(w), 110) + 8) * U * np.abs(want) + floor)
        want = xd / (1 + np.exp(-xd))
    got = ops.silu(x, backend="cpu").astype(np.float64)
    assert np.all(np.abs(got - want) <= (np.minimum(np.abs(xd), 110) + 8) * U * np.abs(want) + floor)


@pytest.mark.needs_torch
def test_agrees_with_torch_semantics():
    """Same functions as PyTorch (within the stated accuracy), same shapes, masked rows aside."""
    import torch
    import torch.nn.functional as TF
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((2, 6, 8, 8)) * 2).astype(F32)
    w, b = rng.standard_normal(6).astype(F32), rng.standard_normal(6).astype(F32)
    t = torch.from_numpy(x)
    pairs = [
        (ops.softmax(x), TF.softmax(t, -1)),
        (ops.layer_norm(x), TF.layer_norm(t, (8,))),
        (ops.group_norm(x, 3, w, b), TF.group_norm(t, 3, torch.from_numpy(w), torch.from_numpy(b))),
        (ops.gelu(x), TF.gelu(t)),
        (ops.gelu(x, "tanh"), TF.gelu(t, approximate="tanh")),
        (ops.silu(x), TF.silu(t)),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.softmax(np.zeros(3)), TypeError, "x must have dtype float32"),
    (lambda: ops.softmax(np.float32(1.0)), ValueError, "at least 1 dimension"),
    (lambda: ops.layer_norm(np.zeros((2, 3), F32), np.ones(4, F32)), ValueError, r"weight must have shape \(3,\)"),
    (lambda: ops.layer_norm(np.zeros((2, 3), F32), None, np.ones(3)), TypeError, "bias must have dtype float32"),
    (lambda: ops.layer_norm(np.zeros((2, 3), F32), eps=-1.0), ValueError, "eps must be a finite float >= 0"),
    (lambda: ops.layer_norm(np.zeros((2, 3), F32), eps="a"), TypeError, "eps must be a float"),
    (lambda: ops.group_norm(np.zeros((2, 6, 4), F32), 4), ValueError, "groups must be >= 1 and divide the 6"),
    (lambda: ops.group_norm(np.zeros((2, 6, 4), F32), 0), ValueError, "groups must be >= 1"),
    (lambda: ops.group_norm(np.zeros(6, F32), 1), ValueError, "at least 2 dimension"),
    (lambda: ops.gelu(np.zeros(3, F32), "erf"), ValueError, "approximate must be one of 'none', 'tanh'"),
    (lambda: ops.silu([1.0]), TypeError, "x must be a NumPy array"),
    (lambda: ops.silu(np.zeros(3, F32), backend="gpu"), ValueError, "backend must be one of"),
    (lambda: ops.add(np.zeros(3, F32), np.zeros(3)), TypeError, "b must have dtype float32"),
    (lambda: ops.add(np.zeros(3, F32), np.zeros(4, F32)), ValueError, "a and b must broadcast to one shape"),
    (lambda: ops.gelu(np.zeros(3, F32), codes={"scale": 0.1}), ValueError, "codes must have the keys"),
    (lambda: ops.gelu(np.zeros(3, F32), codes=(0.1, 3)), TypeError, "codes must be None or a dict"),
    (lambda: ops.softmax(np.zeros((1, 3), F32), codes={"scale": 0.0, "zero_point": 0}), ValueError, "codes scale"),
    (lambda: ops.silu(np.zeros(3, F32), codes={"scale": 1.0, "zero_point": 16, "bits": 4}), ValueError,
     "codes zero_point must be in \\[0, 15\\]"),
    (lambda: ops.softmax(np.zeros((1, 3), F32), codes={"delta": 1.0, "bits": 9}), ValueError, "bits"),
])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("op", ["softmax", "silu", "gelu", "layer_norm", "add"])
def test_cuda_backend_runs_on_the_host(op):
    """No CUDA kernels for the float stages: backend="cuda" computes them on the host, same bits (§15.7)."""
    x = np.random.default_rng(2).standard_normal((3, 5)).astype(F32)
    args = (x, x[0]) if op == "add" else (x,)
    assert ops.resolve_backend("cuda", op) == "cpu"
    assert bits_equal(getattr(ops, op)(*args, backend="cuda"), getattr(ops, op)(*args, backend="reference"))


@given(data=st.data(), shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=7))
def test_quantize_node_of_a_permuted_view(data, shape):
    """The program's quantize node reads a permuted or sliced view in memory order and returns its codes laid out
    like the input: the same codes as quantizing the contiguous copy, on every backend."""
    from pyqsim.program import KINDS
    from pyqsim.program.program import _Ctx
    base = data.draw(hnp.arrays(F32, shape, elements=st.floats(-300, 300, width=32)))
    perm = data.draw(st.permutations(range(len(shape))))
    x = base.transpose(perm)[..., ::data.draw(st.sampled_from([1, 2, -1]))]
    t = {"scale": np.array(0.37, F32), "zero_point": np.array(9, np.int32)}
    want = ops.quantize(np.ascontiguousarray(x), 0.37, 9, "uint8", bits=6, backend="reference")
    for backend in ("reference", "cpu"):
        got = KINDS["quantize"].run([x], {"bits": 6}, t, _Ctx(backend, {}))
        assert got.dtype == np.uint8 and got.shape == x.shape and np.array_equal(got, want)


def test_quantize_cuda_backend_runs_on_the_host():
    x = np.linspace(-3, 3, 11, dtype=F32)
    assert np.array_equal(ops.quantize(x, 0.1, 3, backend="cuda"), ops.quantize(x, 0.1, 3, backend="reference"))


@pytest.mark.parametrize("call,exc,match", [
    (lambda C: C.softmax(np.zeros((4, 4), F32)[:, ::2]), ValueError, "x must be C-contiguous"),
    (lambda C: C.softmax(np.zeros(4, np.float64)), TypeError, "x must have dtype float32"),
    (lambda C: C.layer_norm(np.zeros((2, 3), F32), np.ones(3, F32), np.ones(2, F32), 1e-5), ValueError, "bias must have shape"),
    (lambda C: C.layer_norm(np.zeros((2, 3), F32), np.ones(3, F32), np.ones(3, F32), float("nan")), ValueError, "eps"),
    (lambda C: C.group_norm(np.zeros((2, 6), F32), 4, np.ones(6, F32), np.ones(6, F32), 1e-5), ValueError, "groups"),
    (lambda C: C.unary(np.zeros(3, F32), "relu"), ValueError, "op must be"),
    (lambda C: C.quantize(np.zeros((1, 2, 1), F32), np.ones(2, F32), np.zeros(2, np.int32), 0, 300, "uint8"),
     ValueError, "code range"),
    (lambda C: C.quantize(np.full((1, 1, 1), np.nan, F32), np.ones(1, F32), np.zeros(1, np.int32), -128, 127, "int8"),
     ValueError, "x must be finite"),
    (lambda C: C.quantize(np.zeros((1, 1, 1), F32), np.zeros(1, F32), np.zeros(1, np.int32), -128, 127, "int8"),
     ValueError, "scale must be finite and > 0"),
    (lambda C: C.quantize(np.zeros((1, 1, 1), F32), np.ones(1, F32), np.full(1, 200, np.int32), -128, 127, "int8"),
     ValueError, "zero_point must be in"),
    (lambda C: C.quantize(np.zeros((3, 1, 4), F32)[:, :, ::2], np.ones(1, F32), np.zeros(1, np.int32), 0, 255, "uint8"),
     ValueError, "x must be C-contiguous"),  # elements of a row not adjacent
    (lambda C: C.quantize(np.lib.stride_tricks.as_strided(np.zeros(8, F32), (3, 1, 4), (8, 16, 4)), np.ones(1, F32),
                          np.zeros(1, np.int32), 0, 255, "uint8"), ValueError, "x must be C-contiguous"),  # rows overlap
    (lambda C: C.quantize(np.broadcast_to(np.zeros(4, F32), (2**40, 1, 4)), np.ones(1, F32), np.zeros(1, np.int32),
                          0, 255, "uint8"), ValueError, "x must be C-contiguous"),  # zero outer stride
    (lambda C: C.quantize(np.zeros((2, 3), F32), np.ones(3, F32), np.zeros(3, np.int32), 0, 255, "uint8"),
     ValueError, "x must be 3-D"),
])
def test_native_checks(call, exc, match):
    from pyqsim import _C
    with pytest.raises(exc, match=match):
        call(_C)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 33, 40000])
def test_native_value_checks_see_every_element(isa, n):
    """The kernels check the values in their pass over the data: a bad value anywhere (a vector's tail, the last of
    several tasks) is reported, and -0.0 is a valid probability (zero code)."""
    from pyqsim import _C
    s, z = np.ones(1, F32), np.zeros(1, np.int32)
    for i in sorted({0, n // 2, n - 1}):
        for bad in (np.nan, np.inf, -np.inf):
            x = np.ones((1, 1, n), F32)
            x[0, 0, i] = bad
            with pytest.raises(ValueError, match="x must be finite"):
                _C.quantize(x, s, z, -128, 127, "int8")
            with pytest.raises(ValueError, match="x must be finite"):
                _C.quantize(x.reshape(n, 1, 1), s, z, -128, 127, "int8")
        for bad in (np.nan, np.inf, -np.inf, -TINY, -1.0):
            p = np.full(n, 0.5, F32)
            p[i] = bad
            with pytest.raises(ValueError, match="p must be >= 0" if np.isfinite(bad) else "p must be finite and >= 0"):
                _C.quantize_log(p, 1.0, 2, 15)
    p = np.full(n, -0.0, F32)
    assert np.array_equal(_C.quantize_log(p, 1.0, 2, 15), np.full(n, 15, np.uint8))
