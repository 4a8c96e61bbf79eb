"""CUDA backend == reference, bit for bit: NumPy inputs (copied to and from the device) and PyTorch CUDA tensors.

Tolerance policy: none. Every result is compared exactly: same dtype, same shape, equal values
(``np.array_equal``), and float32 results by their bit patterns as well. Integer stages are exact by construction
(spec §4.1, §6, §7). The float32 stage is ``fl32(fl32(acc) * scale)`` (split ops: the sum of two such products),
each operation correctly rounded and never contracted into an FMA (spec §6, §8, §9), so the device returns the
same bits as NumPy; ``test_split_float32_is_not_fma_contracted`` targets the contraction directly.

Targets: every test runs on the GPU (skipped without one) and again on the host SIMT emulator (``pyqsim._cuda_simt``:
the same kernel sources with every CUDA thread emulated on the CPU, docs/spec.md §13), except those marked
``gpu_only``: PyTorch CUDA tensors and streams exist only on a device, and a few sizes take too long emulated.

Coverage (one CUDA path, so no ISA fixture as in test_cpu_ops.py):
  * Hypothesis properties for the six kernel ops on NumPy inputs (shared strategies), and a GEMM property whose
    dimensions cross the 128 x 128 thread-block tile;
  * the same properties on PyTorch CUDA tensors, with only the activation (x / x1 / codes / acc) or every array
    argument on the device: the result is a tensor on that device with the matching dtype;
  * tile tails of the GPU tiling (M, N around 16/64/128/256; K around the 16-byte chunks and the K tile 64; both
    K % 16 load paths; 4-bit rows of ceil(K/2) bytes) and zero-size dimensions;
  * extremes: constant codes with zero points at lo/mid/hi, K at the §4.1 bound and one past it, shifts 1..94,
    rounding ties, float32 rounding of large accumulators;
  * conv: groups (depthwise included), stride/padding/dilation, padding = zero point, UNet-like 3x3, 1x1, the
    DeiT-S patch embedding; split GEMM/conv with mixed formats; log2 attention deep codes and L at its int64 bound;
  * streams: the op runs in stream order on the caller's current stream;
  * large GEMMs (1024^3, DeiT-S shapes) against the reference; 4096^3 against an exact float64 oracle (``slow``);
  * interop: device tensors given to the reference/cpu backends, non-contiguous and misaligned device tensors,
    ``backend="auto"``, argument errors for device tensors, weights mutated in place between calls.

Contract assumed (the CUDA backend's): NumPy in -> NumPy out; a CUDA tensor as the activation -> a tensor of the
same kind on the same device, computed on ``torch.cuda.current_stream()`` without waiting for other streams;
weights and the other arrays may be NumPy arrays or CUDA tensors; the op layer validates device tensors as it
does NumPy arrays (dtype, shapes, §4.1) and copies them to the host for the reference and cpu backends.
torch is imported inside the tests only, never at module import.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import strategies as S
from pyqsim import _checks as C
from pyqsim import ops

from pyqsim.backends import cuda as cuda_backend

# PyTorch CUDA tensors exist only on a real device: such tests are GPU-only.
TORCH_ON_GPU = [pytest.mark.needs_torch, pytest.mark.gpu_only]


def needs_torch(test):
    for mark in TORCH_ON_GPU:
        test = mark(test)
    return test



@pytest.fixture(scope="module", autouse=True, params=[
    pytest.param("gpu", marks=[pytest.mark.needs_cuda_build, pytest.mark.needs_gpu]),
    pytest.param("simt", marks=pytest.mark.needs_cuda_simt)])
def cuda_target(request):
    """Every test runs on the GPU and again on the host SIMT emulator (the same kernel sources, docs/spec.md
    §13); tests marked ``gpu_only`` (device tensors, streams, large shapes) run on the GPU alone."""
    if request.param == "simt":
        with cuda_backend.simulated():
            yield request.param
    else:
        yield request.param

DEVICE = "cuda"  # torch device of the interop tests (the current CUDA device)

# GPU tiling: thread-block tile 128 x 128 (M x N), K tile 64, K loaded in 16-byte chunks.
MN_TAILS = [1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257]
K_TAILS = [1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200]
FORMATS = ("int8", "int4", "uint4")
ACTS = ("uint8", "int8")

# The argument whose kind (NumPy / CUDA tensor) decides the kind of the result.
PRIMARY = {"int_gemm": "x", "int_conv2d": "x", "split_gemm": "x1", "split_conv2d": "x1",
           "log2_attn_matmul": "codes", "requantize": "acc"}
STRATEGIES = {"int_gemm": S.gemm_cases, "int_conv2d": S.conv_cases, "split_gemm": S.split_gemm_cases,
              "split_conv2d": S.split_conv_cases, "log2_attn_matmul": S.log2_cases, "requantize": S.requant_cases}

VIA = ["numpy", pytest.param("torch", marks=TORCH_ON_GPU)]
HOST_BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.needs_cpu_ext)]

# A quarter of the profile's examples for the properties whose single example is larger.
FEWER = settings(max_examples=max(5, settings().max_examples // 4))


# ------------------------------------------------------------------------------------------ comparison


def _host(y) -> np.ndarray:
    """A result as a NumPy array (a torch tensor is copied back: synchronize its stream first)."""
    return y if isinstance(y, np.ndarray) else y.cpu().numpy()


def assert_same(got: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    """Identical dtype, shape and values; float results identical bit for bit."""
    assert isinstance(got, np.ndarray), (what, type(got))
    assert got.dtype == ref.dtype, (what, got.dtype, ref.dtype)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    g, r = got, ref
    if ref.dtype.kind == "f":
        bits = np.dtype(f"u{ref.dtype.itemsize}")
        g, r = np.ascontiguousarray(got).view(bits), np.ascontiguousarray(ref).view(bits)
    if not np.array_equal(g, r):
        bad = np.argwhere(g != r)
        i = tuple(int(j) for j in bad[0])
        raise AssertionError(f"{what}: {len(bad)} of {ref.size} elements differ; first at {i}: "
                             f"got {got[i]!r}, reference {ref[i]!r}")


def reference(op: str, kw: dict) -> np.ndarray:
    return getattr(ops, op)(**kw, backend="reference")


def same(op: str, kw: dict, what: str = "") -> np.ndarray:
    """NumPy in, NumPy out: the CUDA backend returns the reference's array exactly."""
    ref = reference(op, kw)
    got = getattr(ops, op)(**kw, backend="cuda")
    assert isinstance(got, np.ndarray), f"{op}: NumPy inputs must give a NumPy result, got {type(got)}"
    assert_same(got, ref, what or op)
    return got


# ------------------------------------------------------------------------------------------ torch interop


def _torch():
    import torch
    return torch


def to_dev(torch, a: np.ndarray):
    """A CUDA tensor holding a copy of NumPy array ``a``."""
    return torch.from_numpy(np.array(a, order="C", copy=True)).to(DEVICE)


def on_device(torch, kw: dict, keys=None) -> dict:
    """``kw`` with the arrays named in ``keys`` (default: every array of rank >= 1) as CUDA tensors."""
    out = dict(kw)
    for key, v in kw.items():
        if isinstance(v, np.ndarray) and v.ndim >= 1 and (keys is None or key in keys):
            out[key] = to_dev(torch, v)
    return out


