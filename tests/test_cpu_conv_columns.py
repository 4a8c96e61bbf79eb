"""Conv outputs in NCHW (rows of the GEMM are adjacent pixels) through the AVX-512 output stage that transposes
32 x 16 blocks in registers (spec §10.7, §10.8): CPU backend == reference, bit for bit (``np.array_equal``).

Tolerance policy: none. Every output (int32, requantized codes, float32 from the §8 products) must be identical.

Cases have at least 32 output channels per group, so the AMX path takes them (§10.8), output sizes OH * OW that are
not multiples of 16 or 32 (partial row blocks), channel counts that are not multiples of 16 (partial channel
blocks), and activations, weights, zero points, bias, multipliers and shifts drawn over their whole ranges; every
CPU kernel path the machine has runs each case.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

import strategies as S
from pyqsim import _checks as C
from pyqsim import ops
from pyqsim.reference import pack_int4
from test_cpu_ops import FIXTURE_OK, bound_ok, isa, same  # noqa: F401 (isa: the per-ISA fixture)

pytestmark = pytest.mark.needs_cpu_ext


@st.composite
def column_conv_cases(draw, og=None, ohw=None, out=None):
    """int_conv2d kwargs with og (>= 32) output channels per group, ohw = OH * OW output pixels (when given: one
    output row, OW = ohw) and output kind out; each drawn when None."""
    groups = draw(st.sampled_from([1, 1, 2]))
    og = draw(st.one_of(st.sampled_from([32, 33, 47, 48, 49, 64, 65]), st.integers(32, 80))) if og is None else og
    cg = draw(st.integers(1, 12))
    b = draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if ohw is None:
        sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        ph, pw = draw(st.integers(0, 1)), draw(st.integers(0, 1))
        dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 12))
        wd = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 12))
    else:  # one output row of ohw pixels: stride 1, no dilation, padding 0
        sh = sw = dh = dw = 1
        ph = pw = 0
        h, wd = kh, ohw + kw - 1
    xt = draw(st.sampled_from(S.ACT_TYPES))
    fmt = draw(st.sampled_from(["int8", "int4", "uint4"]))
    c, o = cg * groups, og * groups
    x = draw(S.codes(xt, (b, c, h, wd)))
    wcodes = draw(S.codes(fmt, (o, cg, kh, kw)))
    w = wcodes if fmt == "int8" else pack_int4(wcodes.reshape(o, cg * kh * kw), fmt == "int4")
    kwargs = dict(x=x, w=w, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups, kernel_size=(kh, kw),
                  x_zero_point=draw(S.zero_points(xt)), w_zero_point=draw(S.zero_points(fmt, o)), w_format=fmt)
    if draw(st.booleans()):
        kwargs["bias"] = draw(hnp.arrays(np.int32, (o,), elements=st.integers(-(2**20), 2**20)))
    kwargs.update(draw(S.out_stage(o, allowed=("int32", "int8", "uint8", "int4", "uint4", "float32")
                                   if out is None else (out,))))
    return kwargs


def _ohw(kw):
    oh = (kw["x"].shape[2] + 2 * kw["padding"][0] - kw["dilation"][0] * (kw["kernel_size"][0] - 1) - 1)
    ow = (kw["x"].shape[3] + 2 * kw["padding"][1] - kw["dilation"][1] * (kw["kernel_size"][1] - 1) - 1)
    return (oh // kw["stride"][0] + 1) * (ow // kw["stride"][1] + 1)


@FIXTURE_OK
@given(kw=column_conv_cases())
def test_column_conv_equals_reference(isa, kw):
    assume(bound_ok(kw))
    same("int_conv2d", kw)


# Row-block tails: OH * OW at 1 and around 16, 32 and 64 (one task holds 64 rows), with channel tails 33 and 47.
@FIXTURE_OK
@given(data=st.data(), ohw=st.sampled_from([1, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97]),
       og=st.sampled_from([32, 33, 47]), out=st.sampled_from(["uint8", "int8", "float32", "int32", "uint4"]))
def test_column_conv_block_tails(isa, data, ohw, og, out):
    kw = data.draw(column_conv_cases(og=og, ohw=ohw, out=out))
    assume(bound_ok(kw))
    assert _ohw(kw) == ohw
    same("int_conv2d", kw)


@pytest.mark.parametrize("ohw,og", [(1, 32), (15, 33), (17, 47), (31, 48), (33, 33), (65, 47), (97, 40)])
@pytest.mark.parametrize("out", ["uint8", "float32"])
def test_column_conv_tail_grid(isa, ohw, og, out):
    """Each pair of row and channel tails with full-range data: uint8 activations and zero point, int8 weights with
    -128, per-channel weight zero points, multipliers of realistic scales (§10.4's int32 form) or float32 scales."""
    rng = np.random.default_rng(ohw * 100 + og)
    x = rng.integers(0, 256, (2, 5, 3, ohw + 2), dtype=np.uint8)
    w = rng.integers(-128, 128, (og, 5, 3, 3), dtype=np.int8)
    w[0, 0, 0, 0] = -128
    kw = dict(x=x, w=w, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
              x_zero_point=int(rng.integers(0, 256)), w_zero_point=rng.integers(-128, 128, og).astype(np.int32),
              w_format="int8", bias=rng.integers(-(2**20), 2**20, og).astype(np.int32))
    if out == "uint8":
        m, s = ops.quantize_multiplier(rng.uniform(2.0**-20, 2.0**-8, og), backend="reference")
        kw.update(out_dtype="uint8", multiplier=m, shift=s, out_zero_point=128)
    else:
        kw.update(out_dtype="float32", out_scale=rng.uniform(1e-6, 10, og).astype(np.float32))
    assert bound_ok(kw) and _ohw(kw) == ohw
    same("int_conv2d", kw)


@pytest.mark.parametrize("shift", S.SHIFT_EDGES)
def test_column_conv_shift_edges(isa, shift):
    """Every channel at one shift edge (the int32 form of §10.4 covers [33, 62]; the others take the 64-bit stage),
    alternating the largest multiplier and one giving outputs of a few codes, 35 pixels x 40 channels."""
    rng = np.random.default_rng(shift)
    x = rng.integers(-128, 128, (1, 16, 5, 9), dtype=np.int8)
    w = rng.integers(-128, 128, (40, 16, 3, 3), dtype=np.int8)
    small = min(2**31 - 1, 2 ** max(shift - 14, 0))
    m = np.where(np.arange(40) % 2 == 0, 2**31 - 1, small).astype(np.int32)
    for out in ("uint8", "int8", "int4"):
        same("int_conv2d", dict(x=x, w=w, kernel_size=(3, 3), padding=(1, 0), stride=(1, 1), dilation=(1, 1), groups=1,
                   x_zero_point=-3, w_zero_point=rng.integers(-4, 4, 40).astype(np.int32), w_format="int8",
                   bias=rng.integers(-3000, 3000, 40).astype(np.int32), out_dtype=out, multiplier=m,
                   shift=np.full(40, shift, np.int32), out_zero_point=C.RANGES[out][0] + 2))


@FIXTURE_OK
@given(kw=S.split_conv_cases(o=st.integers(32, 70)))
def test_split_conv_on_amx_blocks(isa, kw):
    """§8 split conv with >= 32 output channels: on AMX each branch has its own tiles, one output stage (§10.8)."""
    same("split_conv2d", kw)


@FIXTURE_OK
@given(kw=S.split_gemm_cases(max_dim=70, n=st.integers(32, 70)))
def test_split_gemm_on_amx_blocks(isa, kw):
    same("split_gemm", kw)
