"""Layout stages (spec §15.10): ops.concat and ops.resample_nearest move bytes, so each backend must equal NumPy's
concatenate / take exactly (compared as bytes) for every numeric dtype, layout and size, including the native
copies' task splits (rows of more than 256 KiB, many small rows); bad arguments raise TypeError / ValueError."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyqsim import ops

BACKENDS = ["reference"] + (["cpu"] if ops.unavailable_reason("cpu") == "" else [])
DTYPES = [np.uint8, np.int8, np.bool_, np.int16, np.int32, np.int64, np.float32, np.float64]


def _data(rng, shape, dtype):
    """Random bytes seen as ``dtype`` (any bit pattern: NaNs included), or random booleans."""
    if dtype is np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return rng.integers(0, 256, n, dtype=np.uint8).view(dtype).reshape(shape)


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(DTYPES),
       shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), axis=st.integers(-4, 3),
       sizes=st.lists(st.integers(0, 4), min_size=1, max_size=4), strided=st.booleans())
@example(seed=0, dtype=np.float32, shape=[2, 1, 300, 300], axis=1, sizes=[1, 2], strided=False)  # rows > 256 KiB
@example(seed=1, dtype=np.uint8, shape=[4000, 3], axis=1, sizes=[2, 5, 1], strided=True)        # many short rows
@example(seed=2, dtype=np.int64, shape=[1], axis=0, sizes=[0, 0], strided=False)                 # nothing to copy
def test_concat_equals_numpy(backend, seed, dtype, shape, axis, sizes, strided):
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    xs = []
    for n in sizes:
        s = list(shape)
        s[ax] = n
        x = _data(rng, s, dtype)
        if strided:  # a non-contiguous view with the same values
            x = np.repeat(x, 2, axis=-1)[..., ::2]
        xs.append(x)
    assert _same(ops.concat(xs, axis if -len(shape) <= axis < len(shape) else ax, backend=backend),
                 np.concatenate(xs, axis=ax))


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(DTYPES),
       lead=st.lists(st.integers(0, 3), max_size=2), h=st.integers(1, 9), w=st.integers(1, 9),
       oh=st.integers(0, 20), ow=st.integers(0, 20), sorted_rows=st.booleans())
@example(seed=0, dtype=np.uint8, lead=[8, 4], h=16, w=16, oh=32, ow=32, sorted_rows=True)     # 2x upsampling
@example(seed=1, dtype=np.float32, lead=[1, 2], h=300, w=300, oh=600, ow=600, sorted_rows=True)  # rows > 256 KiB
def test_resample_equals_numpy(backend, seed, dtype, lead, h, w, oh, ow, sorted_rows):
    rng = np.random.default_rng(seed)
    x = _data(rng, tuple(lead) + (h, w), dtype)
    rows = rng.integers(0, h, oh)
    if sorted_rows:  # nearest upsampling's repeated, ascending rows
        rows = np.sort(rows)
    cols = rng.integers(0, w, ow)
    assert _same(ops.resample_nearest(x, rows, cols, backend=backend), x[..., rows, :][..., cols])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, exc, match", [
    (lambda b: ops.concat([], 0, backend=b), TypeError, "xs must be a non-empty list"),
    (lambda b: ops.concat([np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32)], 0, backend=b), TypeError,
     r"xs\[1\] must have the dtype of xs\[0\]"),
    (lambda b: ops.concat([np.zeros((2, 3)), np.zeros((3, 4))], 0, backend=b), ValueError, r"xs\[1\] has shape"),
    (lambda b: ops.concat([np.zeros((2, 3))], 2, backend=b), ValueError, "axis must be in"),
    (lambda b: ops.concat([np.array(["a"])], 0, backend=b), TypeError, "numeric dtype"),
    (lambda b: ops.resample_nearest(np.zeros((2, 3)), np.array([2]), np.array([0]), backend=b), ValueError,
     r"rows values must be in \[0, 1\]"),
    (lambda b: ops.resample_nearest(np.zeros((2, 3)), np.array([0]), np.array([-1]), backend=b), ValueError,
     r"cols values must be in \[0, 2\]"),
    (lambda b: ops.resample_nearest(np.zeros((2, 3)), np.array([0.5]), np.array([0]), backend=b), TypeError,
     "rows must be a 1-D integer array"),
    (lambda b: ops.resample_nearest(np.zeros(3), np.array([0]), np.array([0]), backend=b), ValueError,
     "at least 2 dimensions"),
])
def test_bad_arguments(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(backend)


@pytest.mark.needs_cpu_ext
def test_binding_checks_before_copying():
    """The binding refuses what the op layer would have canonicalized or rejected, before any copy."""
    from pyqsim import _C
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.concat([np.zeros((4, 4), np.float32)[:, ::2]], 0)
    with pytest.raises(TypeError, match="dtype of xs"):
        _C.concat([np.zeros(2, np.float32), np.zeros(2, np.int32)], 0)
    with pytest.raises(ValueError, match="axis must be in"):
        _C.concat([np.zeros(2, np.float32)], 1)
    with pytest.raises(ValueError, match="rows values must be in"):
        _C.resample_nearest(np.zeros((2, 2), np.uint8), np.array([5]), np.array([0]))
    with pytest.raises(TypeError, match="1-D int64"):
        _C.resample_nearest(np.zeros((2, 2), np.uint8), np.array([0], np.int32), np.array([0]))
