"""The op table: every integer op declared once, dispatched to one backend (docs/spec.md).

``backend`` is ``"reference"`` (the NumPy golden model), ``"cpu"`` (C++ AVX2/scalar kernels),
``"cuda"`` or ``"auto"``. ``auto`` takes ``PYQSIM_BACKEND`` from the environment when set, else the
fastest backend that is available and implements the op (cuda, then cpu, then reference).
Arguments are validated once here (``pyqsim._checks``); backends receive canonical arguments.
"""
from __future__ import annotations

import contextlib
import dataclasses
import contextvars
import importlib
import os
import sys
from functools import lru_cache

import numpy as np

from . import _checks as C
from . import _device
from ._version import __version__
from .numerics import NAMES as NUMERICS, profile as _profile
from .reference import conv as _rconv, floatops as _rfloat, gemm as _rgemm, int4 as _rint4, log2attn as _rlog
from .reference import layout as _rlayout, profiles as _rprof, quant as _rquant, requant as _rreq

BACKENDS = ("reference", "cpu", "cuda")
_AUTO_ORDER = ("cuda", "cpu", "reference")

__all__ = [
    "quantize", "dequantize", "quantize_log", "dequantize_log", "pack_int4", "unpack_int4",
    "quantize_multiplier", "quantize_multiplier_pair", "requantize", "int_gemm", "int_bmm", "int_conv2d",
    "split_gemm", "split_conv2d", "log2_attn_matmul", "pack_weight", "output_stage", "requant_scale",
    "softmax", "layer_norm", "group_norm", "gelu", "silu", "add", "concat", "resample_nearest",
]

PackedWeight = C.PackedWeight
# Ops outside the golden-vector format (it holds integer kernel ops): the quantize steps and the float stages.
UNRECORDED = ("quantize", "quantize_log", "softmax", "layer_norm", "group_norm", "gelu", "silu", "add", "concat",
              "resample_nearest")
# Ops whose canonical arguments hold each activation as itself or a reshaped view and nothing computed from its
# values (quantize: unless the checks scan them), so that ``Prepared`` may swap activations in.
PREPARABLE = ("int_gemm", "int_conv2d", "split_gemm", "split_conv2d", "int_bmm", "quantize", "softmax", "layer_norm",
              "group_norm", "gelu", "silu", "add")
# Kernel ops without CUDA kernels: backend="cuda" runs them on the host (cpu, else reference; spec §13, §15.7).
HOST_FALLBACK = UNRECORDED + ("int_bmm",)


def _codes_of(y: np.ndarray, spec):
    """Spec §15.9 on the reference: the float32 result, or its §2 / §3 codes."""
    if spec is None:
        return y
    if spec.log:
        return _rquant.quantize_log(y, spec.delta, spec.bits, spec.mode)
    return _rquant.quantize(y, spec.scale, spec.zero_point, "uint8", bits=spec.bits)


def _reference_table() -> dict:
    numpy_engine = {
        "int_gemm": _rgemm.int_gemm_compute,
        "int_bmm": _rgemm.int_bmm_compute,
        "split_gemm": _rgemm.split_gemm_compute,
        "int_conv2d": _rconv.int_conv2d_compute,
        "split_conv2d": _rconv.split_conv2d_compute,
        "log2_attn_matmul": _rlog.log2_attn_matmul_compute,
        "requantize": _rreq.requantize_args_compute,
        "quantize": _rquant.quantize_compute,
        "quantize_log": _rquant.quantize_log_compute,
        "softmax": lambda a: _codes_of(_rfloat.softmax(a.x), a.codes),
        "layer_norm": lambda a: _codes_of(_rfloat.layer_norm(a.x, a.weight, a.bias, a.eps), a.codes),
        "group_norm": lambda a: _codes_of(_rfloat.group_norm(a.x, a.groups, a.weight, a.bias, a.eps), a.codes),
        "gelu": lambda a: _codes_of(_rfloat.gelu(a.x, "tanh" if a.op == "gelu_tanh" else "none"), a.codes),
        "silu": lambda a: _codes_of(_rfloat.silu(a.x), a.codes),
        "add": lambda a: _rfloat.add(a.a.reshape(-1, a.m, a.inner), a.b.reshape(-1, 1)).reshape(a.a.shape),
        "concat": lambda a: _rlayout.concat(a.xs, a.axis),
        "resample_nearest": lambda a: _rlayout.resample_nearest(a.x, a.rows, a.cols),
    }
    engine = os.environ.get("PYQSIM_REFERENCE_ENGINE", "numpy")
    if engine not in ("numpy", "numba"):
        raise ValueError(f"PYQSIM_REFERENCE_ENGINE must be 'numpy' or 'numba', got {engine!r}")
    if engine == "numba":
        from .reference import _numba as nb
        numpy_engine.update(int_gemm=nb.int_gemm_compute, requantize=nb.requantize_args_compute,
                            log2_attn_matmul=nb.log2_attn_matmul_compute)
    return numpy_engine


