"""Batched ops (spec §7 batched form, §4.3 int_bmm) and packed weights (§4.4): CPU backend == reference, bit for bit
(``np.array_equal``) on the scalar and AVX2 paths, and the batched reference == the 2-D reference looped over the
leading dimensions. Every result here is an integer or a float32 stage with a stated order of operations: no
tolerance anywhere.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis.extra import numpy as hnp
from hypothesis import strategies as st

import strategies as S
from pyqsim import _checks as C
from pyqsim import ops
from test_cpu_ops import FIXTURE_OK, isa, same  # noqa: F401  (isa is a fixture)

LOG2_KW = ("v_zero_point", "bits", "mode", "frac_bits", "out_dtype", "multiplier", "shift", "out_zero_point",
           "out_scale")


OUT_DTYPES = {"int64": np.int64, "float32": np.float32, "int8": np.int8, "int4": np.int8, "uint8": np.uint8,
              "uint4": np.uint8, "int32": np.int32}


def _log2_loop(kw):
    """The 2-D reference applied to every leading index (the definition of the batched form)."""
    codes, v = kw["codes"], kw["v"]
    rest = {k: kw[k] for k in LOG2_KW if k in kw}
    lead, m, n = codes.shape[:-2], codes.shape[-2], v.shape[-1]
    out = np.zeros((*lead, m, n), OUT_DTYPES[kw["out_dtype"]])
    for i in np.ndindex(*lead):
        out[i] = ops.log2_attn_matmul(codes[i], v[i], backend="reference", **rest)
    return out


def _example(lead, m=5, length=9, n=17, bits=4, mode="sqrt2", frac_bits=16, vt=np.uint8, out="int64", seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (*lead, m, length), dtype=np.uint8)
    lo, hi = (0, 256) if vt == np.uint8 else (-128, 128)
    v = rng.integers(lo, hi, (*lead, length, n)).astype(vt)
    kw = dict(codes=codes, v=v, v_zero_point=int(hi - 1), bits=bits, mode=mode, frac_bits=frac_bits, out_dtype=out)
    if out == "float32":
        kw["out_scale"] = np.full(n, 2.0**-20, np.float32)
    elif out != "int64":
        kw.update(multiplier=np.full(n, 2**30, np.int32), shift=np.full(n, 40, np.int32), out_zero_point=0)
    return kw


def _every_shift(kw):
    """Requantized output with every shift 1..94 (one per channel) and multipliers up to 2^31 - 1."""
    n = kw["v"].shape[-1]
    rng = np.random.default_rng(n)
    return dict(kw, shift=(np.arange(n) % 94 + 1).astype(np.int32),
                multiplier=rng.integers(0, 2**31, n).astype(np.int32), out_zero_point=-3 if kw["out_dtype"] == "int8"
                else 7)


def _zero_rows(kw, rows=(0, 17, 39)):
    """kw with some rows of codes all zero code (R = 0 there)."""
    codes = kw["codes"].copy()
    codes[..., list(rows), :] = 2 ** kw["bits"] - 1
    return dict(kw, codes=codes)


LOG2_EDGES = [_example(()), _example((0,)), _example((1,)), _example((2, 3)), _example((2, 0, 3)),
              _example((1, 2, 3), m=1, length=1, n=1), _example((3,), m=0), _example((2,), length=0),
              _example((2,), n=0), _example((2, 2), bits=8, mode="log2", frac_bits=0, out="int8"),
              _example((2,), bits=8, mode="sqrt2", frac_bits=24, vt=np.int8, out="float32"),
              _example((4,), m=13, length=33, n=65, bits=2, mode="log2", out="uint4"),
              _every_shift(_example((2,), m=6, length=40, n=94, bits=5, mode="sqrt2", frac_bits=24, out="int8")),
              _every_shift(_example((1,), m=7, length=3, n=94, bits=4, mode="log2", frac_bits=0, vt=np.int8,
                                    out="uint8"))]


def _with_examples(test):
    for kw in LOG2_EDGES:
        test = example(kw=kw)(test)
    return test


@_with_examples
@given(kw=S.log2_cases(max_dim=20, lead=S.lead_shapes()))
def test_log2_batched_reference_equals_loop(kw):
    ref = ops.log2_attn_matmul(**kw, backend="reference")
    loop = _log2_loop(kw)
    assert ref.shape == loop.shape and ref.dtype == loop.dtype
    assert np.array_equal(ref, loop)


@pytest.mark.needs_cpu_ext
@FIXTURE_OK
@_with_examples
@given(kw=S.log2_cases(max_dim=24, lead=S.lead_shapes()))
def test_log2_batched_cpu_equals_reference(isa, kw):
    same("log2_attn_matmul", kw)


@st.composite
def _log2_blocked(draw):
    """log2_attn_matmul kwargs sized across the CPU kernels' blocking: 16-row blocks and groups of up to 64 KiB of
    weight rows (AMX), 4-row quads, 64-code k-steps, pairs of 16-channel panels and groups of 256 channels, with the
    passes' rows all zero in some blocks (zero-code runs) and, with wide shifts only, the requantization that the
    AVX-512 paths fuse. Sizes, parameters and the code range are drawn; the codes and values inside them come from a
    drawn seed (arrays of up to 180,000 entries)."""
    m = draw(st.sampled_from([1, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97]) | st.integers(0, 100))
    length = draw(st.sampled_from([1, 63, 64, 65, 128, 197, 256, 257]) | st.integers(0, 300))
    n = draw(st.sampled_from([1, 15, 16, 17, 32, 33, 64, 255, 256, 257, 272]) | st.integers(0, 300))
    lead = (draw(st.integers(1, 2)),)
    bits, mode = draw(st.integers(2, 8)), draw(st.sampled_from(["log2", "sqrt2"]))
    vt = draw(st.sampled_from([np.uint8, np.int8]))
    frac_bits = draw(st.sampled_from([0, 16, 24]) | st.integers(0, 24))  # every accepted F, its edges most often
    kw = _example(lead, m=m, length=length, n=n, bits=bits, mode=mode, frac_bits=frac_bits,
                  vt=vt, out=draw(st.sampled_from(["int64", "float32", "int8", "uint8", "int4", "uint4"])),
                  seed=draw(st.integers(0, 2**32 - 1)))
    zero_code = 2**bits - 1
    codes = kw["codes"]
    top = draw(st.integers(0, zero_code))  # codes drawn from [0, top] and the zero code
    codes[...] = np.minimum(codes, top)
    rows = draw(st.lists(st.integers(0, max(m - 1, 0)), max_size=40 if m else 0))
    codes[..., rows, :] = zero_code  # whole rows of zeros: a pass may be empty in a block
    kw["v_zero_point"] = draw(S.zero_points("uint8" if vt == np.uint8 else "int8"))
    if kw["out_dtype"] == "float32":
        kw["out_scale"] = draw(hnp.arrays(np.float32, (n,), elements=st.floats(float(np.float32(1e-12)), float(np.float32(1e-3)), width=32)))
    elif kw["out_dtype"] != "int64":
        wide = draw(st.booleans())
        kw["shift"] = draw(hnp.arrays(np.int32, (n,), elements=st.integers(33, 94) if wide else S.shifts()))
        kw["multiplier"] = draw(hnp.arrays(np.int32, (n,), elements=S.multipliers()))
        kw["out_zero_point"] = draw(S.zero_points(kw["out_dtype"]))
    return kw


@pytest.mark.needs_cpu_ext
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # the reference's fl32(R) * 3e38
@FIXTURE_OK
@example(kw=_example((2,), m=65, length=197, n=257, out="uint8", seed=1))
@example(kw=_example((1,), m=33, length=257, n=272, bits=8, mode="sqrt2", out="float32", seed=2))
@example(kw=_every_shift(_example((1,), m=32, length=64, n=94, bits=5, mode="log2", frac_bits=24, out="int8")))
@example(kw=_example((2,), m=97, length=65, n=33, bits=8, mode="log2", frac_bits=0, vt=np.int8, out="int64"))
@example(kw=_example((2,), m=33, length=70, n=20, bits=8, mode="sqrt2", frac_bits=7, out="uint8", seed=4))
@example(kw=_example((1,), m=0, length=65, n=17, out="float32"))
# the AVX-512 output stage works on R / 2^f (f = 9 here): f falls to 0 where a scale * 2^f overflows float32, and
# to S - 33 where a shift S is below f + 33 (every S = 33: f = 0; S in 33..44: f limited by the smallest)
@example(kw=_zero_rows(dict(_example((1,), m=40, length=197, n=33, out="float32", seed=5),
                            out_scale=np.array([3e38] + [2.0**-20] * 32, np.float32))))
@example(kw=dict(_example((1,), m=33, length=100, n=40, out="uint8", seed=6), shift=np.full(40, 33, np.int32)))
@example(kw=dict(_example((1,), m=33, length=100, n=40, out="int8", seed=7),
                 shift=(33 + np.arange(40) % 12).astype(np.int32), out_zero_point=-5))
@given(kw=_log2_blocked())
def test_log2_blocked_shapes(isa, kw):
    same("log2_attn_matmul", kw)


@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("where", [(0, 0, 0), (1, 16, 100), (2, 99, 196)], ids=["first", "middle", "last"])
@pytest.mark.parametrize("into_out", [False, True], ids=["new", "out"])
def test_log2_code_range_in_kernel(isa, where, into_out):
    """The CPU kernel checks the codes' range as it reads them (spec §11): one code above 2^bits - 1 in any task's
    rows (the first, a middle or the last row of the last batch element), or with an empty result, raises the
    ValueError that names the largest code, with or without ``out``."""
    rng = np.random.default_rng(8)
    codes = rng.integers(0, 16, (3, 100, 197), dtype=np.uint8)
    codes[where] = 16 + where[0]
    v = rng.integers(0, 256, (3, 197, 40), dtype=np.uint8)
    out = np.zeros((3, 100, 40), np.int64) if into_out else None
    with pytest.raises(ValueError, match=f"codes must be in \\[0, 15\\] for bits=4, got {16 + where[0]}"):
        ops.log2_attn_matmul(codes, v, bits=4, v_zero_point=128, out=out, backend="cpu")
    with pytest.raises(ValueError, match="codes must be in"):
        ops.log2_attn_matmul(codes, np.zeros((3, 197, 0), np.uint8), bits=4, backend="cpu")


@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("bits,mode", [(4, "sqrt2"), (5, "log2"), (8, "sqrt2"), (8, "log2")])
@pytest.mark.parametrize("frac_bits", [0, 16, 24])
def test_log2_batched_deep_codes(isa, bits, mode, frac_bits):
    for kw in S.log2_deep_cases(bits, mode, frac_bits):
        kw = dict(kw, codes=np.stack([kw["codes"], kw["codes"][::-1]]), v=np.stack([kw["v"], kw["v"][:, ::-1]]))
        same("log2_attn_matmul", kw)


@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("vt", [np.uint8, np.int8])
@pytest.mark.parametrize("bits,frac_bits", [(5, 16), (8, 4)], ids=["exact", "deep"])
def test_log2_long_l_chunks(isa, vt, bits, frac_bits):
    """L beyond the kernels' int32 chunk (with N = 272 the chunk is 15420 rows of v): R summed over chunks; with
    8-bit codes and F = 4, deep terms (§7, rounded per term) in some rows and chunks and not in others."""
    for out in ("int64", "int8"):
        kw = _example((2,), m=5, length=20000, n=272, bits=bits, mode="sqrt2", frac_bits=frac_bits, vt=vt, out=out,
                      seed=3)
        kw["codes"][..., ::7] = 0  # code 0: the largest weight, in every chunk
        kw["codes"][..., 1, :15420] = 0  # row 1: no deep code in the first chunk
        kw["codes"][..., 2, 15420:] = 2**bits - 1  # row 2: only the zero code in the second chunk
        same("log2_attn_matmul", kw)


def test_log2_leading_dims_must_match():
    codes = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(ValueError, match="leading dimensions"):
        ops.log2_attn_matmul(codes, np.zeros((3, 4, 5), np.uint8), backend="reference")
    with pytest.raises(ValueError, match="3-D"):
        ops.log2_attn_matmul(codes, np.zeros((4, 5), np.uint8), backend="reference")
    with pytest.raises(ValueError, match="at least 2-D"):
        ops.log2_attn_matmul(np.zeros(3, np.uint8), np.zeros((3, 5), np.uint8), backend="reference")


@pytest.mark.needs_cuda_simt
@pytest.mark.parametrize("kw", LOG2_EDGES, ids=[f"edge{i}" for i in range(len(LOG2_EDGES))])
def test_log2_batched_cuda_on_simt_equals_reference(kw):
    """The CUDA backend's batched form (one 2-D launch per leading index), run on the host SIMT emulator."""
    from pyqsim.backends import cuda as cuda_backend
    ref = ops.log2_attn_matmul(**kw, backend="reference")
    with cuda_backend.simulated():
        got = ops.log2_attn_matmul(**kw, backend="cuda")
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert np.array_equal(got, ref)


