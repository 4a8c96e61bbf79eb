"""The block cache of program runs (pyqsim.runtime.memory): NumPy arrays of >= 1 MiB allocated inside come from
cached blocks. Checked here: contents (fresh, zeroed, resized) against plain NumPy arrays, reuse, the policy restored
on exit and kept to its own thread, and program runs equal with and without it."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyqsim.runtime import memory

pytestmark = pytest.mark.needs_cpu_ext
MIB = 1 << 20


def _policy():
    from numpy._core.multiarray import get_handler_name
    return get_handler_name()


def test_policy_is_set_inside_and_restored_after():
    before = _policy()
    with memory.block_cache():
        assert _policy() == "pyqsim_block_cache"
        with memory.block_cache():  # nested
            assert _policy() == "pyqsim_block_cache"
        assert _policy() == "pyqsim_block_cache"
    assert _policy() == before


def test_policy_stays_in_its_thread():
    seen = []
    with memory.block_cache():
        t = threading.Thread(target=lambda: seen.append(_policy()))
        t.start()
        t.join()
    assert seen and seen[0] != "pyqsim_block_cache"


@given(sizes=st.lists(st.integers(0, 3 * MIB), min_size=1, max_size=6), seed=st.integers(0, 2**32 - 1))
@example(sizes=[MIB - 1, MIB, MIB + 1, 2 * MIB], seed=0)
def test_arrays_hold_what_is_written(sizes, seed):
    """Blocks handed out again (dirtied first) hold exactly what NumPy wrote: empty + fill, zeros, ones, copies."""
    rng = np.random.default_rng(seed)
    with memory.block_cache():
        for n in sizes:  # dirty blocks of these sizes, then free them into the cache
            a = np.empty(n, np.uint8)
            a.fill(0xA5)
            del a
        for n in sizes:
            want = rng.integers(0, 256, n, dtype=np.uint8)
            got = np.empty(n, np.uint8)
            got[...] = want
            z = np.zeros(n, np.uint8)
            c = want.copy()
            assert np.array_equal(got, want) and not z.any() and np.array_equal(c, want)


@given(old=st.integers(1, 3 * MIB), new=st.integers(1, 3 * MIB), inside=st.booleans())
@example(old=MIB - 1, new=MIB + 7, inside=True)   # a C library block grown past the threshold
@example(old=2 * MIB, new=MIB - 3, inside=True)   # a cached block shrunk below it
@example(old=2 * MIB, new=3 * MIB, inside=False)  # resized after the context: the block still goes back
def test_resize_keeps_the_prefix(old, new, inside):
    """ndarray.resize reallocates through the policy: the first min(old, new) bytes are kept, the rest zero."""
    with memory.block_cache():
        a = np.arange(old, dtype=np.int64).astype(np.uint8)
    want = np.zeros(new, np.uint8)
    want[:min(old, new)] = a[:min(old, new)]
    if inside:
        with memory.block_cache():
            a.resize(new, refcheck=False)
    else:
        a.resize(new, refcheck=False)
    assert np.array_equal(a, want)


def test_freed_blocks_are_reused_and_released():
    memory.release()
    with memory.block_cache():
        a = np.ones(4 * MIB, np.uint8)
    del a  # freed after the context: back to the cache all the same
    s0 = memory.stats()
    assert s0["cached"] >= 4 * MIB
    with memory.block_cache():
        b = np.empty(4 * MIB, np.uint8)
    assert memory.stats()["hits"] == s0["hits"] + 1
    del b
    memory.release()
    assert memory.stats()["cached"] == 0


def _program():
    """x [N, C, H, W] float32 -> quantize -> 2x nearest upsampling of the codes; and x + x: arrays of >= 1 MiB."""
    from pyqsim.program.program import Program
    nodes = [{"name": "q", "kind": "quantize", "args": [{"@": "x"}], "attrs": {"bits": 8},
              "tensors": {"scale": "s", "zero_point": "z"}},
             {"name": "u", "kind": "upsample_nearest", "args": [{"@": "q"}, None], "attrs": {"scales": [2.0, 2.0]}},
             {"name": "a", "kind": "binary", "args": [{"@": "x"}, {"@": "x"}], "attrs": {"op": "add",
                                                                                     "dtype": "float32"}}]
    prog = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, None, None, None]}], "nodes": nodes,
            "outputs": [{"name": "u", "value": {"@": "u"}}, {"name": "a", "value": {"@": "a"}}]}
    return Program({"s": np.array(0.02, np.float32), "z": np.array(128, np.int32)}, {"program": prog})


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_program_runs_equal_with_and_without_the_cache(monkeypatch, backend):
    """A program's outputs are the same with the cache as with NumPy's own allocator; the second run is served from
    the cache."""
    import contextlib

    import pyqsim.program.program as P
    p = _program()
    x = np.random.default_rng(0).standard_normal((2, 8, 128, 128)).astype(np.float32)
    cached = [p.run(x, backend=backend) for _ in range(2)]
    hits = memory.stats()["hits"]
    p.run(x, backend=backend)
    assert memory.stats()["hits"] > hits
    monkeypatch.setattr(P, "block_cache", contextlib.nullcontext)
    plain = p.run(x, backend=backend)
    for got in cached:
        assert all(np.array_equal(g, w) for g, w in zip(got, plain))