_BACKEND_MODULES = tuple(f"{__package__}.backends.{b}" for b in BACKENDS[1:])


def _generation() -> tuple:
    """Changes whenever a loaded backend switches its kernels (``generation`` counters that the backends own, e.g.
    ``pyqsim.backends.cuda.simulated()``); the caches below are keyed on it, so no backend needs to call back here."""
    mods = sys.modules
    return tuple([getattr(mods.get(m), "generation", 0) for m in _BACKEND_MODULES])


@lru_cache(maxsize=64)
def _backend_module_at(name: str, generation: tuple):
    if name == "reference":
        return None
    try:
        mod = importlib.import_module(f".backends.{name}", __package__)
    except ImportError:
        return None
    return mod if mod.available() else None


def _backend_module(name: str):
    """The backend's module if it imports and reports itself available, else None."""
    return _backend_module_at(name, _generation())


@lru_cache(maxsize=64)
def _table_at(backend: str, generation: tuple) -> dict:
    if backend == "reference":
        return _reference_table()
    mod = _backend_module(backend)
    return dict(mod.OPS) if mod is not None else {}


def _table(backend: str) -> dict:
    return _table_at(backend, _generation())


def reset_backend_cache() -> None:
    """Forget which backends are available and which reference engine is selected."""
    _backend_module_at.cache_clear()
    _table_at.cache_clear()
    _kernel_at.cache_clear()


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


def _numerics_of(name: str) -> tuple:
    """The numerics profiles (spec §14) a backend implements."""
    return NUMERICS if name == "reference" else getattr(_backend_module(name), "NUMERICS", ("pyqsim",))


def resolve_backend(backend: str, op: str, numerics: str = "pyqsim") -> str:
    """The concrete backend that will run ``op`` (under the ``numerics`` profile) for the requested ``backend``."""
    return _kernel(backend, op, numerics)[0]


def _kernel(backend: str, op: str, numerics: str) -> tuple:
    """(concrete backend, its function for ``op``): resolved once per request, forced backend and generation."""
    forced = os.environ.get("PYQSIM_BACKEND", "") if backend == "auto" else ""
    return _kernel_at(backend, op, numerics, forced.strip(), _generation())


@lru_cache(maxsize=1024)
def _kernel_at(backend: str, op: str, numerics: str, forced: str, generation: tuple) -> tuple:
    name = _resolve(backend, op, numerics, forced)
    return name, _table(name)[op]