# ------------------------------------------------------------------------------------------ int_bmm (§4.3)


def _bmm_edge(lead, m, n, k, at=np.uint8, bt=np.uint8, za=0, zb=0, fill=None, seed=0, out="int32"):
    rng = np.random.default_rng(seed)

    def draw(t, shape):
        if fill is not None:
            return np.full(shape, fill[0] if t == np.uint8 else fill[1], t)
        return rng.integers(0, 256, shape).astype(t) if t == np.uint8 else rng.integers(-128, 128, shape).astype(t)
    kw = dict(a=draw(at, (*lead, m, k)), b=draw(bt, (*lead, n, k)), a_zero_point=za, b_zero_point=zb, out_dtype=out)
    if out == "float32":
        kw["out_scale"] = np.float32(2.0**-20)
    elif out != "int32":
        kw.update(multiplier=2**30, shift=40, out_zero_point=0)
    return kw


BMM_EDGES = [
    _bmm_edge((), 5, 7, 9), _bmm_edge((0,), 3, 3, 3), _bmm_edge((2, 0, 1), 3, 3, 3), _bmm_edge((2, 3), 17, 33, 65),
    _bmm_edge((2,), 4, 5, 0, out="int8"), _bmm_edge((1,), 0, 5, 4), _bmm_edge((3,), 4, 0, 4),
    _bmm_edge((2,), 9, 16, 64, at=np.int8, bt=np.int8, fill=(0, -128), za=127, zb=127, out="float32"),
    # K at the §4.1 bound for uint8 x uint8 with zero points 0: 33025 * 255 * 255 = 2^31 - 32767
    _bmm_edge((1,), 2, 3, 33025, fill=(255, 0), out="uint4"),
    _bmm_edge((2,), 2, 3, 33025, fill=(255, 0)),
]


