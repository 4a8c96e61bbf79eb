"""CUDA backend: canonical op arguments (``pyqsim._checks``) -> ``pyqsim._C.cuda`` kernels. No math here.

Device operands (PyTorch CUDA tensors, CuPy arrays, any ``__cuda_array_interface__`` producer) are used
in place and the result is allocated by the same library on the same device, computed asynchronously
on the caller's current stream (the activation's library decides it). NumPy operands are copied to the
device; when every operand is NumPy the result is copied back (a synchronizing call).
"""
from __future__ import annotations

import contextlib
import importlib

import numpy as np

from .._device import DeviceArray
from ..numerics import NATIVE as _NATIVE_NUMERICS

try:
    from .. import _C
except ImportError as _exc:  # pragma: no cover - builds without the extension
    _C, _cu, _IMPORT_ERROR = None, None, str(_exc)
else:
    _cu = getattr(_C, "cuda", None)
    _IMPORT_ERROR = None if _cu is not None else ("pyqsim was built without the CUDA kernels (at install time "
                                                  "PYQSIM_CUDA was OFF, or AUTO found no nvcc or no GPU)")
_GPU_MODULE = _cu  # the kernels compiled by nvcc (None without them); _cu is the module the ops call
NUMERICS = _NATIVE_NUMERICS  # spec §14: the exact int32 op, then the profile's stage (csrc/numerics.h)
generation = 0  # counts switches of _cu; pyqsim.ops caches this backend's availability per generation


def simulator_available() -> bool:
    """``pyqsim._cuda_simt`` (the CUDA kernel sources built for the host SIMT emulator) is importable."""
    try:
        importlib.import_module("pyqsim._cuda_simt")
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def simulated():
    """Inside, ``backend="cuda"`` runs the CUDA kernel sources on the host SIMT emulator (``pyqsim._cuda_simt``,
    docs/spec.md §13) instead of a GPU: NumPy operands only, bit for bit what the kernels compute, no timing.
    A testing and debugging aid; it changes process-wide state, so do not use it from several threads."""
    global _cu
    try:
        sim = importlib.import_module("pyqsim._cuda_simt")
    except ImportError as exc:
        raise RuntimeError("pyqsim was built without the host SIMT emulator (PYQSIM_CUDA_SIMT=OFF or no "
                           f"ucontext.h): {exc}") from None
    global generation
    saved = _cu
    _cu = sim
    generation += 1  # the op table re-reads this backend's availability (pyqsim.ops keys its caches on it)
    try:
        yield
    finally:
        _cu = saved
        generation += 1


MIN_CAPABILITY = 80  # mma.sync int8 m16n8k32, ldmatrix, cp.async


def _devices() -> int:
    return _cu.device_count() if _cu is not None else 0


def _usable(ordinal: int, mod=None) -> bool:
    return (mod or _cu).device_capability(ordinal) >= MIN_CAPABILITY


def available() -> bool:
    """Compiled with CUDA and a device of compute capability 8.0 or newer visible."""
    return _cu is not None and any(_usable(i) for i in range(_devices()))


def info() -> dict:
    """The nvcc-built kernels and the GPUs they see (never the emulator's device)."""
    if _C is None:
        return {"compiled": False, "devices": 0, "reason": _IMPORT_ERROR, "simulator": simulator_available()}
    d = dict(_C.build_info()["cuda"])
    d["compiled"] = _GPU_MODULE is not None
    d["simulator"] = simulator_available()
    if _GPU_MODULE is None:
        d["reason"] = _IMPORT_ERROR
        d["devices"] = 0
        return d
    gpu = _GPU_MODULE
    d["device_names"] = [gpu.device_name(i) for i in range(d["devices"])]
    d["device_capabilities"] = [gpu.device_capability(i) for i in range(d["devices"])]
    if not d["devices"]:
        d["reason"] = ("the CUDA kernels are compiled, but no CUDA device (GPU) is visible "
                       f"({d.get('error') or 'cudaGetDeviceCount returned 0'})")
    elif not any(_usable(i, gpu) for i in range(d["devices"])):
        d["reason"] = (f"the CUDA kernels are compiled, but no CUDA device of compute capability >= "
                       f"{MIN_CAPABILITY // 10}.0 is visible (the kernels need sm_80+)")
    return d


_TORCH_OUT = {"int8": "int8", "uint8": "uint8", "int4": "int8", "uint4": "uint8", "int32": "int32",
              "int64": "int64", "float32": "float32"}
