"""The host SIMT emulator (``pyqsim._cuda_simt``, docs/spec.md §13) catches what it claims to catch.

tests/test_cuda_ops.py runs the CUDA kernels on the emulator; that is only worth something if the emulator fails
broken kernels instead of passing them. Each probe here is a deliberately broken (or, as a control, a correct)
kernel; its outcome is compared exactly with the expected fault. No tolerance is involved.
"""
from __future__ import annotations

import numpy as np
import pytest

from pyqsim import build_info, ops
from pyqsim.backends import cuda as cuda_backend

pytestmark = pytest.mark.needs_cuda_simt

# probe -> expected outcome: "ok", "wrong data", or a fragment of the launch error (a tuple: any one of them, where
# the thread order decides which lane notices the fault first)
PROBES = {
    "oob_read": "cudaErrorLaunchFailure: kernel fault: __ldg: 1 bytes at",
    "oob_write": "guard zone after the 4096-byte allocation",
    "misaligned_cp_async": "cp.async 16: misaligned address",
    "read_after_wait": "ok",
    "read_without_wait": "wrong data",
    "overwrite_after_barrier": "ok",
    "overwrite_before_barrier": "wrong data",
    "barrier": "ok",
    "missing_barrier": "wrong data",
    "partial_warp_collective": ("mma.m16n8k32 needs all 32 lanes of the warp",
                                "exited while lanes of its warp wait at mma.m16n8k32"),
    "divergent_collectives": "warp divergence",
    "deadlock": "deadlock: 32 threads never finished (1 at __syncthreads, 31 lanes of a warp at __shfl_xor_sync) "
                "in block (0,0,0)",
    "smem_without_opt_in": "cudaErrorInvalidValue: 65536 bytes of dynamic shared memory exceed the 49152 bytes",
}
# Faults of one thread name it; a deadlock names its block, guard damage its allocation.
PER_THREAD = {"oob_read", "misaligned_cp_async", "partial_warp_collective", "divergent_collectives"}


def _sim():
    from pyqsim import _cuda_simt
    return _cuda_simt


def test_every_probe_is_listed():
    assert sorted(_sim().fault_probe_names()) == sorted(PROBES)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_fault_probe(name):
    got = _sim().fault_probe(name)
    want = PROBES[name]
    if want in ("ok", "wrong data"):
        assert got == want, got
    else:
        assert any(w in got for w in ((want,) if isinstance(want, str) else want)), got
        assert (" of block (" in got) == (name in PER_THREAD), got


def test_unknown_probe_is_a_value_error():
    with pytest.raises(ValueError, match="unknown fault probe 'nope'"):
        _sim().fault_probe("nope")


def test_emulated_device():
    sim = _sim()
    assert sim.device_count() == 1
    assert sim.device_capability(0) == 80
    assert "SIMT emulator" in sim.device_name(0)
    with pytest.raises(RuntimeError, match="cudaErrorInvalidDevice"):
        sim.set_device(1)


def test_host_memory_is_not_device_memory():
    sim = _sim()
    host = np.zeros(16, np.uint8)
    buf = sim.Buffer(16, 0)
    assert sim.pointer_device(buf.ptr) == 0
    assert sim.pointer_device(buf.ptr + 15) == 0
    assert sim.pointer_device(host.ctypes.data) == -1
    e, f = np.zeros(0, np.int32), np.zeros(0, np.float32)
    with pytest.raises(ValueError, match="x is not CUDA device memory"):
        sim.int_gemm(host.ctypes.data, "uint8", 0, buf.ptr, "int8", np.zeros(1, np.int32), 1, 1, 16,
                     np.zeros(1, np.int32), "int32", e, e, 0, f, buf.ptr, 0)


def test_simulated_switches_the_cuda_backend_and_restores_it():
    before = ops.available_backends()
    x = np.arange(6, dtype=np.uint8).reshape(2, 3)
    w = np.array([[1, -2, 3]], np.int8)
    with cuda_backend.simulated():
        assert "cuda" in ops.available_backends()
        got = ops.int_gemm(x, w, x_zero_point=1, backend="cuda")
    assert ops.available_backends() == before
    want = (x.astype(np.int64) - 1) @ w.astype(np.int64).T
    assert got.dtype == np.int32 and np.array_equal(got, want)


def test_build_info_reports_the_simulator_not_as_a_gpu():
    info = build_info()
    assert info["cuda"]["simulator"] is True
    with cuda_backend.simulated():
        assert build_info()["cuda_devices"] == info["cuda_devices"]  # the emulator is never counted as a GPU


@pytest.mark.parametrize("op", ["int_conv2d", "split_conv2d"])
@pytest.mark.parametrize("window", [dict(stride=(0, 1)), dict(padding=(-1, 0)), dict(dilation=(1, 0)),
                                    dict(ksize=(0, 3))])
def test_conv_bindings_reject_a_bad_window(op, window):
    """The shared bindings check the conv window before any memory is touched (same code as pyqsim._C.cuda)."""
    sim = _sim()
    buf = sim.Buffer(64, 0)
    z, e, f = np.zeros(1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    g = {**dict(ksize=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1)), **window}
    win = (g["ksize"], g["stride"], g["padding"], g["dilation"], (4, 4))
    with pytest.raises(ValueError, match="kernel_size, stride and dilation must be >= 1 and padding >= 0"):
        if op == "int_conv2d":
            sim.int_conv2d(buf.ptr, "uint8", 0, buf.ptr, "int8", z, (1, 1, 4, 4), 1, *win[:4], 1, win[4], z,
                           "int32", e, e, 0, f, buf.ptr, 0)
        else:
            sim.split_conv2d(buf.ptr, "uint8", 0, buf.ptr, "int8", z, 1, buf.ptr, "uint8", 0, buf.ptr, "int8", z, 1,
                             (1, 4, 4), 1, *win, z, "int8", z, z, z, 0, f, f, buf.ptr, 0)