@example(kw=BMM_EDGES[0])
@given(kw=S.bmm_cases())
def test_bmm_reference_equals_exact_loop(kw):
    """The reference's batched NumPy form == Python integer sums per leading index (the §4.3 definition)."""
    y = ops.int_bmm(**kw, backend="reference")
    a, b = kw["a"].astype(object), kw["b"].astype(object)
    acc = np.zeros(y.shape, object)
    for i in np.ndindex(*a.shape[:-2]):
        acc[i] = (a[i] - kw["a_zero_point"]).dot((b[i] - kw["b_zero_point"]).T) if a.shape[-1] else 0
    kind, n = kw["out_dtype"], y.shape[-1]
    if kind == "int32":
        expect = acc
    elif kind == "float32":  # §6: fl32(fl32(acc) * scale[n])
        sc = np.broadcast_to(np.asarray(kw["out_scale"], np.float32), (n,))
        expect = np.zeros(y.shape, object)
        for i in np.ndindex(*y.shape):
            expect[i] = np.float32(np.float32(acc[i]) * sc[i[-1]])
    else:  # §6: clamp(((acc * M0 + 2^(S-1)) >> S) + zy)
        lo, hi = C.RANGES[kind]
        mult = np.broadcast_to(np.asarray(kw["multiplier"]), (n,))
        shift = np.broadcast_to(np.asarray(kw["shift"]), (n,))
        expect = np.zeros(y.shape, object)
        for i in np.ndindex(*y.shape):
            s_ = int(shift[i[-1]])
            q = (int(acc[i]) * int(mult[i[-1]]) + (1 << (s_ - 1))) >> s_
            expect[i] = min(max(q + kw["out_zero_point"], lo), hi)
    assert y.tolist() == expect.tolist()


