"""The CUDA build without a GPU: compiled when nvcc is there, imports and reports 0 devices cleanly,
refuses ``backend="cuda"`` with a clear error, and ``auto`` falls back to the CPU. The device-array
parsing of the op layer is checked with plain ``__cuda_array_interface__`` producers. No float stage
here: nothing to tolerate.

The GPU property suite is tests/test_cuda_ops.py (skipped without a device).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import pyqsim
from pyqsim import _device, ops

pytestmark = pytest.mark.needs_cpu_ext


def _gpu_visible() -> bool:
    """The install-time test of PYQSIM_CUDA=AUTO (CMakeLists.txt): nvidia-smi lists a GPU (or, without
    nvidia-smi, the driver lists one under /proc)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        p = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        return p.returncode == 0 and re.search(r"GPU \d+:", p.stdout) is not None
    return bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def _cuda_not_requested() -> bool:
    """PYQSIM_CUDA=OFF, or AUTO (the default) where no GPU is visible: the CUDA kernels are not built."""
    v = os.environ.get("PYQSIM_CUDA", "AUTO").upper()
    return v == "OFF" or (v == "AUTO" and not _gpu_visible())


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDACXX"), reason="no nvcc on this machine")
@pytest.mark.skipif("_cuda_not_requested()", reason="PYQSIM_CUDA=OFF, or AUTO without a visible GPU")
def test_cuda_sources_are_compiled_when_nvcc_is_present():
    """Where the CUDA kernels were asked for (PYQSIM_CUDA=ON, as CI sets it, or AUTO with a GPU) and nvcc works,
    they must not silently fall back to OFF."""
    info = pyqsim.build_info()["cuda"]
    assert info["compiled"], info
    from pyqsim import _C
    assert hasattr(_C, "cuda")
    for name in ("int_gemm", "int_conv2d", "split_gemm", "split_conv2d", "requantize", "log2_attn_matmul", "Buffer"):
        assert hasattr(_C.cuda, name), name
    assert "80" in info["archs"] and "90" in info["archs"], info["archs"]


@pytest.mark.needs_cuda_build
def test_build_info_reports_devices():
    info = pyqsim.build_info()
    assert info["cuda"]["compiled"] is True
    assert info["cuda_devices"] == info["cuda"]["devices"] == len(info["cuda"]["device_names"])
    if info["cuda_devices"] == 0:
        assert "no CUDA device" in info["cuda"]["reason"]
        assert info["backends"]["cuda"] is False


def _no_gpu() -> bool:
    return pyqsim.build_info()["cuda_devices"] == 0


@pytest.mark.skipif("not _no_gpu()", reason="a CUDA device is visible")
def test_cuda_backend_without_device_is_a_clear_error():
    x = np.ones((2, 3), np.int8)
    w = np.ones((4, 3), np.int8)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        ops.int_gemm(x, w, backend="cuda")
    assert "cuda" not in ops.available_backends()
    # auto takes the fastest backend that exists
    assert np.array_equal(ops.int_gemm(x, w, backend="auto"), ops.int_gemm(x, w, backend="reference"))


@pytest.mark.needs_cuda_build
@pytest.mark.skipif("not _no_gpu()", reason="a CUDA device is visible")
def test_cuda_bindings_without_device_raise_not_crash():
    from pyqsim._C import cuda as cu
    assert cu.device_count() == 0
    assert cu.pointer_device(0) == -1
    with pytest.raises(RuntimeError, match="CUDA error"):
        cu.Buffer(16, 0)
    with pytest.raises(RuntimeError, match="CUDA error"):
        cu.synchronize(0)


