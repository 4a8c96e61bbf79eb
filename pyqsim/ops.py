"""The op table: every integer op declared once, dispatched to one backend (docs/spec.md).

``backend`` is ``"reference"`` (the NumPy golden model), ``"cpu"`` (C++ AVX2/scalar kernels),
``"cuda"`` or ``"auto"``. ``auto`` takes ``PYQSIM_BACKEND`` from the environment when set, else the
fastest backend that is available and implements the op (cuda, then cpu, then reference).
Arguments are validated once here (``pyqsim._checks``); backends receive canonical arguments.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from functools import lru_cache

import numpy as np

from . import _checks as C
from . import _device
from ._version import __version__
from .reference import conv as _rconv, gemm as _rgemm, int4 as _rint4, log2attn as _rlog, quant as _rquant
from .reference import requant as _rreq

BACKENDS = ("reference", "cpu", "cuda")
_AUTO_ORDER = ("cuda", "cpu", "reference")

__all__ = [
    "quantize", "dequantize", "quantize_log", "dequantize_log", "pack_int4", "unpack_int4",
    "quantize_multiplier", "quantize_multiplier_pair", "requantize", "int_gemm", "int_conv2d",
    "split_gemm", "split_conv2d", "log2_attn_matmul",
]

# Ops computed on the host for every backend: parameter derivation and layout, not arithmetic kernels.
HOST_OPS = ("dequantize", "dequantize_log", "pack_int4", "unpack_int4", "quantize_multiplier", "quantize_multiplier_pair")


def _reference_table() -> dict:
    numpy_engine = {
        "int_gemm": _rgemm.int_gemm_compute,
        "split_gemm": _rgemm.split_gemm_compute,
        "int_conv2d": _rconv.int_conv2d_compute,
        "split_conv2d": _rconv.split_conv2d_compute,
        "log2_attn_matmul": _rlog.log2_attn_matmul_compute,
        "requantize": _rreq.requantize_args_compute,
    }
    engine = os.environ.get("PYQSIM_REFERENCE_ENGINE", "numpy")
    if engine not in ("numpy", "numba"):
        raise ValueError(f"PYQSIM_REFERENCE_ENGINE must be 'numpy' or 'numba', got {engine!r}")
    if engine == "numba":
        from .reference import _numba as nb
        numpy_engine.update(int_gemm=nb.int_gemm_compute, requantize=nb.requantize_args_compute,
                            log2_attn_matmul=nb.log2_attn_matmul_compute)
    return numpy_engine


@lru_cache(maxsize=None)
def _backend_module(name: str):
    """The backend's module if it imports and reports itself available, else None."""
    if name == "reference":
        return None
    try:
        mod = importlib.import_module(f".backends.{name}", __package__)
    except ImportError:
        return None
    return mod if mod.available() else None


@lru_cache(maxsize=None)
def _table(backend: str) -> dict:
    if backend == "reference":
        return _reference_table()
    mod = _backend_module(backend)
    return dict(mod.OPS) if mod is not None else {}


def reset_backend_cache() -> None:
    """Forget which backends are available (after ``pyqsim.backends.cuda.simulated()`` switches the kernels)."""
    _backend_module.cache_clear()
    _table.cache_clear()


