"""ops.Prepared: a program node's op call with its constant arguments checked on the first run only. Every run must
equal the op called directly with the same arguments (new activation data each time), whatever the activations'
layouts, and checks that read activation values must still run."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqsim import ops

BACKENDS = ["reference"] + (["cpu"] if ops.unavailable_reason("cpu") == "" else [])


def _u8(rng, shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _f32(rng, shape):
    return (rng.standard_normal(shape) * 3).astype(np.float32)


def _cases(backend, rng):
    """(name, fn, activation maker) for each PREPARABLE op."""
    w = rng.integers(-127, 128, (6, 5), dtype=np.int8)
    wc = rng.integers(-127, 128, (4, 3, 3, 3), dtype=np.int8)
    bias = rng.integers(-1000, 1000, 6, dtype=np.int32)
    st_f = ops.output_stage(6, out_dtype="float32", out_scale=np.full(6, 0.01, np.float32))
    pw = ops.pack_weight(w, w_format="int8", w_zero_point=np.zeros(6, np.int32), kind="gemm", k=5)
    codes = {"scale": 0.05, "zero_point": 7, "bits": 6}
    gw, gb = _f32(rng, 4), _f32(rng, 4)
    return [
        ("int_gemm", lambda x: ops.int_gemm(x, pw, x_zero_point=3, bias=bias, out_dtype=st_f, backend=backend),
         lambda r: (_u8(r, (7, 5)),)),
        ("int_conv2d", lambda x: ops.int_conv2d(x, wc, padding=1, x_zero_point=128, out_dtype="int32",
                                                backend=backend), lambda r: (_u8(r, (2, 3, 5, 4)),)),
        ("split_gemm", lambda a, b: ops.split_gemm(a, w[:, :2], b, w[:, 2:], x1_zero_point=1, x2_zero_point=200,
                                                   out_dtype="float32", out_scale1=np.ones(6, np.float32),
                                                   out_scale2=np.full(6, 0.5, np.float32), backend=backend),
         lambda r: (_u8(r, (3, 2)), _u8(r, (3, 3)))),
        ("int_bmm", lambda a, b: ops.int_bmm(a, b, a_zero_point=128, b_zero_point=9, backend=backend),
         lambda r: (_u8(r, (2, 4, 6)), _u8(r, (2, 5, 6)))),
        ("quantize", lambda x: ops.quantize(x, 0.1, 60, "uint8", bits=7, backend=backend), lambda r: (_f32(r, (3, 8)),)),
        ("softmax", lambda x: ops.softmax(x, codes=codes, backend=backend), lambda r: (_f32(r, (3, 8)),)),
        ("layer_norm", lambda x, a, b: ops.layer_norm(x, a, b, backend=backend),
         lambda r: (_f32(r, (3, 4)), _f32(r, 4), _f32(r, 4))),
        ("group_norm", lambda x: ops.group_norm(x, 2, gw, gb, codes=codes, backend=backend),
         lambda r: (_f32(r, (2, 4, 3)),)),
        ("gelu", lambda x: ops.gelu(x, backend=backend), lambda r: (_f32(r, (5, 3)),)),
        ("silu", lambda x: ops.silu(x, codes=codes, backend=backend), lambda r: (_f32(r, (5, 3)),)),
        ("add", lambda a, b: ops.add(a, b, backend=backend), lambda r: (_f32(r, (2, 3, 4)), _f32(r, (3, 1)))),
    ]


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), layouts=st.lists(st.sampled_from(["same", "strided", "rows", "other"]),
                                                         min_size=3, max_size=6))
def test_every_run_equals_the_direct_call(backend, seed, layouts):
    """New data on every run, in the first run's layout, in a strided copy of it (a layout the checks copy), as the
    rows of a wider buffer or in another shape: each run's result is the direct call's, bit for bit."""
    rng = np.random.default_rng(seed)
    for name, fn, make in _cases(backend, rng):
        p = ops.Prepared()
        for lay in ["same"] + layouts:
            acts = make(rng)
            if lay == "strided":  # the same values in a buffer with gaps: the checks copy them
                acts = tuple(np.repeat(a, 2, axis=-1)[..., ::2] for a in acts)
            elif lay == "rows":  # the rows of a wider buffer (row views: quantize and the batched ops read them)
                acts = tuple(np.concatenate([a, a], axis=-1)[..., :a.shape[-1]] if a.ndim > 1 else a for a in acts)
            elif lay == "other":  # another shape: more rows (the first operand's, where the others are constants)
                n = len(acts) if name in ("split_gemm", "int_bmm") else 1
                acts = tuple(np.concatenate([a, a], axis=0) if i < n else a for i, a in enumerate(acts))
            assert _same(p.run(fn, *acts), fn(*acts)), (name, lay)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learns_and_replays(backend):
    """A second run in the same layout reuses the kept arguments (no checks of constants); the plan holds no
    activation (a kept one would pin its memory and could be read stale)."""
    rng = np.random.default_rng(1)
    for name, fn, make in _cases(backend, rng):
        if name == "quantize" and backend == "reference":
            continue
        p = ops.Prepared()
        p.run(fn, *make(rng))
        assert p._plan is not None, name
        kept = p._plan[3]
        assert all(v is None for path, v in ops._fields(kept) if any(path == q[0] for q in p._plan[4])), name


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_learns_row_views(backend):
    """quantize of the rows of a wider buffer (a channel slice) is replayed too, with the new rows' data."""
    rng = np.random.default_rng(3)
    fn = lambda x: ops.quantize(x, 0.1, 60, "uint8", bits=7, backend=backend)  # noqa: E731
    p = ops.Prepared()
    for _ in range(3):
        x = np.concatenate([_f32(rng, (4, 3, 8)), _f32(rng, (4, 2, 8))], axis=1)[:, :3]  # rows of 24 >= 16 values
        assert _same(p.run(fn, x), fn(x))
        assert p._plan is not None


def test_value_scans_still_run():
    """quantize on the reference scans x for NaN / inf: nothing is kept, so a later NaN is still a ValueError."""
    p = ops.Prepared()
    fn = lambda x: ops.quantize(x, 0.1, 128, "uint8", backend="reference")  # noqa: E731
    p.run(fn, np.ones((2, 3), np.float32))
    assert p._plan is None
    with pytest.raises(ValueError, match="finite"):
        p.run(fn, np.array([[1, np.nan, 0]] * 2, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_recorded_like_direct_calls(backend):
    """Replayed runs are recorded (ops.record) with the canonical arguments of a direct call."""
    rng = np.random.default_rng(2)
    name, fn, make = _cases(backend, rng)[0]
    p = ops.Prepared()
    p.run(fn, *make(rng))
    x = make(rng)
    with ops.record() as calls:
        p.run(fn, *x)
        fn(*x)
    assert [c[1] for c in calls] == ["int_gemm", "int_gemm"]
    assert _same(calls[0][3], calls[1][3]) and np.array_equal(calls[0][2].x, calls[1][2].x)