@pytest.mark.needs_cpu_ext
@FIXTURE_OK
@given(kw=S.bmm_cases())
def test_bmm_cpu_equals_reference(isa, kw):
    same("int_bmm", kw)


def _row_view(data, x: np.ndarray, columns: bool = True) -> np.ndarray:
    """``x`` laid out in a wider buffer: its axes in a drawn memory order whose innermost is the last axis (C-contiguous
    rows) or, with ``columns``, the row axis (C-contiguous columns: the transpose of such a view, as keys are for
    q @ k), the innermost padded with junk, or (negative strides, copied by the checks) its rows reversed; a view
    equal to ``x``."""
    nd = x.ndim
    inner = data.draw(st.sampled_from([nd - 1, nd - 2] if columns else [nd - 1]))
    order = list(data.draw(st.permutations([i for i in range(nd) if i != inner]))) + [inner]
    pad = data.draw(st.integers(0, 3))
    buf = np.full([x.shape[i] for i in order[:-1]] + [x.shape[inner] + pad], 77, x.dtype)
    view = buf[..., :x.shape[inner]].transpose(np.argsort(order))
    if data.draw(st.booleans()):
        view = view[..., ::-1, :]
        view[...] = x[..., ::-1, :]
        return view[..., ::-1, :]
    view[...] = x
    return view