_NP_OUT = {"int8": np.int8, "uint8": np.uint8, "int4": np.int8, "uint4": np.uint8, "int32": np.int32,
           "int64": np.int64, "float32": np.float32}


class _Call:
    """Device addresses for one op call: device operands in place, NumPy ones uploaded, one output.
    A context manager: the caller's current device is restored on exit."""

    def __init__(self, *arrays):
        dev = [a for a in arrays if isinstance(a, DeviceArray)]
        self.lead = dev[0] if dev else None
        for a in dev[1:]:
            if a.device != self.lead.device:
                raise ValueError(f"all CUDA operands must be on one device, got devices {self.lead.device} "
                                 f"and {a.device}")
        self.device = self.lead.device if self.lead is not None else _cu.current_device()
        if not _usable(self.device):
            raise RuntimeError(f"CUDA device {self.device} has compute capability "
                               f"{_cu.device_capability(self.device) / 10:.1f}; pyqsim's kernels need 8.0 or newer")
        self.stream = self.lead.stream if self.lead is not None else 0
        self._keep = []

    def __enter__(self):
        self._saved = _cu.current_device()
        _cu.set_device(self.device)
        return self

    def __exit__(self, *exc):
        _cu.set_device(self._saved)
        return False

    def ptr(self, a) -> int:
        if isinstance(a, DeviceArray):
            return a.ptr
        a = np.ascontiguousarray(a)
        buf = _cu.Buffer(a.nbytes, self.stream)
        if a.nbytes:
            buf.upload(a)
        self._keep.append(buf)
        return buf.ptr

    def scratch(self, nbytes: int) -> int:
        """A device buffer kept for the call (stream-ordered)."""
        buf = _cu.Buffer(int(nbytes), self.stream)
        self._keep.append(buf)
        return buf.ptr

    def output(self, shape, dtype: str):
        """(device address, finisher returning the result array)."""
        shape = tuple(int(s) for s in shape)
        if self.lead is None:
            host = np.empty(shape, _NP_OUT[dtype])
            buf = _cu.Buffer(host.nbytes, self.stream)
            self._keep.append(buf)

            def finish():
                if host.nbytes:
                    buf.download(host)
                return host
            return buf.ptr, finish
        kind = self.lead.kind
        if kind == "torch":
            import torch
            out = torch.empty(shape, dtype=getattr(torch, _TORCH_OUT[dtype]), device=f"cuda:{self.lead.device}")
            return int(out.data_ptr()), lambda: out
        try:  # "cupy" and other __cuda_array_interface__ producers get CuPy arrays, else PyTorch tensors
            import cupy
        except ImportError:
            if kind == "cupy":
                raise
            try:
                import torch
            except ImportError:
                raise RuntimeError("a result for a __cuda_array_interface__ input is returned as a CuPy array or a "
                                   "PyTorch tensor: install one of them") from None
            out = torch.empty(shape, dtype=getattr(torch, _TORCH_OUT[dtype]), device=f"cuda:{self.lead.device}")
            return int(out.data_ptr()), lambda: out
        with cupy.cuda.Device(self.lead.device):
            out = cupy.empty(shape, dtype=_NP_OUT[dtype])
        return int(out.data.ptr), lambda: out



def _profile_pass(c, o, shape, n: int, inner: int, run):
    """A runtime profile (spec §14) on device: the exact int32 op into scratch (``run(acc_ptr)``), then its stage."""
    outer = shape[0]
    acc = c.scratch(outer * n * inner * 4)
    run(acc)
    y, finish = c.output(shape, o.dtype)
    _cu.requantize_profile(acc, outer, n, inner, o.numerics, o.dtype, o.multiplier, o.shift, o.scale, o.zero_point, y,
                           c.stream)
    return finish()


def _int_gemm(a):
    o = a.out
    with _Call(a.x, a.w) as c:
        m, n = a.x.shape[0], a.w.shape[0]

        def run(y, dtype, mult, shift, zy, scale):
            _cu.int_gemm(c.ptr(a.x), a.x_type, a.x_zero_point, c.ptr(a.w), a.w_format, a.w_zero_point, m, n, a.k,
                         a.bias, dtype, mult, shift, zy, scale, y, c.stream)
        if o.runtime_profile:
            return _profile_pass(c, o, (m, n), n, 1,
                                 lambda acc: run(acc, "int32", o.multiplier, o.shift, 0, o.scale))
        y, finish = c.output((m, n), o.dtype)
        run(y, o.dtype, o.multiplier, o.shift, o.zero_point, o.scale)
        return finish()


