"""CPU backend == reference, bit for bit (``np.array_equal``), on the scalar and the AVX2 paths.

Data is drawn by Hypothesis (shared strategies); tile tails, K = 1, zero-size dimensions, type extremes, K at
the §4.1 bound, weights containing -128 (the exact int16 route of §10), non-contiguous inputs and thread
counts are covered by examples and parametrized cases. Contract for non-contiguous inputs: the op layer
(``pyqsim._checks``) makes arrays C-contiguous; ``pyqsim._C`` itself rejects them (test_cpu_build.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import strategies as S
from pyqsim import _checks as C
from pyqsim import ops

pytestmark = pytest.mark.needs_cpu_ext

# The ISA fixture is per test (it selects the kernel path for every example), which Hypothesis allows.
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large])


def _isas():
    from pyqsim.backends import cpu
    return cpu.isas() or ["scalar"]


ISAS = _isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Force one CPU kernel path for the test, then hand control back to PYQSIM_CPU_ISA."""
    from pyqsim import _C
    _C.set_cpu_isa(request.param)
    assert _C.get_cpu_isa() == request.param
    yield request.param
    _C.set_cpu_isa(None)


def bound_ok(kw) -> bool:
    """§4.1 with B = max over channels (the bound the kernels rely on)."""
    def term(k, x, zx, fmt, zw):
        xlo, xhi = C.RANGES["uint8" if x.dtype == np.uint8 else "int8"]
        wlo, whi = C.RANGES[fmt]
        zw = np.asarray(zw, np.int64).ravel()
        a = max(abs(xlo - zx), abs(xhi - zx))
        b = max(abs(wlo - int(zw.max())), abs(whi - int(zw.min()))) if zw.size else 0
        return k * a * b
    bias = kw.get("bias")
    bmax = 0 if bias is None or bias.size == 0 else int(np.abs(bias.astype(np.int64)).max())
    if "x1" in kw:
        k1 = int(np.prod(kw["x1"].shape[1:2])) * (np.prod(kw.get("kernel_size", (1, 1))))
        k2 = int(np.prod(kw["x2"].shape[1:2])) * (np.prod(kw.get("kernel_size", (1, 1))))
        total = term(k1, kw["x1"], kw["x1_zero_point"], kw["w1_format"], kw["w1_zero_point"]) + \
            term(k2, kw["x2"], kw["x2_zero_point"], kw["w2_format"], kw["w2_zero_point"])
    else:
        x = kw["x"]
        k = x.shape[1] * (np.prod(kw["kernel_size"]) if "kernel_size" in kw else 1) // kw.get("groups", 1)
        total = term(k, x, kw["x_zero_point"], kw["w_format"], kw["w_zero_point"])
    return total + bmax <= 2**31 - 1


def same(op: str, kw: dict):
    """Run ``op`` on the reference and the CPU backend and require identical arrays."""
    fn = getattr(ops, op)
    ref = fn(**kw, backend="reference")
    got = fn(**kw, backend="cpu")
    assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.array_equal(got, ref)
    return got


def gemm_kw(m, n, k, xt="uint8", fmt="int8", seed=0, out="int32", zx=None, zw=None, bias=True):
    rng = np.random.default_rng(seed)
    lo, hi = C.RANGES[xt]
    x = rng.integers(lo, hi + 1, (m, k), dtype=C.CONTAINERS[xt])
    wlo, whi = C.RANGES[fmt]
    wc = rng.integers(wlo, whi + 1, (n, k)).astype(C.CONTAINERS[fmt])
    w = wc if fmt == "int8" else ops.pack_int4(wc, fmt == "int4", backend="reference")
    kw = dict(x=x, w=w, w_format=fmt, x_zero_point=(lo + hi + 1) // 2 if zx is None else zx,
              w_zero_point=0 if zw is None else zw, out_dtype=out)
    if bias:
        kw["bias"] = rng.integers(-5000, 5000, n, dtype=np.int32)
    if out in C.REQUANT_OUT:
        m0, s = ops.quantize_multiplier(rng.uniform(2.0**-12, 2.0**-6, n), backend="reference")
        kw.update(multiplier=m0, shift=s, out_zero_point=C.RANGES[out][0] + 3)
    elif out == "float32":
        kw["out_scale"] = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
    return kw