def check_device_result(torch, got, like, ref: np.ndarray, what: str):
    """``got`` is a tensor on ``like``'s device with the reference's dtype and values."""
    assert isinstance(got, torch.Tensor), f"{what}: a CUDA tensor input must give a tensor, got {type(got)}"
    assert got.device == like.device, (what, got.device, like.device)
    assert got.dtype == getattr(torch, ref.dtype.name), (what, got.dtype, ref.dtype)
    assert_same(_host(got), ref, what)


def same_torch(op: str, kw: dict, placement: str = "act"):
    """The activation (``placement="act"``) or every array (``"all"``) as CUDA tensors: a tensor result on the
    same device equal to the reference on the NumPy arguments; the device inputs are left unchanged."""
    torch = _torch()
    ref = reference(op, kw)
    dkw = on_device(torch, kw, [PRIMARY[op]] if placement == "act" else None)
    got = getattr(ops, op)(**dkw, backend="cuda")
    check_device_result(torch, got, dkw[PRIMARY[op]], ref, f"{op} ({placement} on the device)")
    for key, v in dkw.items():
        if isinstance(v, torch.Tensor):
            assert np.array_equal(_host(v), kw[key]), f"{op} wrote to its input {key}"
    return got


def check(via: str, op: str, kw: dict, what: str = ""):
    """``same`` for NumPy inputs, ``same_torch`` with every array on the device for ``via="torch"``."""
    if via == "numpy":
        return same(op, kw, what)
    return same_torch(op, kw, "all")