def unavailable_reason(backend: str) -> str:
    """Why ``backend`` cannot run here (not compiled, or compiled with no usable device); "" when it can."""
    if backend == "reference" or _backend_module(backend) is not None:
        return ""
    try:
        mod = importlib.import_module(f".backends.{backend}", __package__)
    except ImportError as exc:
        return f"its module does not import ({exc})"
    return mod.info().get("reason") or "see pyqsim.build_info()"


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first."""
    return [b for b in _AUTO_ORDER if b == "reference" or _backend_module(b) is not None]


def resolve_backend(backend: str, op: str) -> str:
    """The concrete backend that will run ``op`` for the requested ``backend``."""
    if backend == "auto":
        forced = os.environ.get("PYQSIM_BACKEND", "").strip()
        if forced:
            if forced not in BACKENDS:
                raise ValueError(f"PYQSIM_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
            backend = forced
        else:
            for b in _AUTO_ORDER:
                if op in _table(b):
                    return b
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if op not in _table(backend):
        if backend != "reference" and _backend_module(backend) is None:
            raise RuntimeError(f"backend {backend!r} is not available: {unavailable_reason(backend)}")
        raise RuntimeError(f"op {op!r} has no {backend!r} implementation")
    return backend


_SCOPE: contextvars.ContextVar[tuple] = contextvars.ContextVar("pyqsim_scope", default=())
_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("pyqsim_recorder", default=None)


@contextlib.contextmanager
def scope(name: str):
    """Name the ops called inside (e.g. a layer); scopes nest with '.'."""
    token = _SCOPE.set(_SCOPE.get() + (str(name),))
    try:
        yield
    finally:
        _SCOPE.reset(token)


@contextlib.contextmanager
def record():
    """Collect ``(scope, op, canonical args, result)`` for every kernel op called inside."""
    calls: list = []
    token = _RECORDER.set(calls)
    try:
        yield calls
    finally:
        _RECORDER.reset(token)


def _dispatch(op: str, backend: str, args):
    name = resolve_backend(backend, op)
    if name != "cuda" and _device.has_device_arrays(args):
        args = _device.to_host_args(args)  # the host backends compute on copies of device operands
    return _table(name)[op](args)


def run_canonical(op: str, args, backend: str = "auto"):
    """Run a kernel op on already-canonical arguments (replay of a recorded call)."""
    return _dispatch(op, backend, args)


def _run(op: str, backend: str, args):
    result = _dispatch(op, backend, args)
    calls = _RECORDER.get()
    if calls is not None:
        calls.append((".".join(_SCOPE.get()), op, args, result))
    return result


def _host(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}, got {backend!r}")


# --------------------------------------------------------------------------- float <-> codes


def quantize(x, scale, zero_point=0, dtype="int8", *, axis=None, bits=None, narrow=False, backend="auto"):
    """Uniform codes of float ``x`` (spec §2); per channel along ``axis``."""
    _host(backend)
    return _rquant.quantize(x, scale, zero_point, dtype, axis=axis, bits=bits, narrow=narrow)


def dequantize(q, scale, zero_point=0, *, axis=None, backend="auto"):
    """Float32 values of uniform codes (spec §2)."""
    _host(backend)
    return _rquant.dequantize(q, scale, zero_point, axis=axis)


def quantize_log(p, delta, bits=4, mode="sqrt2", *, backend="auto"):
    """log2 / log-sqrt2 codes of post-softmax ``p``, zero code ``2**bits - 1`` (spec §3)."""
    _host(backend)
    return _rquant.quantize_log(p, delta, bits, mode)


def dequantize_log(codes, delta, bits=4, mode="sqrt2", *, backend="auto"):
    """Float32 values of log codes (spec §3)."""
    _host(backend)
    return _rquant.dequantize_log(codes, delta, bits, mode)


def pack_int4(codes, signed=True, *, backend="auto"):
    """Pack int4/uint4 codes two per byte along the last axis, low nibble first (spec §1.1)."""
    _host(backend)
    return _rint4.pack_int4(codes, signed)


def unpack_int4(packed, length, signed=True, *, backend="auto"):
    """Unpack ``length`` int4/uint4 codes per row (spec §1.1)."""
    _host(backend)
    return _rint4.unpack_int4(packed, length, signed)


def quantize_multiplier(real_scale, *, backend="auto"):
    """(multiplier int32, shift int32) with ``real ~= M0 * 2**-shift`` (spec §6.1)."""
    _host(backend)
    return _rreq.quantize_multiplier(real_scale)


def quantize_multiplier_pair(real_scale1, real_scale2, *, backend="auto"):
    """(multiplier1, multiplier2, shift) sharing one shift (spec §8)."""
    _host(backend)
    return _rreq.quantize_multiplier_pair(real_scale1, real_scale2)


# --------------------------------------------------------------------------- integer kernels


def requantize(acc, multiplier, shift, zero_point=0, out_dtype="int8", *, axis=-1, backend="auto"):
    """Requantize int32 ``acc`` by fixed-point multipliers, one rounding (spec §6)."""
    return _run("requantize", backend, C.requantize_args(acc, multiplier, shift, zero_point, out_dtype, axis))


def int_gemm(x, w, *, x_zero_point=0, w_zero_point=0, bias=None, w_format="int8", out_dtype="int32",
             multiplier=None, shift=None, out_zero_point=0, out_scale=None, backend="auto"):
    """Integer ``x @ w.T`` (x [M,K] int8/uint8, w [N,K] int8 or packed int4) with one output stage (spec §4, §6)."""
    args = C.gemm_args(x, w, x_zero_point, w_zero_point, bias, w_format, out_dtype, multiplier, shift,
                       out_zero_point, out_scale)
    return _run("int_gemm", backend, args)


def int_conv2d(x, w, *, stride=1, padding=0, dilation=1, groups=1, x_zero_point=0, w_zero_point=0, bias=None,
               w_format="int8", kernel_size=None, out_dtype="int32", multiplier=None, shift=None, out_zero_point=0,
               out_scale=None, backend="auto"):
    """Integer NCHW conv2d with zero-point padding and one output stage (spec §5, §6)."""
    args = C.conv_args(x, w, stride, padding, dilation, groups, x_zero_point, w_zero_point, bias, w_format,
                       kernel_size, out_dtype, multiplier, shift, out_zero_point, out_scale)
    return _run("int_conv2d", backend, args)


def split_gemm(x1, w1, x2, w2, *, x1_zero_point=0, x2_zero_point=0, w1_zero_point=0, w2_zero_point=0, bias=None,
               w1_format="int8", w2_format="int8", out_dtype="int8", multiplier1=None, multiplier2=None, shift=None,
               out_zero_point=0, out_scale1=None, out_scale2=None, backend="auto"):
    """Split-shortcut GEMM: two accumulations, one output, one rounding (spec §8)."""
    args = C.split_gemm_args(x1, w1, x2, w2, x1_zero_point, x2_zero_point, w1_zero_point, w2_zero_point, bias,
                             w1_format, w2_format, out_dtype, multiplier1, multiplier2, shift, out_zero_point,
                             out_scale1, out_scale2)
    return _run("split_gemm", backend, args)


def split_conv2d(x1, w1, x2, w2, *, stride=1, padding=0, dilation=1, x1_zero_point=0, x2_zero_point=0,
                 w1_zero_point=0, w2_zero_point=0, bias=None, w1_format="int8", w2_format="int8", kernel_size=None,
                 out_dtype="int8", multiplier1=None, multiplier2=None, shift=None, out_zero_point=0,
                 out_scale1=None, out_scale2=None, backend="auto"):
    """Split-shortcut conv2d over ``concat(x1, x2)`` channels, one rounding (spec §8)."""
    args = C.split_conv_args(x1, w1, x2, w2, stride, padding, dilation, x1_zero_point, x2_zero_point,
                             w1_zero_point, w2_zero_point, bias, w1_format, w2_format, kernel_size, out_dtype,
                             multiplier1, multiplier2, shift, out_zero_point, out_scale1, out_scale2)
    return _run("split_conv2d", backend, args)


def log2_attn_matmul(codes, v, *, v_zero_point=0, bits=4, mode="sqrt2", frac_bits=16, out_dtype="int64",
                     multiplier=None, shift=None, out_zero_point=0, out_scale=None, backend="auto"):
    """``attn @ (v - zv)`` from log codes with shifts and adds, then one output stage (spec §7)."""
    args = C.log2_attn_args(codes, v, v_zero_point, bits, mode, frac_bits, out_dtype, multiplier, shift,
                            out_zero_point, out_scale)
    return _run("log2_attn_matmul", backend, args)


# --------------------------------------------------------------------------- build


def build_info() -> dict:
    """What this installation holds: version, backends, compiled SIMD level, CUDA."""
    info = {
        "version": __version__,
        "numpy": np.__version__,
        "backends": {b: (b == "reference" or _backend_module(b) is not None) for b in BACKENDS},
        "reference_engine": os.environ.get("PYQSIM_REFERENCE_ENGINE", "numpy"),
    }
    for name in ("cpu", "cuda"):
        try:
            mod = importlib.import_module(f".backends.{name}", __package__)
        except ImportError as exc:
            info[name] = {"compiled": False, "reason": str(exc)}
            continue
        info[name] = mod.info()
    info["cuda_devices"] = int(info["cuda"].get("devices", 0) or 0)
    return info