# ------------------------------------------------------------------------------------------ property tests


@FIXTURE_OK
@given(kw=S.gemm_cases())
@S.at_shift_edges("int_gemm")
def test_int_gemm_equals_reference(isa, kw):
    assume(bound_ok(kw))  # see test_lead_bound_gap below; the CPU kernels enforce the tight bound
    same("int_gemm", kw)


@FIXTURE_OK
@given(kw=S.conv_cases())
@S.at_shift_edges("int_conv2d")
def test_int_conv2d_equals_reference(isa, kw):
    assume(bound_ok(kw))
    same("int_conv2d", kw)


@FIXTURE_OK
@given(kw=S.split_gemm_cases())
@S.at_shift_edges("split_gemm")
def test_split_gemm_equals_reference(isa, kw):
    assume(bound_ok(kw))
    same("split_gemm", kw)


@FIXTURE_OK
@given(kw=S.split_conv_cases())
@S.at_shift_edges("split_conv2d")
def test_split_conv2d_equals_reference(isa, kw):
    assume(bound_ok(kw))
    same("split_conv2d", kw)


@FIXTURE_OK
@given(kw=S.log2_cases())
@S.at_shift_edges("log2_attn_matmul")
def test_log2_attn_matmul_equals_reference(isa, kw):
    same("log2_attn_matmul", kw)


@FIXTURE_OK
@given(kw=S.requant_cases())
@S.at_shift_edges("requantize")
def test_requantize_equals_reference(isa, kw):
    same("requantize", kw)


# ------------------------------------------------------------------------------------------ tile tails

TAILS = [1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 65]


@pytest.mark.parametrize("m", TAILS)
@pytest.mark.parametrize("fmt", ["int8", "int4", "uint4"])
def test_gemm_tile_tails_m(isa, m, fmt):
    for n, k in [(17, 1), (16, 9), (33, 33), (1, 64), (65, 7), (97, 5)]:
        same("int_gemm", gemm_kw(m, n, k, fmt=fmt, seed=m * 100 + n, out="uint8"))


@pytest.mark.parametrize("n", TAILS + [97, 113, 129])  # also 1, 2 and 3 panels after groups of 4 (§10.7 kernels)
def test_gemm_tile_tails_n(isa, n):
    for m, k in [(5, 3), (9, 31), (4, 32), (1, 65)]:
        for out in ("int32", "int8", "float32"):
            same("int_gemm", gemm_kw(m, n, k, xt="int8", seed=n, out=out))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200])
def test_gemm_tile_tails_k(isa, k):
    for fmt in ("int8", "int4", "uint4"):
        zw = np.arange(19, dtype=np.int32) % 7 - (0 if fmt == "uint4" else 3)
        same("int_gemm", gemm_kw(6, 19, k, fmt=fmt, seed=k, zw=zw))


@pytest.mark.parametrize("n", [16, 64, 65, 97, 113, 129])  # value panels in groups of 4 and their tails (§10.7)
def test_log2_attn_panel_tails(isa, n):
    rng = np.random.default_rng(n)
    for m, length, out in [(7, 33, "int64"), (9, 197, "uint8"), (4, 5, "float32")]:
        kw = dict(codes=rng.integers(0, 16, (2, m, length), dtype=np.uint8),
                  v=rng.integers(0, 256, (2, length, n), dtype=np.uint8), v_zero_point=int(rng.integers(0, 256)),
                  bits=4, mode="sqrt2", out_dtype=out)
        if out == "uint8":
            kw.update(multiplier=rng.integers(2**30, 2**31 - 1, n).astype(np.int32),
                      shift=rng.integers(33, 60, n).astype(np.int32), out_zero_point=128)
        if out == "float32":
            kw.update(out_scale=rng.random(n).astype(np.float32) * 2.0**-20)
        same("log2_attn_matmul", kw)