def _int_conv2d(a):
    o = a.out
    with _Call(a.x, a.w) as c:
        b, _, _, _ = a.x.shape
        n = a.w.shape[0]
        shape = (b, n) + tuple(a.out_hw)

        def run(y, dtype, mult, shift, zy, scale):
            _cu.int_conv2d(c.ptr(a.x), a.x_type, a.x_zero_point, c.ptr(a.w), a.w_format, a.w_zero_point,
                           tuple(a.x.shape), n, a.kernel_size, a.stride, a.padding, a.dilation, a.groups, a.out_hw,
                           a.bias, dtype, mult, shift, zy, scale, y, c.stream)
        if o.runtime_profile:
            return _profile_pass(c, o, shape, n, shape[2] * shape[3],
                                 lambda acc: run(acc, "int32", o.multiplier, o.shift, 0, o.scale))
        y, finish = c.output(shape, o.dtype)
        run(y, o.dtype, o.multiplier, o.shift, o.zero_point, o.scale)
        return finish()


def _split_gemm(s):
    a, b, o = s.a, s.b, s.out
    with _Call(a.x, b.x, a.w, b.w) as c:
        m, n = a.x.shape[0], a.w.shape[0]
        y, finish = c.output((m, n), o.dtype)
        _cu.split_gemm(c.ptr(a.x), a.x_type, a.x_zero_point, c.ptr(a.w), a.w_format, a.w_zero_point, a.k,
                       c.ptr(b.x), b.x_type, b.x_zero_point, c.ptr(b.w), b.w_format, b.w_zero_point, b.k, m, n, a.bias,
                       o.dtype, o.multiplier1, o.multiplier2, o.shift, o.zero_point, o.scale1, o.scale2, y, c.stream)
        return finish()


def _split_conv2d(s):
    a, b, o = s.a, s.b, s.out
    with _Call(a.x, b.x, a.w, b.w) as c:
        bt, c1, h, w = a.x.shape
        n = a.w.shape[0]
        y, finish = c.output((bt, n) + tuple(a.out_hw), o.dtype)
        _cu.split_conv2d(c.ptr(a.x), a.x_type, a.x_zero_point, c.ptr(a.w), a.w_format, a.w_zero_point, c1,
                         c.ptr(b.x), b.x_type, b.x_zero_point, c.ptr(b.w), b.w_format, b.w_zero_point, b.x.shape[1],
                         (bt, h, w), n, a.kernel_size, a.stride, a.padding, a.dilation, a.out_hw, a.bias, o.dtype,
                         o.multiplier1, o.multiplier2, o.shift, o.zero_point, o.scale1, o.scale2, y, c.stream)
        return finish()


def _requantize(a):
    o = a.out
    with _Call(a.acc) as c:
        outer, n, inner = a.acc.shape
        y, finish = c.output(a.shape, o.dtype)
        if o.runtime_profile:
            _cu.requantize_profile(c.ptr(a.acc), outer, n, inner, o.numerics, o.dtype, o.multiplier, o.shift, o.scale,
                                   o.zero_point, y, c.stream)
            return finish()
        _cu.requantize(c.ptr(a.acc), outer, n, inner, o.dtype, o.multiplier, o.shift, o.zero_point, y, c.stream)
        return finish()


def _log2_attn_matmul(a):
    """§7 on device; the batched form is one launch of the 2-D kernel per leading index."""
    o = a.out
    with _Call(a.codes, a.v) as c:
        *lead, m, length = a.codes.shape
        n = a.v.shape[-1]
        y, finish = c.output((*lead, m, n), o.dtype)
        cp, vp = c.ptr(a.codes), c.ptr(a.v)
        ybytes = m * n * np.dtype(_NP_OUT[o.dtype]).itemsize
        for i in range(int(np.prod(lead, dtype=np.int64))):
            _cu.log2_attn_matmul(cp + i * m * length, vp + i * length * n, a.v_type, a.v_zero_point, m, length, n,
                                 a.bits, a.k, a.frac_bits, o.dtype, o.multiplier, o.shift, o.zero_point, o.scale,
                                 y + i * ybytes, c.stream)
        return finish()


OPS = {
    "int_gemm": _int_gemm,
    "split_gemm": _split_gemm,
    "int_conv2d": _int_conv2d,
    "split_conv2d": _split_conv2d,
    "requantize": _requantize,
    "log2_attn_matmul": _log2_attn_matmul,
}