def _busy(torch, cycles: int) -> None:
    """Keep the current stream busy for about ``cycles`` GPU clocks."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(int(cycles))


# ------------------------------------------------------------------------------------------ argument builders


def weights(rng, fmt: str, n: int, k_shape: tuple) -> np.ndarray:
    """Random ``fmt`` weights [n, *k_shape]: int8 as is, 4-bit codes packed by rows [n, ceil(prod(k_shape)/2)]."""
    lo, hi = C.RANGES[fmt]
    wc = rng.integers(lo, hi + 1, (n, *k_shape)).astype(C.CONTAINERS[fmt])
    if fmt == "int8":
        return wc
    return ops.pack_int4(wc.reshape(n, int(np.prod(k_shape))), fmt == "int4", backend="reference")


def out_stage(rng, out: str, n: int, k: int, kw: dict) -> dict:
    """Add a random output stage for ``n`` channels; requantization scales keep typical outputs in range."""
    kw["out_dtype"] = out
    if out in C.REQUANT_OUT:
        real = 0.01 / np.sqrt(max(k, 1)) * rng.uniform(0.25, 4.0, n)
        m0, s = ops.quantize_multiplier(real, backend="reference")
        kw.update(multiplier=m0, shift=s, out_zero_point=C.RANGES[out][0] + 3)
    elif out == "float32":
        kw["out_scale"] = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
    return kw


def gemm_kw(m, n, k, xt="uint8", fmt="int8", seed=0, out="int32", zx=None, zw=None, bias=True) -> dict:
    rng = np.random.default_rng(seed)
    lo, hi = C.RANGES[xt]
    kw = dict(x=rng.integers(lo, hi + 1, (m, k), dtype=C.CONTAINERS[xt]), w=weights(rng, fmt, n, (k,)),
              w_format=fmt, x_zero_point=(lo + hi + 1) // 2 if zx is None else zx,
              w_zero_point=0 if zw is None else zw)
    if bias:
        kw["bias"] = rng.integers(-5000, 5000, n, dtype=np.int32)
    return out_stage(rng, out, n, k, kw)


def conv_kw(b, c, hw, o, ks=(3, 3), *, groups=1, stride=1, padding=0, dilation=1, xt="uint8", fmt="int8",
            out="int32", seed=0, zx=None) -> dict:
    rng = np.random.default_rng(seed)
    lo, hi = C.RANGES[xt]
    wlo, whi = C.RANGES[fmt]
    cg = c // groups
    kw = dict(x=rng.integers(lo, hi + 1, (b, c, *hw), dtype=C.CONTAINERS[xt]), w=weights(rng, fmt, o, (cg, *ks)),
              w_format=fmt, kernel_size=ks, stride=stride, padding=padding, dilation=dilation, groups=groups,
              x_zero_point=(lo + hi + 1) // 2 if zx is None else zx,
              w_zero_point=rng.integers(wlo, whi + 1, o).astype(np.int32),
              bias=rng.integers(-5000, 5000, o, dtype=np.int32))
    return out_stage(rng, out, o, cg * ks[0] * ks[1], kw)


def _split_branches(rng, kw, shapes, fmts, xts):
    """x1/x2 (shapes[i][0]), w1/w2 (shapes[i][1] as (n, *k_shape)), zero points and formats of both branches."""
    for i, (xshape, wshape), fmt, xt in zip(("1", "2"), shapes, fmts, xts):
        lo, hi = C.RANGES[xt]
        wlo, whi = C.RANGES[fmt]
        kw[f"x{i}"] = rng.integers(lo, hi + 1, xshape, dtype=C.CONTAINERS[xt])
        kw[f"w{i}"] = weights(rng, fmt, wshape[0], wshape[1:])
        kw[f"x{i}_zero_point"] = int(rng.integers(lo, hi + 1))
        kw[f"w{i}_zero_point"] = rng.integers(wlo, whi + 1, wshape[0]).astype(np.int32)
        kw[f"w{i}_format"] = fmt
    return kw


def split_out_stage(rng, out: str, n: int, k: int, kw: dict) -> dict:
    kw["out_dtype"] = out
    if out == "float32":
        kw["out_scale1"] = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
        kw["out_scale2"] = rng.uniform(1e-4, 1e-2, n).astype(np.float32)
    else:
        real = 0.01 / np.sqrt(max(k, 1))
        m1, m2, s = ops.quantize_multiplier_pair(real * rng.uniform(0.25, 4.0, n), real * rng.uniform(0.25, 4.0, n),
                                                 backend="reference")
        kw.update(multiplier1=m1, multiplier2=m2, shift=s, out_zero_point=C.RANGES[out][0] + 3)
    return kw


def split_gemm_kw(m, n, k1, k2, fmt1="int8", fmt2="int4", xt1="uint8", xt2="int8", out="int8", seed=0) -> dict:
    rng = np.random.default_rng(seed)
    kw = _split_branches(rng, {}, [((m, k1), (n, k1)), ((m, k2), (n, k2))], (fmt1, fmt2), (xt1, xt2))
    kw["bias"] = rng.integers(-5000, 5000, n, dtype=np.int32)
    return split_out_stage(rng, out, n, k1 + k2, kw)


def split_conv_kw(b, c1, c2, hw, o, ks=(3, 3), *, stride=1, padding=1, dilation=1, fmt1="int8", fmt2="uint4",
                  xt1="uint8", xt2="int8", out="int8", seed=0) -> dict:
    rng = np.random.default_rng(seed)
    kw = _split_branches(rng, dict(kernel_size=ks, stride=stride, padding=padding, dilation=dilation),
                         [((b, c1, *hw), (o, c1, *ks)), ((b, c2, *hw), (o, c2, *ks))], (fmt1, fmt2), (xt1, xt2))
    kw["bias"] = rng.integers(-5000, 5000, o, dtype=np.int32)
    return split_out_stage(rng, out, o, (c1 + c2) * ks[0] * ks[1], kw)


def log2_kw(m, length, n, bits=4, mode="sqrt2", frac_bits=16, vt="uint8", out="int64", seed=0) -> dict:
    rng = np.random.default_rng(seed)
    lo, hi = C.RANGES[vt]
    kw = dict(codes=rng.integers(0, 2**bits, (m, length), dtype=np.uint8),
              v=rng.integers(lo, hi + 1, (length, n), dtype=C.CONTAINERS[vt]),
              v_zero_point=int(rng.integers(lo, hi + 1)), bits=bits, mode=mode, frac_bits=frac_bits, out_dtype=out)
    if out == "float32":
        kw["out_scale"] = (2.0**-(frac_bits + 16) * rng.uniform(1e-3, 1e-1, n)).astype(np.float32)
    elif out in C.REQUANT_OUT:
        real = 2.0**-(frac_bits + 16) * rng.uniform(1e-3, 1e-1, n) / np.sqrt(max(length, 1))
        m0, s = ops.quantize_multiplier(real, backend="reference")
        kw.update(multiplier=m0, shift=s, out_zero_point=C.RANGES[out][0] + 1)
    return kw


def requant_kw(shape, axis, out="int8", seed=0) -> dict:
    rng = np.random.default_rng(seed)
    n = shape[axis]
    shift = rng.integers(1, 95, n).astype(np.int32)
    shift[: n // 2] = rng.integers(30, 45, n // 2)  # half the channels give in-range outputs
    return dict(acc=rng.integers(-2**31, 2**31 - 1, shape, dtype=np.int64).astype(np.int32),
                multiplier=rng.integers(0, 2**31 - 1, n).astype(np.int32), shift=shift,
                zero_point=C.RANGES[out][0] + 1, out_dtype=out, axis=axis)


# Small representative arguments of each op (interop tests).
FIXED = {
    "int_gemm": lambda: gemm_kw(33, 130, 70, fmt="int4", out="int8", zw=np.arange(130, dtype=np.int32) % 9 - 4),
    "int_conv2d": lambda: conv_kw(2, 6, (7, 9), 8, groups=2, padding=1, stride=(1, 2), fmt="uint4", out="float32"),
    "split_gemm": lambda: split_gemm_kw(17, 40, 33, 20, "int8", "uint4", out="int8"),
    "split_conv2d": lambda: split_conv_kw(2, 3, 5, (6, 7), 9, fmt1="int4", fmt2="int8", out="float32"),
    "log2_attn_matmul": lambda: log2_kw(20, 70, 33, bits=5, mode="sqrt2", vt="int8", out="int8"),
    "requantize": lambda: requant_kw((3, 40, 5), 1, "int4"),
}


# ------------------------------------------------------------------------------------------ properties (NumPy)


@given(kw=S.gemm_cases())
@example(kw=gemm_kw(129, 65, 17, fmt="int4", out="uint8"))
@example(kw=gemm_kw(1, 257, 200, xt="int8", fmt="uint4", out="float32"))
@example(kw=gemm_kw(0, 3, 5, out="int8"))
@S.at_shift_edges("int_gemm")
def test_int_gemm_equals_reference(kw):
    same("int_gemm", kw)


@FEWER
@given(kw=S.gemm_cases(max_dim=300))
@example(kw=gemm_kw(257, 129, 65, xt="int8", fmt="int4", out="int4"))
def test_int_gemm_across_thread_block_tiles_equals_reference(kw):
    same("int_gemm", kw)


@given(kw=S.conv_cases())
@example(kw=conv_kw(2, 6, (9, 11), 9, groups=3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), fmt="int4",
                    out="uint8"))
@example(kw=conv_kw(1, 4, (5, 5), 2, ks=(1, 1), xt="int8", fmt="uint4", out="float32"))
@S.at_shift_edges("int_conv2d")
def test_int_conv2d_equals_reference(kw):
    same("int_conv2d", kw)


@given(kw=S.split_gemm_cases())
@example(kw=split_gemm_kw(130, 33, 17, 64, "uint4", "int8", out="float32"))
@example(kw=split_gemm_kw(5, 7, 0, 9, "int4", "int4", out="uint4"))
@S.at_shift_edges("split_gemm")
def test_split_gemm_equals_reference(kw):
    same("split_gemm", kw)


@given(kw=S.split_conv_cases())
@example(kw=split_conv_kw(2, 3, 4, (7, 6), 5, stride=2, fmt1="int4", fmt2="uint4", out="int8"))
@S.at_shift_edges("split_conv2d")
def test_split_conv2d_equals_reference(kw):
    same("split_conv2d", kw)


@given(kw=S.log2_cases())
@example(kw=log2_kw(129, 65, 17, bits=8, mode="sqrt2", frac_bits=24, out="int64"))
@example(kw=log2_kw(3, 40, 5, bits=6, mode="log2", frac_bits=0, vt="int8", out="float32"))
@S.at_shift_edges("log2_attn_matmul")
def test_log2_attn_matmul_equals_reference(kw):
    same("log2_attn_matmul", kw)


@given(kw=S.requant_cases())
@example(kw=requant_kw((2, 130, 3), 1, "uint4"))
@example(kw=requant_kw((257,), 0, "int8"))
@S.at_shift_edges("requantize")
def test_requantize_equals_reference(kw):
    same("requantize", kw)


# ------------------------------------------------------------------------------------------ properties (torch)


# ------------------------------------------------------------------------------------------ numerics profiles (§14)

RUNTIME_PROFILES = ["tflite", "tflite-single", "onnxruntime", "fbgemm"]
OUT_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}
REALS = st.one_of(st.floats(2.0**-31, 2.0**29), st.sampled_from([0.5, 0.25, 1.0, 3.0, 2.0**-31]))


def profile_stage(data, numerics: str, n: int) -> dict:
    """Output-stage keywords of a runtime profile: quantize_multiplier of drawn real scales, a drawn zero point."""
    reals = data.draw(hnp.arrays(np.float64, n, elements=REALS), label="reals")
    out = data.draw(st.sampled_from(sorted(OUT_RANGE)), label="out")
    m, s = ops.quantize_multiplier(reals, numerics=numerics)
    return dict(out_dtype=out, multiplier=m, shift=s, out_zero_point=data.draw(st.integers(*OUT_RANGE[out])),
                numerics=numerics)


@pytest.mark.parametrize("numerics", RUNTIME_PROFILES)
@given(acc=hnp.arrays(np.int32, st.tuples(st.integers(0, 3), st.integers(1, 20), st.integers(0, 5)),
                      elements=st.integers(-(2**31), 2**31 - 1)), data=st.data())
def test_requantize_profiles_equal_reference(numerics, acc, data):
    """Every int32 accumulator, wrapping and saturating steps included, through the profile's stage on device."""
    kw = profile_stage(data, numerics, acc.shape[1])
    kw["zero_point"] = kw.pop("out_zero_point")
    same("requantize", dict(acc=acc, axis=1, **kw), f"requantize numerics={numerics}")