def _resolve(backend: str, op: str, numerics: str, forced: str) -> str:
    if backend == "auto":
        if forced:
            if forced not in BACKENDS:
                raise ValueError(f"PYQSIM_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
            backend = forced
        else:
            for b in _AUTO_ORDER:
                if op in _table(b) and numerics in _numerics_of(b):
                    return b
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "cuda" and op in HOST_FALLBACK and op not in _table("cuda"):
        backend = "cpu" if op in _table("cpu") else "reference"
    if op not in _table(backend):
        if backend != "reference" and _backend_module(backend) is None:
            raise RuntimeError(f"backend {backend!r} is not available: {unavailable_reason(backend)}")
        raise RuntimeError(f"op {op!r} has no {backend!r} implementation")
    if numerics not in _numerics_of(backend):
        raise RuntimeError(f"backend {backend!r} does not implement numerics={numerics!r} (spec §14); "
                           f"it implements {', '.join(map(repr, _numerics_of(backend)))}")
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


def recording() -> bool:
    """Whether op calls are being collected (inside :func:`record`)."""
    return _RECORDER.get() is not None


@contextlib.contextmanager
def record():
    """Collect ``(scope, op, canonical args, result)`` for every integer kernel op called inside (not the
    ``UNRECORDED`` ops: quantize and the float stages)."""
    calls: list = []
    token = _RECORDER.set(calls)
    try:
        yield calls
    finally:
        _RECORDER.reset(token)


def _dispatch(op: str, backend: str, args):
    out = getattr(args, "out", None)
    name, fn = _kernel(backend, op, getattr(out, "numerics", "pyqsim"))
    if name != "cuda" and _device.has_device_arrays(args):
        args = _device.to_host_args(args)  # the host backends compute on copies of device operands
    return fn(args)


def _scan_values(op: str, backend: str) -> bool:
    """Whether the argument checks must scan ``op``'s float input for non-finite values: unless the backend that will
    run it rejects them in its kernel's own pass (its ``VALUE_CHECKED``)."""
    return op not in getattr(_backend_module(_kernel(backend, op, "pyqsim")[0]), "VALUE_CHECKED", ())


def run_canonical(op: str, args, backend: str = "auto"):
    """Run a kernel op on already-canonical arguments (replay of a recorded call)."""
    return _dispatch(op, backend, args)


def _run(op: str, backend: str, args):
    seen = _CAPTURE.get()
    if seen is not None:
        seen.append((op, backend, args))
    result = _dispatch(op, backend, args)
    if seen is not None:
        seen.append(result)
    if op in UNRECORDED:
        return result
    calls = _RECORDER.get()
    if calls is not None:
        if getattr(args, "out_array", None) is not None:  # record the call as one returning a new array
            args, result = dataclasses.replace(args, out_array=None), np.array(result)
        calls.append((".".join(_SCOPE.get()), op, args, result))
    return result


_CAPTURE: contextvars.ContextVar[list | None] = contextvars.ContextVar("pyqsim_capture", default=None)


def _fields(args, path=()):
    """(path, value) of every field of canonical arguments, nested dataclasses included."""
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            yield from _fields(v, path + (f.name,))
        else:
            yield path + (f.name,), v


def _swapped(args, path, value):
    """A copy of frozen canonical arguments with the field at ``path`` set to ``value``."""
    new = object.__new__(type(args))
    new.__dict__.update(args.__dict__)
    new.__dict__[path[0]] = value if len(path) == 1 else _swapped(args.__dict__[path[0]], path[1:], value)
    return new


class Prepared:
    """One call site of an op whose arguments other than the activations are constant (a program node):
    ``run(fn, *activations)`` with ``fn(*activations)`` calling the op. The first run calls ``fn``, with every check,
    and keeps the op's canonical arguments; a later run whose activations have the same dtypes, shapes and strides
    reuses them with the new activations in place, checking nothing else again. A run that does not match calls
    ``fn``; an op outside ``PREPARABLE``, checks that read activation values (``_scan_values``) or copy an
    activation keep nothing."""

    def __init__(self):
        # (activations' (dtype, shape, strides), op, backend, arguments without the activations,
        #  [(field path, activation index, (shape, strides) of its reshaped view, or None)]), or None
        self._plan = None

    def run(self, fn, *acts):
        key = tuple((a.dtype, a.shape, a.strides) if type(a) is np.ndarray else None for a in acts)
        plan = self._plan
        if plan is not None and plan[0] == key:
            _, op, backend, args, places = plan
            for path, i, view in places:
                a = acts[i]
                if view is not None:
                    a = a.reshape(view[0])
                    if a.strides != view[1]:  # the strides of its length-1 axes
                        a = np.lib.stride_tricks.as_strided(a, view[0], view[1])
                args = _swapped(args, path, a)
            return _run(op, backend, args)
        seen = []
        token = _CAPTURE.set(seen)
        try:
            result = fn(*acts)
        finally:
            _CAPTURE.reset(token)
        self._plan = None
        if len(seen) == 2 and seen[1] is result and None not in key:
            self._plan = self._learn(key, acts, *seen[0])
        return result

    @staticmethod
    def _learn(key, acts, op, backend, args):
        """Where each activation sits in ``args`` (itself or a reshaped view of it), or None."""
        if op not in PREPARABLE or (op == "quantize" and _scan_values(op, backend)):
            return None
        places, found, kept = [], set(), args
        for path, v in _fields(args):
            for i, a in enumerate(acts):
                if v is a:
                    places.append((path, i, None))
                elif (isinstance(v, np.ndarray) and v.size == a.size and v.dtype == a.dtype and a.size
                      and v.__array_interface__["data"][0] == a.__array_interface__["data"][0]
                      and all(s == t for s, t, n in zip(a.reshape(v.shape).strides, v.strides, v.shape) if n > 1)):
                    places.append((path, i, (v.shape, v.strides)))
                else:
                    continue
                found.add(i)
                kept = _swapped(kept, path, None)  # the kept arguments hold no activation
                break
        return (key, op, backend, kept, places) if len(found) == len(acts) else None


def _host(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}, got {backend!r}")


# --------------------------------------------------------------------------- float <-> codes


def quantize(x, scale, zero_point=0, dtype="int8", *, axis=None, bits=None, narrow=False, numerics="pyqsim",
             backend="auto"):
    """Uniform codes of float ``x`` (spec §2, rounding per ``numerics`` §14); per channel along ``axis``."""
    if _profile(numerics).name != "pyqsim":  # the target profiles' quantize steps run on the host (§14)
        _host(backend)
        return _rquant.quantize(x, scale, zero_point, dtype, axis=axis, bits=bits, narrow=narrow, numerics=numerics)
    return _run("quantize", backend, C.quantize_args(x, scale, zero_point, dtype, axis, bits, narrow,
                                                     _scan_values("quantize", backend)))


def dequantize(q, scale, zero_point=0, *, axis=None, backend="auto"):
    """Float32 values of uniform codes (spec §2)."""
    _host(backend)
    return _rquant.dequantize(q, scale, zero_point, axis=axis)


def quantize_log(p, delta, bits=4, mode="sqrt2", *, backend="auto"):
    """log2 / log-sqrt2 codes of post-softmax ``p``, zero code ``2**bits - 1`` (spec §3)."""
    return _run("quantize_log", backend,
                C.quantize_log_args(p, delta, bits, mode, _scan_values("quantize_log", backend)))


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


def quantize_multiplier(real_scale, *, numerics="pyqsim", backend="auto"):
    """The ``(multiplier, shift)`` that ``requantize(..., numerics=)`` takes for a real scale (spec §6.1, §14):
    int32 ``M0`` and shift with ``real ~= M0 * 2**-shift``, or a float32 scale and ``None`` (float profiles)."""
    _host(backend)
    return _rreq.quantize_multiplier(real_scale, numerics)


def requant_scale(x_scale, w_scale, y_scale, *, numerics="pyqsim", backend="auto"):
    """The real scale ``s_x * s_w / s_y`` rounded as the profile's runtime forms it (spec §14)."""
    _host(backend)
    return _rprof.requant_scale(x_scale, w_scale, y_scale, numerics)


def quantize_multiplier_pair(real_scale1, real_scale2, *, backend="auto"):
    """(multiplier1, multiplier2, shift) sharing one shift (spec §8)."""
    _host(backend)
    return _rreq.quantize_multiplier_pair(real_scale1, real_scale2)


# --------------------------------------------------------------------------- integer kernels


def requantize(acc, multiplier, shift, zero_point=0, out_dtype="int8", *, axis=-1, numerics="pyqsim", backend="auto"):
    """Requantize int32 ``acc`` by ``quantize_multiplier``'s parameters (spec §6; other profiles §14)."""
    return _run("requantize", backend, C.requantize_args(acc, multiplier, shift, zero_point, out_dtype, axis, numerics))


def output_stage(n, out_dtype="int32", *, multiplier=None, shift=None, out_zero_point=0, out_scale=None,
                 numerics="pyqsim"):
    """Validate the output stage of an integer op with ``n`` output channels once (spec §6): a handle that
    ``int_gemm``, ``int_conv2d``, ``int_bmm`` and ``log2_attn_matmul`` accept as ``out_dtype`` (their other output
    keywords left unset), with the same result as passing the keywords."""
    n = C.as_int(n, "n")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return C.out_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale, C.GEMM_OUT + ("int64",), numerics)