@pytest.mark.parametrize("m,n,k", [(0, 5, 3), (5, 0, 3), (5, 3, 0), (0, 0, 0), (1, 1, 0)])
def test_gemm_zero_size(isa, m, n, k):
    for out in ("int32", "int8", "float32", "uint4"):
        same("int_gemm", gemm_kw(m, n, k, out=out))


def test_gemm_larger_blocks(isa):
    """More rows than one task block (64) and more channels than one thread split."""
    for out in ("int32", "uint8", "int4", "float32"):
        same("int_gemm", gemm_kw(197, 150, 77, out=out, zw=np.arange(150, dtype=np.int32) % 11 - 5))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gemm_long_k_smaller_row_blocks(isa, fmt):
    """Long K shrinks the rows per task (A block kept in L2): several row blocks of a non-multiple size."""
    same("int_gemm", gemm_kw(70, 33, 3001, fmt=fmt, out="int8", zx=3, zw=np.arange(33, dtype=np.int32) % 5))


# ------------------------------------------------------------------------------------------ extremes


@pytest.mark.parametrize("xt,xv", [("uint8", 0), ("uint8", 255), ("int8", -128), ("int8", 127), ("int8", 0)])
@pytest.mark.parametrize("wv", [-128, -127, 127, 0])
@pytest.mark.parametrize("zx_kind", ["lo", "mid", "hi"])
def test_gemm_constant_extremes(isa, xt, xv, wv, zx_kind):
    lo, hi = C.RANGES[xt]
    zx = {"lo": lo, "mid": (lo + hi + 1) // 2, "hi": hi}[zx_kind]
    k = 37
    kw = dict(x=np.full((5, k), xv, C.CONTAINERS[xt]), w=np.full((18, k), wv, np.int8), x_zero_point=zx,
              w_zero_point=np.array([-128, 127, 0] * 6, np.int32), out_dtype="int32")
    same("int_gemm", kw)


@pytest.mark.parametrize("xt,zx,wv", [("uint8", 0, -128), ("uint8", 0, 127), ("int8", -128, -128), ("int8", 127, 127),
                                      ("uint8", 255, -128), ("int8", -128, 127)])
def test_gemm_k_at_overflow_bound(isa, xt, zx, wv):
    """K exactly at §4.1's limit with the extreme codes: the result is +-(2^31 - 1)-ish and still exact."""
    k = S.max_k(xt, zx, "int8", 0)
    xv = C.RANGES[xt][1] if abs(C.RANGES[xt][1] - zx) >= abs(C.RANGES[xt][0] - zx) else C.RANGES[xt][0]
    kw = dict(x=np.full((2, k), xv, C.CONTAINERS[xt]), w=np.full((3, k), wv, np.int8), x_zero_point=zx,
              out_dtype="int32")
    got = same("int_gemm", kw)
    assert abs(int(got[0, 0])) == k * abs(xv - zx) * abs(wv)
    kw["x"] = np.full((2, k + 1), xv, C.CONTAINERS[xt])
    kw["w"] = np.full((3, k + 1), wv, np.int8)
    with pytest.raises(ValueError, match="K="):
        ops.int_gemm(**kw, backend="cpu")


def test_int4_k_near_bound(isa):
    k = S.max_k("uint8", 0, "uint4", 0)  # 561433 for uint8 x uint4
    x = np.full((1, k), 255, np.uint8)
    w = ops.pack_int4(np.full((2, k), 15, np.uint8), False, backend="reference")
    got = same("int_gemm", dict(x=x, w=w, w_format="uint4", out_dtype="int32"))
    assert int(got[0, 0]) == k * 255 * 15


@pytest.mark.parametrize("xt,xv", [("uint8", 255), ("int8", 127)])
def test_int4_kernel_sum_crosses_2_31(isa, xt, xv):
    """§10.3: the 4-bit kernel sums u * c with u = x' + 128 = 255 and c = w + 8 = 15 (w = 7); at K at the §4.1
    bound that sum is K * 3825, above 2^31 (uint8, K = 1052688) and even above 2^32 (int8, K = 2097151), while the
    true accumulator K * (x - zx) * 7 fits int32: the mod-2^32 epilogue must still give it exactly."""
    k = S.max_k(xt, 0, "int4", 0)
    assert k * 255 * 15 > 2**31
    x = np.full((3, k), xv, C.CONTAINERS[xt])
    x[1, ::2] = C.RANGES[xt][0]  # a second row whose true sum is smaller, and one with one odd element
    x[2, 5] = 0
    w = ops.pack_int4(np.full((2, k), 7, np.int8), True, backend="reference")
    got = same("int_gemm", dict(x=x, w=w, w_format="int4", out_dtype="int32"))
    assert int(got[0, 0]) == k * xv * 7 <= 2**31 - 1


def test_minus128_weights_only_in_some_panels(isa):
    """§10.2 per panel: channel 37 (panel 2) holds a -128 against x' = -128; panels 0, 1 keep the sign path."""
    rng = np.random.default_rng(11)
    x = rng.choice(np.array([0, 255, 1, 128], np.uint8), (7, 45))
    w = rng.integers(-127, 128, (48, 45)).astype(np.int8)
    w[37, 3] = -128
    x[:, 3] = 0
    for zx in (0, 128):
        same("int_gemm", dict(x=x, w=w, x_zero_point=zx, out_dtype="int32"))
        same("int_gemm", dict(x=x, w=w, x_zero_point=zx, out_dtype="int8", multiplier=2**30, shift=40))


@st.composite
def long_k_gemm_cases(draw):
    """K in the thousands or at the §4.1 bound of the drawn types and zero points, few rows and channels; data as
    a drawn constant fill (extremes favoured) with drawn elements scattered over it."""
    xt, fmt = draw(st.sampled_from(S.ACT_TYPES)), draw(st.sampled_from(["int8", "int4", "uint4"]))
    zx, zw = draw(S.zero_points(xt)), draw(S.zero_points(fmt))
    bound = S.max_k(xt, zx, fmt, zw)
    k = draw(st.one_of(st.just(bound), st.integers(1000, min(bound, 20000))))
    m, n = draw(st.integers(1, 3)), draw(st.integers(1, 17))

    def data(dtype, shape):
        lo, hi = C.RANGES[dtype]
        return draw(hnp.arrays(C.CONTAINERS[dtype], shape, elements=st.integers(lo, hi),
                               fill=st.sampled_from([lo, hi, (lo + hi) // 2])))
    w = data(fmt, (n, k))
    kw = dict(x=data(xt, (m, k)), w=w if fmt == "int8" else ops.pack_int4(w, fmt == "int4", backend="reference"),
              w_format=fmt, x_zero_point=zx, w_zero_point=zw)
    kw.update(draw(S.out_stage(n)))
    return kw


@settings(FIXTURE_OK, max_examples=max(4, settings.default.max_examples // 100))  # ci: 4, thorough: 100
@given(kw=long_k_gemm_cases())
@example(kw=dict(x=np.full((2, S.max_k("uint8", 0, "int8", -128)), 255, np.uint8),
                 w=np.full((3, S.max_k("uint8", 0, "int8", -128)), 127, np.int8), x_zero_point=0,
                 w_zero_point=-128, out_dtype="int32"))
def test_long_k_gemm_equals_reference(isa, kw):
    same("int_gemm", kw)


def test_minus128_weights_with_full_range_activations(isa):
    """x' = -128 (uint8 0) against w = -128: pairs of 2 * 128 * 128 = 32768 would saturate vpmaddubsw;
    such weights take the exact int16 route (spec §10 step 4)."""
    rng = np.random.default_rng(3)
    x = rng.choice(np.array([0, 255, 128, 1], np.uint8), (9, 70))
    w = rng.choice(np.array([-128, 127, -127, 0], np.int8), (21, 70))
    w[:, :2] = -128
    for zx in (0, 128, 255):
        for out in ("int32", "uint8", "float32"):
            kw = gemm_kw(9, 21, 70, out=out, zx=zx)
            kw.update(x=x, w=w)
            same("int_gemm", kw)
    from pyqsim.backends import cpu
    assert cpu.pack_weight(w).has_min_code
    assert not cpu.pack_weight(np.clip(w, -127, 127)).has_min_code


def test_sign_path_extremes():
    """The worst pairs of the sign path: |x'| = 128 with w = +-127 at every position (spec §10 step 3)."""
    x = np.zeros((4, 64), np.uint8)  # x' = -128
    x[1] = 255
    x[2, ::2] = 0
    x[2, 1::2] = 255
    w = np.full((16, 64), 127, np.int8)
    w[8:] = -127
    w[:, 1::2] *= -1
    for isa_name in ISAS:
        from pyqsim import _C
        _C.set_cpu_isa(isa_name)
        try:
            same("int_gemm", dict(x=x, w=w, out_dtype="int32"))
            same("int_gemm", dict(x=x, w=w, x_zero_point=255, out_dtype="int32"))
        finally:
            _C.set_cpu_isa(None)


# ------------------------------------------------------------------------------------------ output stages


@pytest.mark.parametrize("out", ["int8", "uint8", "int4", "uint4"])
def test_requant_shift_ranges(isa, out):
    """Shifts 1..94 in one per-channel vector: the wide (S < 33) and fast (S >= 33) epilogues and S > 62."""
    n = 94
    kw = gemm_kw(7, n, 40, out="int32", seed=5)
    kw.pop("out_dtype")
    rng = np.random.default_rng(1)
    for shifts in (np.arange(1, 95, dtype=np.int32), np.full(n, 33, np.int32), np.full(n, 63, np.int32),
                   np.full(n, 32, np.int32), rng.integers(33, 63, n).astype(np.int32)):
        mult = rng.integers(0, 2**31 - 1, n).astype(np.int32)
        mult[:3] = [0, 2**31 - 1, 2**30]
        same("int_gemm", dict(kw, out_dtype=out, multiplier=mult, shift=shifts,
                              out_zero_point=C.RANGES[out][0] + 1))


def test_requantize_layouts(isa):
    rng = np.random.default_rng(2)
    for shape, axis in [((3, 40), -1), ((2, 5, 4, 3), 1), ((17,), 0), ((1, 33), 1), ((4, 3, 0), 1), ((2, 9, 5), 0)]:
        acc = rng.integers(-2**31, 2**31 - 1, shape, dtype=np.int64).astype(np.int32)
        n = shape[axis]
        for shift in (np.full(n, 40, np.int32), rng.integers(1, 95, n).astype(np.int32)):
            m = rng.integers(0, 2**31 - 1, n).astype(np.int32)
            for out in ("int8", "uint4"):
                same("requantize", dict(acc=acc, multiplier=m, shift=shift, zero_point=1, out_dtype=out, axis=axis))


# ------------------------------------------------------------------------------------------ conv specifics


@pytest.mark.parametrize("groups,cg,og", [(1, 3, 5), (1, 16, 16), (2, 5, 3), (4, 1, 1), (3, 8, 17), (1, 16, 48), (2, 7, 33)])
@pytest.mark.parametrize("fmt", ["int8", "int4", "uint4"])
def test_conv_groups_and_tails(isa, groups, cg, og, fmt):
    rng = np.random.default_rng(groups * 10 + cg)
    c, o = groups * cg, groups * og
    x = rng.integers(0, 256, (2, c, 9, 11), dtype=np.uint8)
    lo, hi = C.RANGES[fmt]
    wc = rng.integers(lo, hi + 1, (o, cg, 3, 3)).astype(C.CONTAINERS[fmt])
    w = wc if fmt == "int8" else ops.pack_int4(wc.reshape(o, -1), fmt == "int4", backend="reference")
    for stride, padding, dilation in [(1, 1, 1), (2, 2, 1), ((1, 2), (0, 1), (2, 1)), (3, 0, 2)]:
        kw = dict(x=x, w=w, w_format=fmt, kernel_size=(3, 3), groups=groups, stride=stride, padding=padding,
                  dilation=dilation, x_zero_point=77, w_zero_point=rng.integers(lo, hi + 1, o).astype(np.int32),
                  bias=rng.integers(-999, 999, o).astype(np.int32), out_dtype="int8",
                  multiplier=np.full(o, 2**30, np.int32), shift=np.full(o, 38, np.int32), out_zero_point=-3)
        same("int_conv2d", kw)
        same("int_conv2d", dict(kw, out_dtype="int32", multiplier=None, shift=None, out_zero_point=0))


def test_conv_padding_is_zero_point(isa):
    """Padded taps read the activation zero point: a constant image equal to zx gives exactly the bias."""
    for xt, zx in (("uint8", 0), ("uint8", 200), ("int8", -128), ("int8", 5)):
        x = np.full((1, 6, 5, 5), zx, C.CONTAINERS[xt])
        w = np.random.default_rng(0).integers(-128, 128, (4, 6, 3, 3)).astype(np.int8)
        bias = np.array([1, -2, 3, 2**20], np.int32)
        got = same("int_conv2d", dict(x=x, w=w, padding=2, x_zero_point=zx, bias=bias))
        assert np.array_equal(got, np.broadcast_to(bias[None, :, None, None], got.shape))


def test_conv_unet_like(isa):
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (1, 32, 12, 12), dtype=np.uint8)
    w = rng.integers(-127, 128, (40, 32, 3, 3)).astype(np.int8)
    m, s = ops.quantize_multiplier(np.full(40, 1 / 3000.0), backend="reference")
    same("int_conv2d", dict(x=x, w=w, padding=1, x_zero_point=128, out_dtype="uint8", multiplier=m, shift=s,
                            out_zero_point=128))
    same("int_conv2d", dict(x=x, w=w, padding=1, stride=2, x_zero_point=128, out_dtype="float32",
                            out_scale=np.full(40, 1e-3, np.float32)))


# ------------------------------------------------------------------------------------------ non-contiguous


def test_noncontiguous_inputs_are_made_contiguous_by_the_op_layer(isa):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (10, 40), dtype=np.uint8)[:, ::2]
    w = rng.integers(-128, 128, (30, 20), dtype=np.int8)[::3]
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    same("int_gemm", dict(x=x, w=w, x_zero_point=9))
    same("int_gemm", dict(x=np.asfortranarray(x), w=w, x_zero_point=9))
    xc = rng.integers(-128, 128, (2, 8, 9, 18), dtype=np.int8)[..., ::2]
    wc = rng.integers(-128, 128, (4, 8, 3, 3), dtype=np.int8)
    same("int_conv2d", dict(x=xc, w=wc, padding=1))
    codes = rng.integers(0, 16, (6, 12), dtype=np.uint8).T
    v = rng.integers(0, 256, (6, 10), dtype=np.uint8)
    same("log2_attn_matmul", dict(codes=codes, v=v, bits=4))


# ------------------------------------------------------------------------------------------ threads


def test_results_do_not_depend_on_thread_count():
    from pyqsim import _C
    cases = [
        ("int_gemm", gemm_kw(200, 70, 90, out="uint8", zw=np.arange(70, dtype=np.int32) % 5)),
        ("int_gemm", gemm_kw(3, 300, 64, fmt="int4", out="float32")),
        ("int_conv2d", dict(x=np.random.default_rng(1).integers(0, 256, (3, 12, 10, 10), dtype=np.uint8),
                            w=np.random.default_rng(2).integers(-128, 128, (21, 4, 3, 3), dtype=np.int8),
                            groups=3, padding=1, x_zero_point=100)),
        ("log2_attn_matmul", dict(codes=np.random.default_rng(3).integers(0, 16, (90, 50), dtype=np.uint8),
                                  v=np.random.default_rng(4).integers(-128, 128, (50, 33), dtype=np.int8), bits=4)),
        ("requantize", dict(acc=np.random.default_rng(5).integers(-2**31, 2**31 - 1, (70, 40), dtype=np.int64)
                            .astype(np.int32), multiplier=2**30, shift=40, out_dtype="int8")),
    ]
    old = _C.get_num_threads()
    try:
        for isa_name in ISAS:
            _C.set_cpu_isa(isa_name)
            for op, kw in cases:
                outs = []
                for nt in (1, 2, 3):
                    _C.set_num_threads(nt)
                    assert _C.get_num_threads() == nt
                    outs.append(getattr(ops, op)(**kw, backend="cpu"))
                assert all(np.array_equal(outs[0], o) for o in outs[1:]), op
                assert np.array_equal(outs[0], getattr(ops, op)(**kw, backend="reference"))
    finally:
        _C.set_num_threads(old)
        _C.set_cpu_isa(None)


# ------------------------------------------------------------------------------------------ log2 extremes


@pytest.mark.parametrize("bits,mode", [(2, "log2"), (4, "sqrt2"), (5, "log2"), (8, "sqrt2"), (8, "log2")])
@pytest.mark.parametrize("frac_bits", [0, 16, 24])
def test_log2_deep_codes_and_outputs(isa, bits, mode, frac_bits):
    for kw in S.log2_deep_cases(bits, mode, frac_bits):
        same("log2_attn_matmul", kw)


# ------------------------------------------------------------------------------------------ packed weights


@given(kw=S.gemm_cases(max_dim=40))
@example(kw=gemm_kw(33, 17, 9, fmt="int4", out="uint8"))
def test_prepacked_gemm_weight_equals_plain(kw):
    from pyqsim import _C
    from pyqsim.backends import cpu
    assume(bound_ok(kw))
    a = C.gemm_args(kw["x"], kw["w"], kw.get("x_zero_point", 0), kw.get("w_zero_point", 0), kw.get("bias"),
                    kw.get("w_format", "int8"), kw["out_dtype"], kw.get("multiplier"), kw.get("shift"),
                    kw.get("out_zero_point", 0), kw.get("out_scale"))
    pw = cpu.pack_weight(a.w, a.w_format, k=a.k)
    o = a.out
    for isa_name in ISAS:
        _C.set_cpu_isa(isa_name)
        try:
            y1 = _C.int_gemm(a.x, a.w, a.w_format, a.x_zero_point, a.w_zero_point, a.bias, o.dtype, o.multiplier,
                             o.shift, o.zero_point, o.scale)
            y2 = _C.int_gemm(a.x, pw, a.w_format, a.x_zero_point, a.w_zero_point, a.bias, o.dtype, o.multiplier,
                             o.shift, o.zero_point, o.scale)
        finally:
            _C.set_cpu_isa(None)
        assert np.array_equal(y1, y2)


def test_prepacked_conv_weight_equals_plain(isa):
    from pyqsim import _C
    from pyqsim.backends import cpu
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (2, 6, 7, 7), dtype=np.uint8)
    wc = rng.integers(-8, 8, (4, 3, 3, 2)).astype(np.int8)
    wp = ops.pack_int4(wc.reshape(4, -1), True, backend="reference")
    pw = cpu.pack_weight(wp, "int4", kind="conv", kernel_size=(3, 2), groups=2, cin_per_group=3)
    ref = ops.int_conv2d(x, wp, w_format="int4", kernel_size=(3, 2), groups=2, padding=1, x_zero_point=3,
                         backend="reference")
    zeros = np.zeros(4, np.int32)
    got = _C.int_conv2d(x, pw, "int4", (3, 2), (1, 1), (1, 1), (1, 1), 2, 3, zeros, zeros, "int32", None, None, 0, None)
    assert np.array_equal(got, ref)
    with pytest.raises(ValueError, match="packed"):
        _C.int_conv2d(x, pw, "int8", (3, 2), (1, 1), (1, 1), (1, 1), 2, 3, zeros, zeros, "int32", None, None, 0, None)


def test_lead_bound_gap_is_rejected_by_cpu():
    """zw = [-128, 127] per channel: B = 255, not 0. The CPU binding applies the tight §4.1 bound."""
    k = 40000
    kw = dict(x=np.zeros((1, k), np.int8), w=np.zeros((2, k), np.int8), x_zero_point=127,
              w_zero_point=np.array([-128, 127], np.int32), out_dtype="int32")
    with pytest.raises(ValueError, match="2\\^31-1"):
        ops.int_gemm(**kw, backend="cpu")
