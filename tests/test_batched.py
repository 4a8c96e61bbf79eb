"""Batched ops (spec §7 batched form, §4.3 int_bmm) and packed weights (§4.4): CPU backend == reference, bit for bit
(``np.array_equal``) on the scalar and AVX2 paths, and the batched reference == the 2-D reference looped over the
leading dimensions. Every result here is an integer or a float32 stage with a stated order of operations: no
tolerance anywhere.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import strategies as S
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


LOG2_EDGES = [_example(()), _example((0,)), _example((1,)), _example((2, 3)), _example((2, 0, 3)),
              _example((1, 2, 3), m=1, length=1, n=1), _example((3,), m=0), _example((2,), length=0),
              _example((2,), n=0), _example((2, 2), bits=8, mode="log2", frac_bits=0, out="int8"),
              _example((2,), bits=8, mode="sqrt2", frac_bits=24, vt=np.int8, out="float32"),
              _example((4,), m=13, length=33, n=65, bits=2, mode="log2", out="uint4")]


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


@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("bits,mode", [(4, "sqrt2"), (5, "log2"), (8, "sqrt2"), (8, "log2")])
@pytest.mark.parametrize("frac_bits", [0, 16, 24])
def test_log2_batched_deep_codes(isa, bits, mode, frac_bits):
    for kw in S.log2_deep_cases(bits, mode, frac_bits):
        kw = dict(kw, codes=np.stack([kw["codes"], kw["codes"][::-1]]), v=np.stack([kw["v"], kw["v"][:, ::-1]]))
        same("log2_attn_matmul", kw)


@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("vt", [np.uint8, np.int8])
def test_log2_long_l_chunks(isa, vt):
    """L beyond the kernels' int32 chunk (with N = 272 the chunk is 15420 rows of v): R summed over chunks."""
    for out in ("int64", "int8"):
        kw = _example((2,), m=5, length=20000, n=272, bits=5, mode="sqrt2", frac_bits=16, vt=vt, out=out, seed=3)
        kw["codes"][..., ::7] = 0  # code 0: the largest weight, in every chunk
        same("log2_attn_matmul", kw)


def test_log2_leading_dims_must_match():
    codes = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(ValueError, match="leading dimensions"):
        ops.log2_attn_matmul(codes, np.zeros((3, 4, 5), np.uint8), backend="reference")
    with pytest.raises(ValueError, match="3-D"):
        ops.log2_attn_matmul(codes, np.zeros((4, 5), np.uint8), backend="reference")
    with pytest.raises(ValueError, match="at least 2-D"):
        ops.log2_attn_matmul(np.zeros(3, np.uint8), np.zeros((3, 5), np.uint8), backend="reference")