@pytest.mark.parametrize("numerics", RUNTIME_PROFILES)
@pytest.mark.parametrize("zy", [-128, 0, 127])
def test_requantize_profiles_at_accumulator_extremes(numerics, zy):
    """int32 extremes with the smallest, a middle and a large scale: the stage's wrapping and saturating steps."""
    acc = np.array([[[-(2**31)], [2**31 - 1], [0]], [[-1], [1], [2**30]]], np.int32)
    m, s = ops.quantize_multiplier(np.array([0.5, 2.0**-31, 3.0]), numerics=numerics)
    same("requantize", dict(acc=acc, multiplier=m, shift=s, zero_point=zy, out_dtype="int8", axis=1,
                            numerics=numerics), f"requantize numerics={numerics} zy={zy}")


@pytest.mark.parametrize("numerics", RUNTIME_PROFILES)
@FEWER
@given(m=st.integers(0, 70), n=st.integers(1, 40), k=st.integers(1, 80), data=st.data())
def test_int_gemm_profiles_equal_reference(numerics, m, n, k, data):
    """The exact int32 GEMM on device, then the profile's stage (csrc/numerics.h, as on the CPU)."""
    x = data.draw(hnp.arrays(np.uint8, (m, k)), label="x")
    w = data.draw(hnp.arrays(np.int8, (n, k)), label="w")
    kw = dict(x=x, w=w, x_zero_point=data.draw(st.integers(0, 255)), **profile_stage(data, numerics, n))
    same("int_gemm", kw, f"int_gemm numerics={numerics}")


@pytest.mark.parametrize("numerics", RUNTIME_PROFILES)
@FEWER
@given(b=st.integers(1, 2), c=st.integers(1, 6), hw=st.integers(1, 7), o=st.integers(1, 9), data=st.data())
def test_int_conv2d_profiles_equal_reference(numerics, b, c, hw, o, data):
    x = data.draw(hnp.arrays(np.uint8, (b, c, hw, hw)), label="x")
    w = data.draw(hnp.arrays(np.int8, (o, c, 3, 3)), label="w")
    kw = dict(x=x, w=w, padding=1, x_zero_point=data.draw(st.integers(0, 255)), **profile_stage(data, numerics, o))
    same("int_conv2d", kw, f"int_conv2d numerics={numerics}")


@needs_torch
@pytest.mark.parametrize("placement", ["act", "all"])
@pytest.mark.parametrize("op", sorted(STRATEGIES))
@given(data=st.data())
def test_torch_cuda_inputs_equal_reference(op, placement, data):
    """A CUDA tensor activation gives a CUDA tensor equal to the reference (weights on the host or the device)."""
    same_torch(op, data.draw(STRATEGIES[op](), label="kw"), placement)


@needs_torch
@pytest.mark.parametrize("placement", ["act", "all"])
@pytest.mark.parametrize("op", sorted(FIXED))
def test_torch_cuda_fixed_cases(op, placement):
    same_torch(op, FIXED[op](), placement)


@needs_torch
@pytest.mark.parametrize("m,n,k", [(0, 5, 3), (5, 0, 3), (5, 3, 0), (0, 0, 0), (130, 0, 64)])
def test_torch_zero_size(m, n, k):
    for out in ("int32", "int8", "float32"):
        same_torch("int_gemm", gemm_kw(m, n, k, fmt="int4", out=out), "all")
    same_torch("log2_attn_matmul", log2_kw(m, k, n, out="int64"), "act")
    same_torch("int_conv2d", conv_kw(0, 4, (5, 5), n, padding=1, out="int8"), "all")


# ------------------------------------------------------------------------------------------ GEMM tile tails