@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("shape", [(2, 3, 37, 45), (1, 16, 16), (5, 64, 19), (3, 1, 70), (2, 70, 1)])
def test_bmm_transposed_operands(isa, shape):
    """Operands with contiguous columns go through the native tiled transpose (16 x 16 tiles and scalar edges): the
    reference's result, bit for bit."""
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = rng.integers(-128, 128, shape[:-2] + (shape[-2] + 3, shape[-1]), dtype=np.int8)
    kw = dict(a_zero_point=131, b_zero_point=-5, out_dtype="int32")
    want = ops.int_bmm(a, b, **kw, backend="reference")
    at = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    bt = np.ascontiguousarray(np.swapaxes(b, -1, -2)).swapaxes(-1, -2)
    assert not at.flags.c_contiguous or min(shape[-2:]) == 1
    assert np.array_equal(ops.int_bmm(at, bt, **kw, backend="cpu"), want)
    v = rng.integers(0, 256, shape[:-2] + (shape[-1], 24), dtype=np.uint8)
    codes = rng.integers(0, 16, shape, dtype=np.uint8)
    vt = np.ascontiguousarray(np.swapaxes(v, -1, -2)).swapaxes(-1, -2)
    lk = dict(v_zero_point=128, bits=4, mode="sqrt2", out_dtype="float32", out_scale=0.5)
    assert np.array_equal(ops.log2_attn_matmul(codes, vt, **lk, backend="cpu"),
                          ops.log2_attn_matmul(codes, v, **lk, backend="reference"))


@pytest.mark.needs_cpu_ext
@FIXTURE_OK
@given(data=st.data(), kw=S.bmm_cases())
def test_bmm_reads_row_views(isa, data, kw):
    """Operands whose rows are C-contiguous (heads of a fused qkv, transposed keys) are read in place: the same
    result as their contiguous copies, on every backend."""
    want = ops.int_bmm(**kw, backend="reference")
    views = dict(kw, a=_row_view(data, kw["a"]), b=_row_view(data, kw["b"]))
    assert np.array_equal(same("int_bmm", views), want)


@pytest.mark.needs_cpu_ext
@FIXTURE_OK
@given(data=st.data(), kw=S.log2_cases(max_dim=24, lead=S.lead_shapes()))
def test_log2_reads_row_views(isa, data, kw):
    want = ops.log2_attn_matmul(**kw, backend="reference")
    views = dict(kw, codes=_row_view(data, kw["codes"]), v=_row_view(data, kw["v"]))
    assert np.array_equal(same("log2_attn_matmul", views), want)


@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("kw", BMM_EDGES, ids=[f"edge{i}" for i in range(len(BMM_EDGES))])
def test_bmm_edges(isa, kw):
    same("int_bmm", kw)


def test_bmm_rejects_k_beyond_the_bound():
    kw = _bmm_edge((1,), 1, 1, 33026, fill=(255, 0))
    with pytest.raises(ValueError, match="int_bmm.*K=33026"):
        ops.int_bmm(**kw, backend="reference")


# ------------------------------------------------------------------------------------------ packed weights (§4.4)


def _pack(kw, name="w", kind="gemm", k=None, groups=1, cin=None):
    """Move the weight, its format and zero point of a kwargs dict into a PackedWeight handle."""
    kw = dict(kw)
    fmt = kw.pop(f"{name}_format")
    h = ops.pack_weight(kw[name], w_format=fmt, w_zero_point=kw.pop(f"{name}_zero_point"), kind=kind, k=k,
                        kernel_size=kw.get("kernel_size"), groups=groups, cin_per_group=cin)
    kw[name] = h
    return kw


def _same_packed(op, kw, packed):
    fn = getattr(ops, op)
    ref = fn(**kw, backend="reference")
    for be in ["reference"] + (["cpu"] if "cpu" in ops.available_backends() else []):
        got = fn(**packed, backend=be)
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref), be