def pack_weight(w, *, w_format="int8", w_zero_point=0, kind="gemm", kernel_size=None, groups=1, k=None,
                cin_per_group=None, backend="auto"):
    """Validate a GEMM or conv weight once and prepack it: a :class:`PackedWeight` that ``int_gemm``,
    ``int_conv2d`` and the split ops accept in place of ``w`` (identical results; spec §4.4).

    ``k`` is the unpacked K of a packed int4/uint4 GEMM weight; ``cin_per_group`` the C/groups of a packed
    int4/uint4 conv weight (``kernel_size`` required too). ``backend``: ``"auto"`` prepacks for every available
    backend that has a packed form (``cpu``), a backend name for that one only, ``"reference"`` for none.
    """
    _host(backend)
    h = C.pack_weight_args(w, w_format, w_zero_point, kind, kernel_size, groups, k, cin_per_group)
    names = [b for b in available_backends() if b != "reference"] if backend == "auto" else [backend]
    if backend == "auto" and os.environ.get("PYQSIM_BACKEND", "").strip():
        names = [resolve_backend("auto", "int_gemm")]
    for name in names:
        if name == "reference":
            continue
        mod = _backend_module(name)
        if mod is None:
            raise RuntimeError(f"backend {name!r} is not available in this build/process (see pyqsim.build_info())")
        packer = getattr(mod, "pack_weight", None)
        if packer is None:
            continue  # this backend computes from the plain array
        h.native[name] = packer(h.w, h.w_format, k=h.k, kind=h.kind, kernel_size=h.kernel_size, groups=h.groups,
                                cin_per_group=h.cin_per_group)
    return h