@pytest.mark.needs_cuda_build
def test_cuda_bindings_check_arguments_before_touching_memory():
    """Bad arguments are ValueError/TypeError naming the argument, before any device access."""
    from pyqsim._C import cuda as cu
    zw = np.zeros(4, np.int32)
    bias = np.zeros(4, np.int32)
    z = np.zeros(4, np.int32)
    s = np.zeros(4, np.float32)
    ok = dict(x=0, x_type="int8", x_zero_point=0, w=0, w_format="int8", w_zero_point=zw, m=0, n=4, k=0, bias=bias,
              out_dtype="int32", multiplier=z, shift=z, out_zero_point=0, out_scale=s, y=0, stream=0)
    cu.int_gemm(**ok)  # M = K = 0: every operand is empty, nothing to touch, no device needed
    cases = [
        (dict(x_type="int16"), ValueError, "x_type"),
        (dict(w_format="int2"), ValueError, "w_format"),
        (dict(x_zero_point=300), ValueError, "x_zero_point"),
        (dict(w_zero_point=np.zeros(3, np.int32)), ValueError, "w_zero_point"),
        (dict(w_zero_point=np.zeros(4, np.int64)), TypeError, "w_zero_point"),
        (dict(w_zero_point=np.full(4, 200, np.int32)), ValueError, "w_zero_point"),
        (dict(bias=np.zeros(4, np.float32)), TypeError, "bias"),
        (dict(out_dtype="int16"), ValueError, "out_dtype"),
        (dict(out_dtype="int8", shift=np.zeros(4, np.int32), multiplier=np.ones(4, np.int32)), ValueError, "shift"),
        (dict(out_dtype="int8", shift=np.full(4, 3, np.int32), multiplier=np.ones(4, np.int32), out_zero_point=500),
         ValueError, "out_zero_point"),
        (dict(m=-1), ValueError, "M"),
        (dict(m=2, k=3), ValueError, r"^x is a null device address"),
        (dict(m=2, k=3, x=4096), ValueError, "x is not CUDA device memory"),
        (dict(k=3), ValueError, r"^w is a null device address"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            cu.int_gemm(**{**ok, **change})


class _CAI:
    """A minimal ``__cuda_array_interface__`` producer (what Numba/CuPy/PyTorch expose)."""

    def __init__(self, shape, typestr, ptr=0, strides=None, stream=None):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3,
                                         "strides": strides, "stream": stream}


def test_device_arrays_are_recognized_without_copies():
    a = _CAI((0, 3), "|i1")
    assert _device.is_device(a)
    assert not _device.is_device(np.zeros(3))
    d = _device.device_array(a, "x")
    assert (d.shape, d.dtype, d.ndim, d.size, d.ptr) == ((0, 3), np.dtype(np.int8), 2, 0, 0)
    assert d.reshape(3, 0).shape == (3, 0)
    with pytest.raises(ValueError, match="cannot reshape"):
        d.reshape(4)


def test_device_array_contract_errors():
    with pytest.raises(ValueError, match="x must be a C-contiguous device array"):
        _device.device_array(_CAI((2, 3), "|i1", strides=(1, 2)), "x")

    class DLPackOnly:
        def __dlpack_device__(self):
            return (2, 0)

    assert _device.is_device(DLPackOnly())
    with pytest.raises(TypeError, match="x: CUDA arrays are accepted through __cuda_array_interface__"):
        _device.device_array(DLPackOnly(), "x")


def test_op_layer_validates_device_arrays_by_shape_and_dtype():
    """Shapes and dtypes of device operands are checked like NumPy's, before any backend runs."""
    x = _CAI((0, 3), "|i1")
    with pytest.raises(TypeError, match="w must have dtype int8"):
        ops.int_gemm(x, _CAI((4, 3), "<i4"), backend="reference")
    with pytest.raises(ValueError, match="w must have K=3 columns"):
        ops.int_gemm(x, _CAI((4, 5), "|i1"), backend="reference")
    with pytest.raises(TypeError, match="x must have dtype int8 or uint8"):
        ops.int_gemm(_CAI((2, 3), "<f4"), np.zeros((4, 3), np.int8), backend="reference")


def test_host_backends_receive_host_copies_of_empty_device_operands():
    """The reference/cpu backends compute on host copies; an empty device operand needs no device."""
    x = _CAI((0, 3), "|u1")
    w = np.arange(12, dtype=np.int8).reshape(4, 3)
    for backend in ("reference", "cpu"):
        y = ops.int_gemm(x, w, x_zero_point=3, backend=backend)
        assert isinstance(y, np.ndarray) and y.shape == (0, 4) and y.dtype == np.int32


def test_simulated_without_the_emulator_is_a_clear_error(monkeypatch):
    """A build with PYQSIM_CUDA_SIMT=OFF: ``simulated()`` says so instead of failing on import inside."""
    from pyqsim.backends import cuda as cuda_backend

    real = cuda_backend.importlib.import_module

    def without_emulator(name, *args, **kwargs):
        if name == "pyqsim._cuda_simt":
            raise ImportError("No module named 'pyqsim._cuda_simt'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cuda_backend.importlib, "import_module", without_emulator)
    before = ops.available_backends()
    assert not cuda_backend.simulator_available()
    with pytest.raises(RuntimeError, match="built without the host SIMT emulator"):
        with cuda_backend.simulated():
            pass
    assert ops.available_backends() == before