@pytest.mark.parametrize("xt", ACTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", MN_TAILS)
def test_gemm_tile_tails_m(m, fmt, xt):
    for n, k in [(17, 1), (16, 33), (129, 64), (65, 17), (257, 200)]:
        same("int_gemm", gemm_kw(m, n, k, xt=xt, fmt=fmt, seed=m * 1000 + n, out="uint8"), f"M={m} N={n} K={k}")


@pytest.mark.parametrize("xt", ACTS)
@pytest.mark.parametrize("n", MN_TAILS)
def test_gemm_tile_tails_n(n, xt):
    for i, (m, k) in enumerate([(5, 3), (129, 31), (64, 128), (1, 65)]):
        fmt = FORMATS[i % 3]
        for out in ("int32", "int8", "float32", "uint4"):
            same("int_gemm", gemm_kw(m, n, k, xt=xt, fmt=fmt, seed=n + i, out=out), f"M={m} N={n} K={k} {fmt} {out}")


@pytest.mark.parametrize("xt", ACTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", K_TAILS)
def test_gemm_tile_tails_k(k, fmt, xt):
    for m, n in [(6, 19), (129, 130)]:
        zw = (np.arange(n) % 7 - (0 if fmt == "uint4" else 3)).astype(np.int32)
        same("int_gemm", gemm_kw(m, n, k, xt=xt, fmt=fmt, seed=k, zw=zw), f"M={m} N={n} K={k}")


CHUNK_K = sorted({16 * j + d for j in (1, 2, 3, 8, 16, 64) for d in (-2, -1, 0, 1, 2, 8)})


@pytest.mark.parametrize("k", CHUNK_K)
def test_gemm_k_chunk_load_paths(k):
    """K % 16 == 0 (whole 16-byte chunks, aligned rows) and not (row starts shift by K mod 16 bytes); packed 4-bit
    rows are ceil(K/2) bytes, so their chunks hold 32 codes and odd K leaves a padding nibble."""
    for i, fmt in enumerate(FORMATS):
        for xt in ACTS:
            same("int_gemm", gemm_kw(33, 40, k, xt=xt, fmt=fmt, seed=k + i, out="int8"), f"K={k} {fmt} {xt}")


@pytest.mark.parametrize("m,n,k", [(0, 5, 3), (5, 0, 3), (5, 3, 0), (0, 0, 0), (1, 1, 0), (0, 130, 64),
                                   (130, 0, 64), (129, 130, 0)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_zero_size(m, n, k, fmt):
    for out in ("int32", "int8", "float32", "uint4"):
        same("int_gemm", gemm_kw(m, n, k, fmt=fmt, out=out), f"{m}x{n}x{k} {out}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_long_k(fmt):
    """Many K tiles with odd M/N tails."""
    same("int_gemm", gemm_kw(70, 33, 3001, fmt=fmt, out="int8", zx=3, zw=np.arange(33, dtype=np.int32) % 5))
    same("int_gemm", gemm_kw(3, 130, 5000, xt="int8", fmt=fmt, out="int32"))


# ------------------------------------------------------------------------------------------ extremes


@pytest.mark.parametrize("wkind", ["lo", "hi", "zero"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("xt,xv", [("uint8", 0), ("uint8", 255), ("int8", -128), ("int8", 127), ("int8", 0)])
def test_gemm_constant_extremes(xt, xv, fmt, wkind):
    lo, hi = C.RANGES[xt]
    wlo, whi = C.RANGES[fmt]
    wv = {"lo": wlo, "hi": whi, "zero": max(wlo, 0)}[wkind]
    m, n, k = 130, 18, 70
    wc = np.full((n, k), wv, C.CONTAINERS[fmt])
    w = wc if fmt == "int8" else ops.pack_int4(wc, fmt == "int4", backend="reference")
    zw = np.array([wlo, whi, (wlo + whi + 1) // 2] * 6, np.int32)
    for zx in (lo, (lo + hi + 1) // 2, hi):
        same("int_gemm", dict(x=np.full((m, k), xv, C.CONTAINERS[xt]), w=w, w_format=fmt, x_zero_point=zx,
                              w_zero_point=zw, out_dtype="int32"), f"zx={zx}")


def test_gemm_alternating_extremes():
    """Extreme codes alternating along K (products of both signs at full magnitude, w = -128 included)."""
    x = np.zeros((4, 64), np.uint8)
    x[1] = 255
    x[2, ::2] = 0
    x[2, 1::2] = 255
    x[3, ::3] = 255
    w = np.full((16, 64), 127, np.int8)
    w[8:] = -128
    w[:, 1::2] = -127
    w[4:8, ::4] = -128
    for xt, xs in (("uint8", x), ("int8", (x.astype(np.int16) - 128).astype(np.int8))):
        for zx in C.RANGES[xt] + (C.RANGES[xt][0] + 128,):
            for out in ("int32", "int8", "float32"):
                kw = dict(x=xs, w=w, x_zero_point=zx, out_dtype=out)
                out_stage(np.random.default_rng(zx & 0xFF), out, 16, 64 * 16, kw)
                same("int_gemm", kw, f"{xt} zx={zx} {out}")


@pytest.mark.gpu_only  # K up to ~10^6: hours on the host SIMT emulator
@pytest.mark.parametrize("xt,zx,xv,fmt,zw,wv", [
    ("uint8", 0, 255, "int8", 0, -128),
    ("uint8", 0, 255, "int8", 0, 127),
    ("int8", 0, -128, "int8", 0, -128),
    ("int8", -128, 127, "int8", 127, -128),
    ("uint8", 255, 0, "int8", -128, 127),
    ("uint8", 0, 255, "int4", 0, -8),
    ("int8", 127, -128, "int4", -8, 7),
    ("uint8", 0, 255, "uint4", 0, 15),
    ("uint8", 128, 0, "uint4", 15, 0),
])
def test_gemm_k_at_overflow_bound(xt, zx, xv, fmt, zw, wv):
    """K exactly at §4.1's limit with extreme codes: |acc| close to 2^31 - 1 (exactly 2^31 - 1 with the bias that
    fills the remaining budget), still exact on every output stage; K + 1 is rejected."""
    k = S.max_k(xt, zx, fmt, zw)
    m, n = 3, 5
    wc = np.full((n, k), wv, C.CONTAINERS[fmt])
    w = wc if fmt == "int8" else ops.pack_int4(wc, fmt == "int4", backend="reference")
    base = dict(x=np.full((m, k), xv, C.CONTAINERS[xt]), w=w, w_format=fmt, x_zero_point=zx, w_zero_point=zw)
    term = k * (xv - zx) * (wv - zw)
    xlo, xhi = C.RANGES[xt]
    wlo, whi = C.RANGES[fmt]
    room = 2**31 - 1 - k * max(abs(xlo - zx), abs(xhi - zx)) * max(abs(wlo - zw), abs(whi - zw))
    for bias in (None, np.full(n, room if term >= 0 else -room, np.int32)):
        kw = dict(base, bias=bias)
        got = same("int_gemm", dict(kw, out_dtype="int32"), "int32")
        assert int(got[0, 0]) == term + (0 if bias is None else int(bias[0]))
        same("int_gemm", dict(kw, out_dtype="float32",
                              out_scale=np.array([1.0, 1 / 3, 2.0**-31, 0.1, 1e-6], np.float32)), "float32")
        same("int_gemm", dict(kw, out_dtype="int8", multiplier=np.array([2**31 - 1, 2**31 - 1, 2**30, 1, 2**31 - 1],
                                                                        np.int32),
                              shift=np.array([62, 56, 55, 31, 94], np.int32), out_zero_point=-1), "int8")
    over = dict(base, x=np.full((m, k + 1), xv, C.CONTAINERS[xt]), out_dtype="int32")
    over["w"] = np.full((n, k + 1), wv, C.CONTAINERS[fmt])
    if fmt != "int8":
        over["w"] = ops.pack_int4(over["w"], fmt == "int4", backend="reference")
    with pytest.raises(ValueError, match="K="):
        ops.int_gemm(**over, backend="cuda")


@pytest.mark.parametrize("out", ["int8", "uint8", "int4", "uint4"])
def test_requant_shift_ranges(out):
    """Shifts 1..94 in one per-channel vector, uniform shifts at the 31/32/33 and 62/63 edges and 94."""
    n = 94
    kw = gemm_kw(130, n, 40, out="int32", seed=5)
    kw.pop("out_dtype")
    rng = np.random.default_rng(1)
    for shifts in (np.arange(1, 95), np.full(n, 31), np.full(n, 32), np.full(n, 33), np.full(n, 62),
                   np.full(n, 63), np.full(n, 94), rng.integers(33, 63, n)):
        mult = rng.integers(0, 2**31 - 1, n).astype(np.int32)
        mult[:3] = [0, 2**31 - 1, 2**30]
        same("int_gemm", dict(kw, out_dtype=out, multiplier=mult, shift=shifts.astype(np.int32),
                              out_zero_point=C.RANGES[out][0] + 1), f"{out} shifts {shifts[:3]}...")


@pytest.mark.parametrize("shift", [1, 2, 5, 17, 30, 31, 32, 33, 40, 61])
def test_requant_rounding_ties(shift):
    """acc * M0 / 2^S exactly halfway between integers (and one below/above): round half up, in the requantize
    op and in the GEMM epilogue (acc = bias there, since x = zx)."""
    t = min(shift, 31)
    mult = 1 << (shift - t)  # acc * mult / 2^shift == acc / 2^t: halves at odd multiples of 2^(t-1)
    ties = (2 * np.arange(-40, 41, dtype=np.int64) + 1) * (1 << (t - 1))
    acc = np.concatenate([ties, ties - 1, ties + 1])
    acc = acc[(acc >= -2**31) & (acc < 2**31)].astype(np.int32)
    for out, zp in (("int8", 0), ("int8", -7), ("uint8", 128), ("int4", 0), ("uint4", 8)):
        same("requantize", dict(acc=acc, multiplier=mult, shift=shift, zero_point=zp, out_dtype=out), out)
    n = acc.size
    same("int_gemm", dict(x=np.full((3, 4), 7, np.uint8), w=np.ones((n, 4), np.int8), x_zero_point=7, bias=acc,
                          out_dtype="int8", multiplier=np.full(n, mult, np.int32), shift=np.full(n, shift, np.int32)),
         "gemm epilogue")


@pytest.mark.parametrize("via", VIA)
def test_requantize_layouts(via):
    for i, (shape, axis) in enumerate([((3, 40), -1), ((2, 5, 4, 3), 1), ((17,), 0), ((1, 33), 1), ((4, 3, 0), 1),
                                       ((2, 9, 5), 0), ((2, 130, 17), 1), ((300, 70), -1)]):
        for out in ("int8", "uint4"):
            check(via, "requantize", requant_kw(shape, axis, out, seed=i), f"{shape} axis={axis} {out}")


def test_float32_output_of_large_accumulators():
    """fl32(acc) rounds to nearest even above 2^24 (ties included), then one correctly rounded product."""
    rng = np.random.default_rng(11)
    special = np.array([2**24 + 1, 2**24 + 3, -(2**24 + 1), 2**25 + 2, 2**25 + 6, -(2**25 + 2), 2**31 - 2**21,
                        -(2**31 - 2**21), 0, 1, -1], np.int64)
    n, k = 130, 20
    bias = np.concatenate([special, rng.integers(-(2**31 - 2**21), 2**31 - 2**21, n - special.size)]).astype(np.int32)
    x = rng.integers(-128, 128, (70, k), dtype=np.int8)
    x[0] = 0  # row 0: acc == bias
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    scales = np.array([1.0, 1 / 3, 0.1, 2.0**-20, 3.0, 1e-6, 7.0, np.nextafter(np.float32(1), np.float32(2))],
                      np.float32)
    out_scale = np.resize(scales, n).astype(np.float32)
    got = same("int_gemm", dict(x=x, w=w, x_zero_point=0, bias=bias, out_dtype="float32", out_scale=out_scale))
    assert np.array_equal(got[0].view(np.uint32), (bias.astype(np.float32) * out_scale).view(np.uint32))


@pytest.mark.parametrize("op", ["split_gemm", "split_conv2d"])
def test_split_float32_is_not_fma_contracted(op):
    """acc2 == -acc1 with equal scales: fl32(a*s) + fl32(-a*s) is +0.0 exactly, whereas an FMA would return the
    rounding error a*s - fl32(a*s)."""
    rng = np.random.default_rng(12)
    if op == "split_gemm":
        x = rng.integers(0, 256, (130, 200), dtype=np.uint8)
        w = rng.integers(-127, 128, (70, 200), dtype=np.int8)
        geometry = {}
    else:
        x = rng.integers(0, 256, (2, 16, 9, 9), dtype=np.uint8)
        w = rng.integers(-127, 128, (24, 16, 3, 3), dtype=np.int8)
        geometry = dict(padding=1, stride=(1, 2))
    scale = rng.uniform(1e-3, 3.0, w.shape[0]).astype(np.float32)
    kw = dict(x1=x, w1=w, x2=x.copy(), w2=-w, x1_zero_point=3, x2_zero_point=3, out_dtype="float32",
              out_scale1=scale, out_scale2=scale.copy(), **geometry)
    got = same(op, kw)
    assert not np.any(got.view(np.uint32)), "fl32(a*s) + fl32(-a*s) must be +0.0"


# ------------------------------------------------------------------------------------------ conv


CONV_GEOMETRIES = [(1, 1, 1), (2, 2, 1), ((1, 2), (0, 1), (2, 1)), (3, 0, 2), ((2, 3), (3, 0), (3, 2))]


@pytest.mark.parametrize("groups,cg,og", [(1, 3, 5), (1, 16, 16), (2, 5, 3), (4, 1, 1), (3, 8, 17), (1, 64, 65),
                                          (32, 1, 1), (16, 1, 2), (2, 33, 64)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_groups_and_tails(groups, cg, og, fmt):
    """Groups (depthwise and channel multipliers included), channel tails and stride/padding/dilation;
    2 x 9 x 11 pixels cross one 128-row tile."""
    c, o = groups * cg, groups * og
    for i, (stride, padding, dilation) in enumerate(CONV_GEOMETRIES):
        kw = conv_kw(2, c, (9, 11), o, groups=groups, stride=stride, padding=padding, dilation=dilation,
                     xt=ACTS[i % 2], fmt=fmt, out="int8", seed=groups * 100 + cg * 10 + i)
        what = f"stride={stride} padding={padding} dilation={dilation}"
        same("int_conv2d", kw, what)
        same("int_conv2d", dict(kw, out_dtype="int32", multiplier=None, shift=None, out_zero_point=0), what)


@pytest.mark.parametrize("xt,zx", [("uint8", 0), ("uint8", 200), ("int8", -128), ("int8", 5)])
def test_conv_padding_is_zero_point(xt, zx):
    """Padded taps read the activation zero point: a constant image equal to zx gives exactly the bias, whatever
    the weight zero points (the expanded zero-point terms must cancel on padded taps too)."""
    rng = np.random.default_rng(0)
    x = np.full((1, 6, 5, 5), zx, C.CONTAINERS[xt])
    bias = np.array([1, -2, 3, 2**20], np.int32)
    for fmt in FORMATS:
        wlo, whi = C.RANGES[fmt]
        zw = np.array([wlo, whi, max(wlo, 0), 1], np.int32)
        got = same("int_conv2d", dict(x=x, w=weights(rng, fmt, 4, (6, 3, 3)), w_format=fmt, kernel_size=(3, 3),
                                      padding=2, x_zero_point=zx, w_zero_point=zw, bias=bias), fmt)
        assert np.array_equal(got, np.broadcast_to(bias[None, :, None, None], got.shape))


@pytest.mark.parametrize("via", VIA)
def test_conv_unet_like(via):
    """3x3 conv of a UNet block: B=2, C=64, 16x16, O=64."""
    for i, (fmt, out, stride) in enumerate([("int8", "uint8", 1), ("int8", "float32", 2), ("int4", "int8", 1),
                                            ("uint4", "int32", 1)]):
        check(via, "int_conv2d", conv_kw(2, 64, (16, 16), 64, padding=1, stride=stride, fmt=fmt, out=out, seed=i,
                                         zx=128), f"{fmt} {out} stride={stride}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_1x1(fmt):
    for stride, hw in ((1, (16, 16)), (2, (15, 17))):
        same("int_conv2d", conv_kw(2, 64, hw, 96, ks=(1, 1), stride=stride, fmt=fmt, out="int8", seed=stride),
             f"stride={stride}")


def test_conv_patch_embed_deit_s():
    """The DeiT-S patch embedding: 16x16 kernel, stride 16, 3 -> 384 channels on 224x224."""
    same("int_conv2d", conv_kw(1, 3, (224, 224), 384, ks=(16, 16), stride=16, out="int8", seed=3))


# ------------------------------------------------------------------------------------------ split


@pytest.mark.parametrize("fmt2", FORMATS)
@pytest.mark.parametrize("fmt1", FORMATS)
def test_split_gemm_mixed_formats(fmt1, fmt2):
    for i, out in enumerate(("int8", "uint4", "float32", "uint8")):
        kw = split_gemm_kw(130, 70, 33, 64 + i, fmt1, fmt2, ACTS[i % 2], ACTS[(i + 1) % 2], out, seed=i)
        same("split_gemm", kw, out)


@pytest.mark.parametrize("fmt2", FORMATS)
@pytest.mark.parametrize("fmt1", FORMATS)
def test_split_conv2d_mixed_formats(fmt1, fmt2):
    for i, out in enumerate(("int8", "float32", "int4")):
        kw = split_conv_kw(2, 5, 16, (9, 9), 17, stride=(1, 2), padding=1, dilation=(1, 2), fmt1=fmt1, fmt2=fmt2,
                           xt1=ACTS[i % 2], xt2=ACTS[(i + 1) % 2], out=out, seed=i)
        same("split_conv2d", kw, out)


# ------------------------------------------------------------------------------------------ log2 attention


@pytest.mark.parametrize("bits,mode", [(2, "log2"), (2, "sqrt2"), (3, "sqrt2"), (4, "sqrt2"), (5, "log2"),
                                       (6, "sqrt2"), (7, "log2"), (8, "sqrt2"), (8, "log2")])
@pytest.mark.parametrize("frac_bits", [0, 16, 24])
def test_log2_deep_codes_and_outputs(bits, mode, frac_bits):
    for kw in S.log2_deep_cases(bits, mode, frac_bits, m=130, length=70):
        same("log2_attn_matmul", kw, kw["out_dtype"])


@pytest.mark.parametrize("m", [1, 17, 128, 129, 257])
def test_log2_tile_shapes(m):
    for i, (length, n) in enumerate([(1, 1), (16, 64), (17, 65), (200, 33), (64, 129), (0, 5)]):
        bits, mode = [(4, "sqrt2"), (3, "log2"), (6, "sqrt2")][i % 3]
        for out in ("int64", "int8"):
            same("log2_attn_matmul", log2_kw(m, length, n, bits, mode, vt=ACTS[i % 2], out=out, seed=m + i),
                 f"M={m} L={length} N={n} {out}")


@pytest.mark.parametrize("via", VIA)
def test_log2_deit_s_attention(via):
    """One DeiT-S head: 197 x 197 attention codes times V [197, 64]."""
    for out in ("int64", "int8", "float32"):
        check(via, "log2_attn_matmul", log2_kw(197, 197, 64, bits=4, mode="sqrt2", out=out, seed=197), out)


@pytest.mark.parametrize("frac_bits", [16, 20, 24])
@pytest.mark.parametrize("mode", ["log2", "sqrt2"])
def test_log2_length_at_int64_bound(mode, frac_bits):
    """L at the §7 limit (L * 255 * 2^F * (2^16 + Q) < 2^63) with the largest terms: R near 2^63, and the
    requantized outputs need the 94-bit product R * M0."""
    per = 255 * 2**frac_bits * (2**C.LOG2_P + C.LOG2_Q)
    length = (2**63 - 1) // per
    rng = np.random.default_rng(frac_bits)
    codes = np.zeros((2, length), np.uint8)
    if mode == "sqrt2":
        codes[0, 1::2] = 1  # odd code, e = 1: O gets the sqrt(2) terms
    codes[1] = rng.integers(0, 16, length, dtype=np.uint8)
    v = np.empty((length, 3), np.int8)
    v[:, 0] = -128
    v[:, 1] = 127
    v[:, 2] = rng.integers(-128, 128, length, dtype=np.int8)
    for zv in (-128, 127):  # d = v - zv in [0, 255], then in [-255, 0]
        base = dict(codes=codes, v=v, v_zero_point=zv, bits=4, mode=mode, frac_bits=frac_bits)
        same("log2_attn_matmul", dict(base, out_dtype="int64"), f"zv={zv} int64")
        same("log2_attn_matmul", dict(base, out_dtype="float32", out_scale=np.array([2.0**-60, 1 / 3, 1e-12],
                                                                                    np.float32)), f"zv={zv} float32")
        same("log2_attn_matmul", dict(base, out_dtype="int8", multiplier=np.array([2**31 - 1, 2**31 - 1, 2**30],
                                                                                  np.int32),
                                      shift=np.array([94, 90, 88], np.int32), out_zero_point=0), f"zv={zv} int8")
    with pytest.raises(ValueError, match="L="):
        ops.log2_attn_matmul(np.zeros((1, length + 1), np.uint8), np.zeros((length + 1, 1), np.int8), bits=4,
                             mode=mode, frac_bits=frac_bits, backend="cuda")


# ------------------------------------------------------------------------------------------ streams


STREAM_OPS = ["int_gemm", "int_conv2d", "log2_attn_matmul"]


@needs_torch
@pytest.mark.parametrize("op", STREAM_OPS)
def test_side_stream_orders_producer_op_and_consumer(op):
    """On a non-default stream: a late (busy-delayed) write of the input, the op, then a consumer, all in stream
    order on that stream; after ``s.synchronize()`` the op's result and the consumer's copy equal the reference."""
    torch = _torch()
    kw = FIXED[op]()
    ref = reference(op, kw)
    key = PRIMARY[op]
    src = torch.from_numpy(np.array(kw[key], copy=True)).pin_memory()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        assert torch.cuda.current_stream() == s
        xd = torch.zeros(tuple(src.shape), dtype=src.dtype, device=DEVICE)
        _busy(torch, 50_000_000)  # the input below is written only after this, on s
        xd.copy_(src, non_blocking=True)
        y = getattr(ops, op)(**dict(kw, **{key: xd}), backend="cuda")
        y2 = y.clone()  # a consumer on s, right after the op
    s.synchronize()
    check_device_result(torch, y, xd, ref, f"{op} result on a side stream")
    check_device_result(torch, y2, xd, ref, f"{op} consumer on the side stream")


@needs_torch
def test_side_stream_does_not_wait_for_the_default_stream():
    """With every argument already on the device, the op enqueues its work on the current stream only: it finishes
    while the default stream is still busy (no device-wide synchronization, no work on the default stream)."""
    torch = _torch()
    kw = gemm_kw(64, 48, 96, out="int8")
    dkw = on_device(torch, kw)
    ops.int_gemm(**dkw, backend="cuda")  # warm-up: kernels loaded, caches filled
    torch.cuda.synchronize()
    default = torch.cuda.current_stream()
    s = torch.cuda.Stream()
    _busy(torch, 2_000_000_000)  # about a second on the default stream
    with torch.cuda.stream(s):
        y = ops.int_gemm(**dkw, backend="cuda")
    s.synchronize()
    default_still_busy = not default.query()
    torch.cuda.synchronize()
    if getattr(torch.cuda, "_sleep", None) is not None:
        assert default_still_busy, "the op on a side stream waited for the default stream"
    check_device_result(torch, y, dkw["x"], reference("int_gemm", kw), "side stream")


# ------------------------------------------------------------------------------------------ large shapes


@pytest.mark.parametrize("xt,fmt,out", [("uint8", "int8", "int32"), ("int8", "int4", "int8")])
def test_gemm_1024_cubed(xt, fmt, out):
    same("int_gemm", gemm_kw(1024, 1024, 1024, xt=xt, fmt=fmt, out=out, seed=1024,
                             zw=np.arange(1024, dtype=np.int32) % 5 - 2))


DEIT_S = [(384, 1152), (384, 384), (384, 1536), (1536, 384)]  # (K, N): qkv, proj, fc1, fc2


@pytest.mark.gpu_only  # M = 12608: too long on the host SIMT emulator
@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("k,n", DEIT_S)
def test_gemm_deit_s_shapes(k, n, via):
    """DeiT-S linear layers on a batch of 2 images (M = 2 * 197 tokens)."""
    for out in ("int8", "float32"):
        check(via, "int_gemm", gemm_kw(2 * 197, n, k, out=out, seed=k + n, zw=np.arange(n, dtype=np.int32) % 3 - 1),
              out)


@pytest.mark.slow
def test_gemm_4096_cubed_against_float64_oracle():
    """4096^3 is too slow for the NumPy reference; float64 BLAS is exact here (every partial sum is an integer of
    magnitude below 2^29 < 2^53, whatever the summation order)."""
    kw = gemm_kw(4096, 4096, 4096, out="int32", seed=4096, zw=np.arange(4096, dtype=np.int32) % 7 - 3)
    got = ops.int_gemm(**kw, backend="cuda")
    xs = kw["x"].astype(np.float64) - kw["x_zero_point"]
    ws = kw["w"].astype(np.float64) - kw["w_zero_point"][:, None]
    want = (xs @ ws.T + kw["bias"]).astype(np.int32)
    assert_same(got, want, "4096^3")


# ------------------------------------------------------------------------------------------ interop


@needs_torch
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("op", sorted(FIXED))
def test_device_tensors_on_host_backends(op, backend):
    """The op layer copies device arrays to the host for the reference and cpu backends."""
    torch = _torch()
    kw = FIXED[op]()
    got = getattr(ops, op)(**on_device(torch, kw), backend=backend)
    assert_same(_host(got), reference(op, kw), f"{op} on {backend}")


@needs_torch
def test_noncontiguous_device_tensors_are_accepted():
    torch = _torch()
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (10, 40), dtype=np.uint8)
    w = rng.integers(-128, 128, (30, 20), dtype=np.int8)
    xd, wd = to_dev(torch, x)[:, ::2], to_dev(torch, w)[::3]
    assert not xd.is_contiguous() and not wd.is_contiguous()
    ref = ops.int_gemm(x[:, ::2], w[::3], x_zero_point=9, backend="reference")
    check_device_result(torch, ops.int_gemm(xd, wd, x_zero_point=9, backend="cuda"), xd, ref, "sliced x, w")
    xt = to_dev(torch, np.ascontiguousarray(x[:, ::2].T)).t()  # a transposed view
    assert not xt.is_contiguous()
    check_device_result(torch, ops.int_gemm(xt, w[::3], x_zero_point=9, backend="cuda"), xt, ref, "transposed x")

    xc = rng.integers(-128, 128, (2, 8, 9, 18), dtype=np.int8)
    wc = rng.integers(-128, 128, (4, 8, 3, 3), dtype=np.int8)
    ref = ops.int_conv2d(xc, wc, padding=1, backend="reference")
    xcl = to_dev(torch, xc).contiguous(memory_format=torch.channels_last)
    assert not xcl.is_contiguous()
    check_device_result(torch, ops.int_conv2d(xcl, wc, padding=1, backend="cuda"), xcl, ref, "channels_last x")
    xs = to_dev(torch, np.concatenate([xc, xc], axis=3))[..., ::2]
    ref = ops.int_conv2d(np.concatenate([xc, xc], axis=3)[..., ::2], wc, padding=1, backend="reference")
    check_device_result(torch, ops.int_conv2d(xs, wc, padding=1, backend="cuda"), xs, ref, "strided x")

    codes = rng.integers(0, 16, (6, 12), dtype=np.uint8)
    v = rng.integers(0, 256, (6, 10), dtype=np.uint8)
    cd = to_dev(torch, codes).t()
    ref = ops.log2_attn_matmul(codes.T, v, bits=4, backend="reference")
    check_device_result(torch, ops.log2_attn_matmul(cd, v, bits=4, backend="cuda"), cd, ref, "transposed codes")


@needs_torch
@pytest.mark.parametrize("offset", [1, 3, 8])
def test_device_tensors_with_unaligned_data_pointers(offset):
    """Contiguous tensors whose data starts ``offset`` bytes past a 16-byte boundary (views into a larger buffer)."""
    torch = _torch()

    def unaligned(a):
        flat = torch.zeros(a.size + offset, dtype=getattr(torch, a.dtype.name), device=DEVICE)
        t = flat[offset:].view(a.shape)
        t.copy_(to_dev(torch, a))
        assert t.is_contiguous() and t.data_ptr() % 16 == offset % 16
        return t

    for kw, op in ((gemm_kw(33, 40, 64, fmt="int8", out="int8"), "int_gemm"),
                   (gemm_kw(17, 24, 96, fmt="int4", out="int32"), "int_gemm"),
                   (conv_kw(1, 16, (8, 8), 32, padding=1, out="int32"), "int_conv2d")):
        dkw = dict(kw, x=unaligned(kw["x"]), w=unaligned(kw["w"]))
        check_device_result(torch, getattr(ops, op)(**dkw, backend="cuda"), dkw["x"], reference(op, kw),
                            f"{op} offset={offset}")


@needs_torch
def test_auto_backend_runs_cuda(monkeypatch):
    monkeypatch.delenv("PYQSIM_BACKEND", raising=False)
    assert "cuda" in ops.available_backends()
    for op in PRIMARY:
        assert ops.resolve_backend("auto", op) == "cuda", op
    torch = _torch()
    kw = FIXED["int_gemm"]()
    ref = reference("int_gemm", kw)
    dkw = on_device(torch, kw, ["x"])
    check_device_result(torch, ops.int_gemm(**dkw), dkw["x"], ref, "auto, tensor x")
    assert_same(ops.int_gemm(**kw), ref, "auto, NumPy x")


@needs_torch
def test_device_argument_errors():
    torch = _torch()
    w = np.zeros((3, 8), np.int8)
    with pytest.raises(TypeError):  # activation dtype
        ops.int_gemm(torch.zeros((4, 8), dtype=torch.int16, device=DEVICE), w, backend="cuda")
    with pytest.raises(TypeError):
        ops.int_gemm(torch.zeros((4, 8), dtype=torch.float32, device=DEVICE), w, backend="cuda")
    with pytest.raises(ValueError):  # K disagrees
        ops.int_gemm(torch.zeros((4, 9), dtype=torch.uint8, device=DEVICE), w, backend="cuda")
    with pytest.raises(ValueError):  # 3-D activation
        ops.int_gemm(torch.zeros((2, 4, 8), dtype=torch.uint8, device=DEVICE), w, backend="cuda")
    k = S.max_k("uint8", 0, "int8", 0) + 1
    with pytest.raises(ValueError, match="K="):
        ops.int_gemm(torch.zeros((1, k), dtype=torch.uint8, device=DEVICE),
                     torch.zeros((2, k), dtype=torch.int8, device=DEVICE), backend="cuda")
    with pytest.raises(ValueError):  # groups must divide the channels
        ops.int_conv2d(torch.zeros((1, 6, 5, 5), dtype=torch.uint8, device=DEVICE), np.zeros((4, 3, 3, 3), np.int8),
                       groups=4, backend="cuda")


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("op", ["int_gemm", "int_conv2d"])
def test_weights_mutated_in_place_are_not_served_from_a_cache(op, via):
    """The same weight array (same address), rewritten in place between calls, gives the new result."""
    kw = FIXED[op]() if op == "int_gemm" else conv_kw(2, 8, (6, 6), 12, padding=1, fmt="int4", out="int8")
    new_w = np.random.default_rng(99).permutation(kw["w"].ravel()).reshape(kw["w"].shape)
    if via == "numpy":
        same(op, kw, "first call")
        kw["w"][...] = new_w
        same(op, kw, "after rewriting w")
        return
    torch = _torch()
    dkw = on_device(torch, kw)
    check_device_result(torch, getattr(ops, op)(**dkw, backend="cuda"), dkw["x"], reference(op, kw), "first call")
    dkw["w"].copy_(to_dev(torch, new_w))
    kw["w"][...] = new_w
    check_device_result(torch, getattr(ops, op)(**dkw, backend="cuda"), dkw["x"], reference(op, kw),
                        "after rewriting w")