def int_gemm(x, w, *, x_zero_point=0, w_zero_point=None, bias=None, w_format=None, out_dtype="int32",
             multiplier=None, shift=None, out_zero_point=0, out_scale=None, numerics="pyqsim", backend="auto"):
    """Integer ``x @ w.T`` (x [M,K] int8/uint8, w [N,K] int8 or packed int4, or a :class:`PackedWeight`) with one
    output stage (spec §4, §6, §14). ``w_format`` defaults to "int8" and ``w_zero_point`` to 0 (a handle carries both)."""
    args = C.gemm_args(x, w, x_zero_point, w_zero_point, bias, w_format, out_dtype, multiplier, shift,
                       out_zero_point, out_scale, numerics)
    return _run("int_gemm", backend, args)


def int_bmm(a, b, *, a_zero_point=0, b_zero_point=0, out_dtype="int32", multiplier=None, shift=None,
            out_zero_point=0, out_scale=None, backend="auto"):
    """Batched ``(a - za) @ (b - zb)^T`` of two activation tensors (a [..., M, K], b [..., N, K], int8/uint8), exact
    int32 accumulation and one output stage along N (spec §4.3)."""
    args = C.bmm_args(a, b, a_zero_point, b_zero_point, out_dtype, multiplier, shift, out_zero_point, out_scale)
    return _run("int_bmm", backend, args)


def int_conv2d(x, w, *, stride=1, padding=0, dilation=1, groups=1, x_zero_point=0, w_zero_point=None, bias=None,
               w_format=None, kernel_size=None, out_dtype="int32", multiplier=None, shift=None, out_zero_point=0,
               out_scale=None, numerics="pyqsim", backend="auto"):
    """Integer NCHW conv2d with zero-point padding and one output stage (spec §5, §6, §14); ``w`` may be a
    :class:`PackedWeight` (kind "conv")."""
    args = C.conv_args(x, w, stride, padding, dilation, groups, x_zero_point, w_zero_point, bias, w_format,
                       kernel_size, out_dtype, multiplier, shift, out_zero_point, out_scale, numerics=numerics)
    return _run("int_conv2d", backend, args)


def split_gemm(x1, w1, x2, w2, *, x1_zero_point=0, x2_zero_point=0, w1_zero_point=None, w2_zero_point=None,
               bias=None, w1_format=None, w2_format=None, out_dtype="int8", multiplier1=None, multiplier2=None,
               shift=None, out_zero_point=0, out_scale1=None, out_scale2=None, numerics="pyqsim", backend="auto"):
    """Split-shortcut GEMM: two accumulations, one output, one rounding (spec §8; ``numerics`` §14.6); weights may be
    handles."""
    C.split_numerics(numerics, "split_gemm")
    args = C.split_gemm_args(x1, w1, x2, w2, x1_zero_point, x2_zero_point, w1_zero_point, w2_zero_point, bias,
                             w1_format, w2_format, out_dtype, multiplier1, multiplier2, shift, out_zero_point,
                             out_scale1, out_scale2)
    return _run("split_gemm", backend, args)