@given(kw=S.gemm_cases(max_dim=40))
def test_packed_gemm_equals_plain(kw):
    _same_packed("int_gemm", kw, _pack(kw, k=kw["x"].shape[1]))


@given(kw=S.conv_cases())
def test_packed_conv_equals_plain(kw):
    g = kw["groups"]
    _same_packed("int_conv2d", kw, _pack(kw, kind="conv", groups=g, cin=kw["x"].shape[1] // g))


@given(kw=S.split_gemm_cases())
def test_packed_split_gemm_equals_plain(kw):
    packed = _pack(_pack(kw, "w1", k=kw["x1"].shape[1]), "w2", k=kw["x2"].shape[1])
    _same_packed("split_gemm", kw, packed)


@given(kw=S.split_conv_cases())
def test_packed_split_conv_equals_plain(kw):
    packed = _pack(_pack(kw, "w1", kind="conv", cin=kw["x1"].shape[1]), "w2", kind="conv", cin=kw["x2"].shape[1])
    _same_packed("split_conv2d", kw, packed)


def test_packed_weight_checks():
    w = np.zeros((3, 4), np.int8)
    h = ops.pack_weight(w, w_zero_point=2, backend="reference")
    assert h.native == {} and h.k == 4 and h.n == 3 and "gemm int8 3x4" in repr(h)
    with pytest.raises(ValueError, match="has K=4, the activations have K=5"):
        ops.int_gemm(np.zeros((2, 5), np.int8), h, backend="reference")
    with pytest.raises(ValueError, match="pass it to pack_weight"):
        ops.int_gemm(np.zeros((2, 4), np.int8), h, w_zero_point=2, backend="reference")
    hc = ops.pack_weight(np.zeros((4, 2, 3, 3), np.int8), kind="conv", groups=2, backend="reference")
    with pytest.raises(ValueError, match="groups=1 disagrees"):
        ops.int_conv2d(np.zeros((1, 2, 5, 5), np.int8), hc, backend="reference")
    with pytest.raises(ValueError, match="packed conv weight, expected a gemm weight"):
        ops.int_gemm(np.zeros((2, 4), np.int8), hc, backend="reference")


_STAGE_KEYS = ("out_dtype", "multiplier", "shift", "out_zero_point", "out_scale")


def _with_stage(kw, n):
    """kw with its output-stage keywords replaced by one ops.output_stage handle."""
    stage = ops.output_stage(n, **{k: kw[k] for k in _STAGE_KEYS if k in kw}, numerics=kw.get("numerics", "pyqsim"))
    return dict({k: v for k, v in kw.items() if k not in _STAGE_KEYS}, out_dtype=stage)


@given(kw=S.gemm_cases(max_dim=40))
def test_output_stage_handle_gemm(kw):
    """An output stage validated once (ops.output_stage) gives the op's result with the keywords, on every backend."""
    _same_packed("int_gemm", kw, _with_stage(kw, kw["w"].shape[0]))


@given(kw=S.conv_cases())
def test_output_stage_handle_conv(kw):
    _same_packed("int_conv2d", kw, _with_stage(kw, kw["w"].shape[0]))


@given(kw=S.bmm_cases())
def test_output_stage_handle_bmm(kw):
    _same_packed("int_bmm", kw, _with_stage(kw, kw["b"].shape[-2]))


@given(kw=S.log2_cases(max_dim=24, lead=S.lead_shapes()))
def test_output_stage_handle_log2(kw):
    _same_packed("log2_attn_matmul", kw, _with_stage(kw, kw["v"].shape[-1]))


@pytest.mark.needs_cpu_ext
@FIXTURE_OK
@given(data=st.data(), kw=S.log2_cases(max_dim=24, lead=S.lead_shapes()))
def test_log2_writes_into_out(isa, data, kw):
    """``out`` (any layout with C-contiguous rows: a heads-last buffer seen as [B, H, L, d], padded rows) receives
    exactly the result the op returns without it, and is returned, on every backend."""
    want = ops.log2_attn_matmul(**kw, backend="reference")
    for backend in ("reference", "cpu"):
        out = _row_view(data, np.zeros_like(want), columns=False)
        out.fill(0)
        got = ops.log2_attn_matmul(**kw, out=out, backend=backend)
        assert got is out and np.array_equal(out, want), backend