def split_conv2d(x1, w1, x2, w2, *, stride=1, padding=0, dilation=1, x1_zero_point=0, x2_zero_point=0,
                 w1_zero_point=None, w2_zero_point=None, bias=None, w1_format=None, w2_format=None,
                 kernel_size=None, out_dtype="int8", multiplier1=None, multiplier2=None, shift=None,
                 out_zero_point=0, out_scale1=None, out_scale2=None, numerics="pyqsim", backend="auto"):
    """Split-shortcut conv2d over ``concat(x1, x2)`` channels, one rounding (spec §8; ``numerics`` §14.6);
    weights may be handles."""
    C.split_numerics(numerics, "split_conv2d")
    args = C.split_conv_args(x1, w1, x2, w2, stride, padding, dilation, x1_zero_point, x2_zero_point,
                             w1_zero_point, w2_zero_point, bias, w1_format, w2_format, kernel_size, out_dtype,
                             multiplier1, multiplier2, shift, out_zero_point, out_scale1, out_scale2)
    return _run("split_conv2d", backend, args)


def log2_attn_matmul(codes, v, *, v_zero_point=0, bits=4, mode="sqrt2", frac_bits=16, out_dtype="int64",
                     multiplier=None, shift=None, out_zero_point=0, out_scale=None, out=None, backend="auto"):
    """``attn @ (v - zv)`` from log codes with shifts and adds, then one output stage (spec §7). ``out``: a host
    array (the result's shape and dtype, C-contiguous rows, e.g. a transposed view) that receives the result and is
    returned (codes out of range raise after it may be partly written, spec §11)."""
    args = C.log2_attn_args(codes, v, v_zero_point, bits, mode, frac_bits, out_dtype, multiplier, shift,
                            out_zero_point, out_scale, _scan_values("log2_attn_matmul", backend), out)
    y = _run("log2_attn_matmul", backend, args)
    if args.out_array is not None and y is not args.out_array:  # a backend that returned a new array
        np.copyto(args.out_array, y)
        y = args.out_array
    return y


# --------------------------------------------------------------------------- float stages (spec §15)


def softmax(x, *, codes=None, backend="auto"):
    """Softmax of float32 ``x`` over the last axis (spec §15.5); with ``codes``, the uint8 codes of it (§15.9: a dict
    {"scale", "zero_point"[, "bits"]} for §2 codes or {"delta"[, "bits", "mode"]} for §3 log codes)."""
    return _run("softmax", backend, C.softmax_args(x, codes))


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, codes=None, backend="auto"):
    """LayerNorm of float32 ``x`` over the last axis, optional weight and bias [C] (spec §15.6); ``codes`` as in
    :func:`softmax`."""
    return _run("layer_norm", backend, C.layer_norm_args(x, weight, bias, eps, codes))


def group_norm(x, groups, weight=None, bias=None, eps=1e-5, *, codes=None, backend="auto"):
    """GroupNorm of float32 ``x`` [N, C, *spatial] in ``groups`` groups, optional weight and bias [C] (spec §15.6);
    ``codes`` as in :func:`softmax`."""
    return _run("group_norm", backend, C.group_norm_args(x, groups, weight, bias, eps, codes))


def gelu(x, approximate="none", *, codes=None, backend="auto"):
    """GELU of float32 ``x``: erf form (``"none"``) or tanh form (``"tanh"``) (spec §15.4); ``codes`` as in
    :func:`softmax`."""
    approx = C.check_type_name(approximate, "approximate", ("none", "tanh"))
    return _run("gelu", backend, C.unary_args(x, "gelu_tanh" if approx == "tanh" else "gelu", codes))


def add(a, b, *, backend="auto"):
    """Elementwise a + b of float32 arrays with NumPy broadcasting (spec §15.8)."""
    return _run("add", backend, C.add_args(a, b))


def silu(x, *, codes=None, backend="auto"):
    """SiLU ``x * sigmoid(x)`` of float32 ``x`` (spec §15.4); ``codes`` as in :func:`softmax`."""
    return _run("silu", backend, C.unary_args(x, "silu", codes))


def concat(xs, axis=0, *, backend="auto"):
    """Arrays of one numeric dtype joined along ``axis`` (spec §15.10)."""
    return _run("concat", backend, C.concat_args(xs, axis))


def resample_nearest(x, rows, cols, *, backend="auto"):
    """``x[..., rows[i], cols[j]]`` over the last two axes: nearest-neighbour resampling from given source indices
    (spec §15.10)."""
    return _run("resample_nearest", backend, C.resample_args(x, rows, cols))


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
