"""Argument contract of every op (docs/spec.md §11): validate, then return canonical arguments.

Each ``*_args`` function raises ``TypeError``/``ValueError`` naming the argument, and returns a
dataclass of C-contiguous arrays with fixed dtypes that every backend consumes unchanged.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from ._device import DeviceArray, device_array, host, is_device
from .numerics import profile

INT32_MAX = 2**31 - 1

# code ranges of the storage types (spec §1)
RANGES = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int32": (-(2**31), 2**31 - 1),
}
# NumPy container of each code type when unpacked
CONTAINERS = {"int8": np.int8, "uint8": np.uint8, "int4": np.int8, "uint4": np.uint8}
OUT_DTYPES = dict(CONTAINERS, int32=np.int32, int64=np.int64, float32=np.float32)  # array dtype of each output type
ACT_DTYPES = {np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8"}
WEIGHT_FORMATS = ("int8", "int4", "uint4")
REQUANT_OUT = ("int8", "uint8", "int4", "uint4")
GEMM_OUT = ("int32", "float32") + REQUANT_OUT
LOG_MODES = {"log2": 1, "sqrt2": 2}
SHIFT_MIN, SHIFT_MAX = 1, 94
LOG2_P = 16
LOG2_Q = 92682  # round(sqrt(2) * 2**16), spec §7
FRAC_BITS_MAX = 24


def as_array(a, name: str) -> np.ndarray:
    """Return ``a`` as an ndarray (buffer protocol / DLPack / array interface) or, for a CUDA tensor/array,
    as a :class:`~pyqsim._device.DeviceArray` (no copy); otherwise raise TypeError."""
    if isinstance(a, (np.ndarray, DeviceArray)):
        return a
    if is_device(a):
        return device_array(a, name)
    if hasattr(a, "__dlpack__") and not hasattr(a, "__array__"):
        return np.from_dlpack(a)
    if hasattr(a, "__array__") or hasattr(a, "__array_interface__") or isinstance(a, (memoryview, bytes, bytearray)):
        return np.asarray(a)
    if isinstance(a, (list, tuple)):
        raise TypeError(f"{name} must be a NumPy array (or expose the buffer protocol), got a {type(a).__name__}")
    raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")


def canonical(a: np.ndarray, dtype=None) -> np.ndarray:
    """C-contiguous AND aligned base-class array (a misaligned contiguous view is copied): every backend,
    the native kernels included, can consume it unchanged. Device arrays are contiguous already."""
    if isinstance(a, DeviceArray):
        return a
    return np.require(a, dtype, ("C_CONTIGUOUS", "ALIGNED", "ENSUREARRAY"))


def contiguous(a):
    """C-contiguous host array (copied when needed); device arrays are contiguous already."""
    return a if isinstance(a, DeviceArray) else np.ascontiguousarray(a)


def check_dtype(a: np.ndarray, name: str, allowed) -> None:
    allowed = [np.dtype(d) for d in allowed]
    if a.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"{name} must have dtype {names}, got {a.dtype}")


def check_ndim(a: np.ndarray, name: str, ndim: int, layout: str) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {a.shape}")


def as_int(v, name: str) -> int:
    """A Python int from an integer scalar (bool rejected)."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(v)
    except TypeError:
        if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "iu":
            return int(v)
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}") from None


def check_type_name(value: str, name: str, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def zero_point_scalar(z, name: str, type_name: str) -> int:
    z = as_int(z, name)
    lo, hi = RANGES[type_name]
    if not lo <= z <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}] for {type_name}, got {z}")
    return z


def per_channel_ints(v, name: str, n: int, lo: int, hi: int, default: int | None = None) -> np.ndarray:
    """Broadcast a scalar or length-n integer vector to int32 [n], range-checked."""
    if v is None:
        if default is None:
            raise ValueError(f"{name} is required")
        v = default
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer or an integer array, got bool")
    arr = np.asarray(host(v))
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer or an integer array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(n, int(arr), dtype=np.int64)
    elif arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {arr.shape}")
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        bad = arr[(arr < lo) | (arr > hi)][0]
        raise ValueError(f"{name} values must be in [{lo}, {hi}], got {int(bad)}")
    return canonical(arr, np.int32)


def to_float32(arr: np.ndarray, name: str, must_be: str, scan: bool = True) -> np.ndarray:
    """Contiguous float32 copy of a real array; a value that is not finite, or that rounds beyond float32, is an error.

    The cast's overflow is detected here (a finite value that became inf), not warned about by NumPy (spec §11).
    ``scan=False``: an input that is float32 already is not scanned (the kernel that takes it rejects non-finite
    values in its own pass); a cast one still is."""
    arr = np.asarray(arr)
    if type(arr) is np.ndarray and arr.dtype == np.float32 and arr.flags.c_contiguous and arr.flags.aligned:
        out = arr  # canonical already (the common case: skip np.require)
        if not scan:
            return out
    else:
        with np.errstate(over="ignore"):
            out = canonical(arr, np.float32)  # no copy when arr is an aligned contiguous float32 array already
    # one pass without a temporary: the sum is finite when every value is (it can also overflow, hence the exact
    # test); a NumPy reduction, not BLAS, whose worker threads would keep spinning beside the kernels' threads
    v = out.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        quick = np.isfinite(np.add.reduce(v)) if v.size else True
    if not quick and not np.all(np.isfinite(out)):
        beyond = (np.isinf(out) & np.isfinite(arr)).ravel()
        if np.any(beyond):
            raise ValueError(f"{name} must be {must_be} within float32 range, got {float(arr.ravel()[beyond][0])!r}")
        raise ValueError(f"{name} must be {must_be}")
    return out


def per_channel_scales(v, name: str, n: int) -> np.ndarray:
    """Broadcast a positive finite float scale (scalar or [n]) to float32 [n]."""
    if v is None:
        raise ValueError(f"{name} is required")
    arr = np.asarray(host(v))
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a float or a float array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(n, arr, dtype=arr.dtype)
    elif arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {arr.shape}")
    arr = to_float32(arr, name, "finite and > 0")
    if arr.size and not np.all(arr > 0):
        raise ValueError(f"{name} must be finite and > 0")
    return arr


def positive_scale(v, name: str) -> float:
    """A positive finite float32 scale as a Python float (already rounded to float32)."""
    try:
        d = float(np.float64(v))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}") from None
    if isinstance(v, np.ndarray) and v.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
    with np.errstate(over="ignore"):
        f = float(np.float32(d))
    if math.isinf(f) and math.isfinite(d):
        raise ValueError(f"{name} must be finite and > 0 within float32 range, got {d!r}")
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"{name} must be finite and > 0, got {v!r}")
    return f


GEOMETRY_MAX = 2**20  # kernel size, stride, padding and dilation: products of these stay far below 2^62


def pair(v, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints in [minimum, 2^20] (conv geometry)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
        a, b = as_int(v[0], name), as_int(v[1], name)
    else:
        a = b = as_int(v, name)
    if a < minimum or b < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    if a > GEOMETRY_MAX or b > GEOMETRY_MAX:
        raise ValueError(f"{name} must be <= {GEOMETRY_MAX}, got {v!r}")
    return a, b


# --------------------------------------------------------------------------- output stage


@dataclass(frozen=True)
class OutStage:
    """Canonical output stage (spec §6): one per GEMM/conv/attention op."""

    dtype: str
    multiplier: np.ndarray  # int32 [N]  (requantized outputs; zeros otherwise)
    shift: np.ndarray  # int32 [N]
    zero_point: int
    scale: np.ndarray  # float32 [N] (float32 outputs, and requantized outputs of a float profile; zeros otherwise)
    numerics: str = "pyqsim"  # profile of the requantized stage (spec §14)

    @property
    def runtime_profile(self) -> bool:
        """A requantized output under a runtime profile (spec §14): the exact int32 op, then the profile's stage."""
        return self.numerics != "pyqsim" and self.dtype not in ("int32", "float32")


def out_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale, allowed=GEMM_OUT,
              numerics="pyqsim") -> OutStage:
    """The checked output stage of an op with ``n`` output channels; ``out_dtype`` may be an OutStage validated
    before (``ops.output_stage``), then checked against the op and passed on."""
    if isinstance(out_dtype, OutStage):
        return _prepared_stage(out_dtype, n, (multiplier, shift, out_scale), out_zero_point, allowed, numerics)
    prof = profile(numerics)
    out_dtype = check_type_name(out_dtype, "out_dtype", allowed)
    zeros_i = np.zeros(n, np.int32)
    zeros_f = np.zeros(n, np.float32)
    if out_dtype in REQUANT_OUT and prof.params == "float":
        if multiplier is None:
            raise ValueError(f"multiplier (the float32 requantization scale) is required for out_dtype={out_dtype!r}")
        if shift is not None:
            raise ValueError(f"shift must be None for numerics={numerics!r} (a float32 scale, spec §14), got {shift!r}")
        z = zero_point_scalar(out_zero_point, "out_zero_point", out_dtype)
        return OutStage(out_dtype, zeros_i, zeros_i, z, per_channel_scales(multiplier, "multiplier", n), numerics)
    if out_dtype in REQUANT_OUT:
        if multiplier is None or shift is None:
            raise ValueError(f"multiplier and shift are required for out_dtype={out_dtype!r}")
        m = per_channel_ints(multiplier, "multiplier", n, 0, INT32_MAX)
        s = per_channel_ints(shift, "shift", n, SHIFT_MIN, prof.shift_max)
        z = zero_point_scalar(out_zero_point, "out_zero_point", out_dtype)
        return OutStage(out_dtype, m, s, z, zeros_f, numerics)
    if out_dtype == "float32":
        return OutStage(out_dtype, zeros_i, zeros_i, 0, per_channel_scales(out_scale, "out_scale", n), numerics)
    return OutStage(out_dtype, zeros_i, zeros_i, 0, zeros_f, numerics)


def _prepared_stage(st: OutStage, n, values, out_zero_point, allowed, numerics) -> OutStage:
    if any(v is not None for v in values) or out_zero_point != 0:
        raise ValueError("an output stage passed as out_dtype carries its own multiplier, shift, out_zero_point and "
                         "out_scale: leave those arguments unset")
    if st.dtype not in allowed:
        raise ValueError(f"out_dtype must be one of {', '.join(map(repr, allowed))}, got an output stage of "
                         f"{st.dtype!r}")
    if len(st.scale) != n:
        raise ValueError(f"the output stage has {len(st.scale)} channels, the op produces {n}")
    if st.numerics != numerics:
        raise ValueError(f"the output stage was prepared for numerics={st.numerics!r}, the op runs {numerics!r}")
    return st


# --------------------------------------------------------------------------- weights


def weight_matrix(w, name: str, w_format: str, n_expected: int | None, k: int) -> np.ndarray:
    """Check a [N, K] int8 weight or a [N, ceil(K/2)] packed int4/uint4 weight."""
    check_type_name(w_format, "w_format", WEIGHT_FORMATS)
    w = as_array(w, name)
    if w_format == "int8":
        check_dtype(w, name, [np.int8])
        check_ndim(w, name, 2, "[N, K]")
        if w.shape[1] != k:
            raise ValueError(f"{name} must have K={k} columns to match the activations, got shape {w.shape}")
    else:
        check_dtype(w, name, [np.uint8])
        check_ndim(w, name, 2, "[N, ceil(K/2)] packed")
        if w.shape[1] != (k + 1) // 2:
            raise ValueError(f"{name} (packed {w_format}) must have ceil(K/2)={(k + 1) // 2} bytes per row for K={k}, got shape {w.shape}")
    if n_expected is not None and w.shape[0] != n_expected:
        raise ValueError(f"{name} must have {n_expected} rows, got shape {w.shape}")
    if w_format != "int8":
        padding_nibble(w, name, k)
    return contiguous(w)


def padding_nibble(w, name: str, k: int) -> None:
    """§1.1/§11: for an odd K the high nibble of each packed row's last byte is padding and must be 0.
    (Host arrays; a device weight is not read back here, and every backend ignores that nibble.)"""
    if k % 2 and isinstance(w, np.ndarray) and w.size and np.any(w[:, -1] >> 4):
        raise ValueError(f"{name} padding nibble (high nibble of the last byte of each row, K={k} odd) must be 0")


def act_term(act_type: str, zx: int) -> int:
    """A of spec §4.1: the largest |x - zx| over the activation type's range."""
    xlo, xhi = RANGES[act_type]
    return max(abs(xlo - zx), abs(xhi - zx))


def overflow_term(k: int, act_type: str, zx: int, w_format: str, zw: np.ndarray) -> int:
    """K * A * B of spec §4.1 (exact Python int)."""
    return k * act_term(act_type, zx) * weight_b_term(w_format, zw)


def check_overflow(total: int, name: str, k_desc: str) -> None:
    if total > INT32_MAX:
        raise ValueError(
            f"{name}: worst-case accumulation {total} exceeds 2^31-1 (spec §4.1); reduce {k_desc} "
            "or use zero points nearer the middle of the type range"
        )


def bias_vector(bias, n: int) -> np.ndarray:
    if bias is None:
        return np.zeros(n, np.int32)
    b = host(as_array(bias, "bias"))
    check_dtype(b, "bias", [np.int32])
    if b.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {b.shape}")
    return canonical(b)


# K * A * B of spec §4.1 is at least K * 128 * 8 for every activation type, weight format and zero point
# (A >= 128 for 8-bit activations, B >= 8 for 4-bit weights): a longer K can never pass check_overflow.
K_ALWAYS_OVERFLOWS = INT32_MAX // (128 * 8) + 1


def activation(x, name: str, ndim: int, layout: str, op: str | None = None, rows: bool = False
               ) -> tuple[np.ndarray, str]:
    """Checked activation array. With ``op`` (GEMMs: K = last axis), a K that overflows for every zero point
    is rejected before the array is copied (a zero-stride view of a huge K must not be materialized). With ``rows``
    (the batched ops' operands), a view whose rows are C-contiguous is kept as it is (``rows_view``)."""
    x = as_array(x, name)
    check_dtype(x, name, [np.int8, np.uint8])
    check_ndim(x, name, ndim, layout)
    if op is not None and x.shape[-1] >= K_ALWAYS_OVERFLOWS:
        raise ValueError(f"{op}: K={x.shape[-1]} of {name}: the worst-case accumulation exceeds 2^31-1 (spec §4.1) "
                         f"for every zero point (K must be < {K_ALWAYS_OVERFLOWS}); reduce K")
    return (x if rows and rows_view(x) else contiguous(x)), ACT_DTYPES[x.dtype]


def rows_view(x) -> bool:
    """Whether host array ``x`` of 1-byte codes has C-contiguous rows (last axis) or columns, and no negative stride:
    the batched ops take such a view as it is, one matrix per leading index (rows read in place; columns through one
    native transposed copy, where NumPy's copy of such a view is several times slower)."""
    return (isinstance(x, np.ndarray) and x.ndim >= 2
            and (x.shape[-1] <= 1 or x.strides[-1] == 1 or x.shape[-2] <= 1 or x.strides[-2] == 1)
            and all(s >= 0 or d <= 1 for s, d in zip(x.strides, x.shape)))


# --------------------------------------------------------------------------- packed weights (spec §4.4)


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight validated once (``ops.pack_weight``): the canonical array, its format and zero points, and the
    backends' prepacked forms. Ops given a handle skip the weight checks and, on a backend with a prepacked
    form, the packing."""

    w: np.ndarray  # canonical weight array, as int_gemm / int_conv2d accept it
    w_format: str
    kind: str  # "gemm" or "conv"
    n: int  # output channels
    k: int  # reduction length (GEMM K; conv C/groups * KH * KW)
    w_zero_point: np.ndarray  # int32 [N]
    b_term: int  # B of spec §4.1: max over channels of |code - zw[n]| over the format's range
    kernel_size: tuple | None = None  # conv
    groups: int = 1  # conv
    cin_per_group: int | None = None  # conv
    native: dict | None = None  # backend name -> that backend's prepacked weight

    def __repr__(self) -> str:
        shape = f"{self.n}x{self.k}" + (f", kernel {self.kernel_size}, groups {self.groups}" if self.kind == "conv" else "")
        return f"<pyqsim PackedWeight {self.kind} {self.w_format} {shape}; prepacked for {sorted(self.native or {})}>"


def weight_b_term(w_format: str, zw: np.ndarray) -> int:
    wlo, whi = RANGES[w_format]
    return max(abs(wlo - int(zw.max())), abs(whi - int(zw.min()))) if zw.size else 0


def count_arg(v, name: str, missing: str) -> int:
    """A required integer >= 0 (``missing``: the message when it is None)."""
    if v is None:
        raise ValueError(missing)
    v = as_int(v, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def pack_weight_args(w, w_format, w_zero_point, kind, kernel_size, groups, k, cin_per_group) -> PackedWeight:
    """Validate a weight once and return the handle without native forms (ops.pack_weight adds them)."""
    kind = check_type_name(kind, "kind", ("gemm", "conv"))
    w_format = check_type_name(w_format, "w_format", WEIGHT_FORMATS)
    g = as_int(groups, "groups")
    if g < 1:
        raise ValueError(f"groups must be >= 1, got {g}")
    if kind == "gemm":
        if g != 1:
            raise ValueError(f"groups must be 1 for a GEMM weight, got {g}")
        arr = as_array(w, "w")
        if w_format == "int8":
            kk = arr.shape[1] if arr.ndim == 2 else 0
        else:
            kk = count_arg(k, "k", f"k (the unpacked K) is required to pack a {w_format} GEMM weight")
        w = weight_matrix(arr, "w", w_format, None, kk)
        n, kernel, cin = w.shape[0], None, None
    else:
        arr = as_array(w, "w")
        if w_format == "int8":
            check_dtype(arr, "w", [np.int8])
            check_ndim(arr, "w", 4, "[O, C/groups, KH, KW]")
            cin = arr.shape[1]
        else:
            cin = count_arg(cin_per_group, "cin_per_group", f"cin_per_group is required to pack a {w_format} conv weight")
        w, kernel = conv_weight(arr, "w", w_format, cin, kernel_size)
        n = w.shape[0]
        if n % g:
            raise ValueError(f"groups={g} must divide the output channels O={n} of w")
        kk = cin * kernel[0] * kernel[1]
    zw = per_channel_ints(w_zero_point, "w_zero_point", n, *RANGES[w_format], default=0)
    return PackedWeight(w, w_format, kind, n, kk, zw, weight_b_term(w_format, zw), kernel, g, cin, {})


def unpack_handle(w, name: str, kind: str, w_format, w_zero_point, kernel_size=None):
    """``(handle, w_format, w_zero_point)``: the handle's own when ``w`` is a PackedWeight (the call must then leave
    ``w_format``/``w_zero_point`` as None or equal them), else ``(None, w_format or "int8", w_zero_point or 0)``."""
    if not isinstance(w, PackedWeight):
        return None, ("int8" if w_format is None else w_format), (0 if w_zero_point is None else w_zero_point)
    if w.kind != kind:
        raise ValueError(f"{name} is a packed {w.kind} weight, expected a {kind} weight")
    if w_format is not None and w_format != w.w_format:
        raise ValueError(f"{name}_format={w_format!r} disagrees with the packed weight's format {w.w_format!r}")
    if w_zero_point is not None:
        raise ValueError(f"{name}_zero_point is fixed when the weight is packed: pass it to pack_weight, not here")
    if kernel_size is not None and pair(kernel_size, "kernel_size", 1) != w.kernel_size:
        raise ValueError(f"kernel_size {kernel_size!r} disagrees with the packed weight's {w.kernel_size}")
    return w, w.w_format, w.w_zero_point


# --------------------------------------------------------------------------- GEMM


@dataclass(frozen=True)
class GemmArgs:
    x: np.ndarray  # [M, K] int8/uint8
    x_type: str
    w: np.ndarray  # [N, K] int8 or [N, ceil(K/2)] uint8 packed
    w_format: str
    k: int
    x_zero_point: int
    w_zero_point: np.ndarray  # int32 [N]
    bias: np.ndarray  # int32 [N]
    out: OutStage
    w_packed: dict | None = None  # backend name -> prepacked weight (from a PackedWeight handle)


def gemm_weight(w, name: str, w_format, w_zero_point, k: int, n_expected: int | None = None):
    """``(w, w_format, zw, B of §4.1, native forms)`` of a GEMM weight array or PackedWeight handle."""
    h, w_format, w_zero_point = unpack_handle(w, name, "gemm", w_format, w_zero_point)
    if h is None:
        w = weight_matrix(w, name, w_format, n_expected, k)
        zw = per_channel_ints(w_zero_point, f"{name}_zero_point", w.shape[0], *RANGES[w_format], default=0)
        return w, w_format, zw, weight_b_term(w_format, zw), None
    if h.k != k:
        raise ValueError(f"{name} (packed) has K={h.k}, the activations have K={k}")
    if n_expected is not None and h.n != n_expected:
        raise ValueError(f"{name} must have {n_expected} rows, the packed weight has {h.n}")
    return h.w, h.w_format, h.w_zero_point, h.b_term, h.native


def gemm_args(x, w, x_zero_point, w_zero_point, bias, w_format, out_dtype, multiplier, shift, out_zero_point, out_scale,
              numerics="pyqsim") -> GemmArgs:
    x, x_type = activation(x, "x", 2, "[M, K]", "int_gemm")
    k = x.shape[1]
    w, w_format, zw, b_term, native = gemm_weight(w, "w", w_format, w_zero_point, k)
    n = w.shape[0]
    zx = zero_point_scalar(x_zero_point, "x_zero_point", x_type)
    b = bias_vector(bias, n)
    bmax = int(np.abs(b.astype(np.int64)).max()) if n else 0
    check_overflow(k * act_term(x_type, zx) * b_term + bmax, "int_gemm", f"K={k}")
    if profile(numerics).pair_saturation and (x_type != "uint8" or w_format != "int8"):
        raise ValueError(f"numerics={numerics!r} models FBGEMM's uint8 x int8 kernels: x must be uint8 and "
                         f"w_format 'int8', got x {x_type} and w_format {w_format!r} (spec §14.5)")
    out = out_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale, numerics=numerics)
    return GemmArgs(x, x_type, w, w_format, k, zx, zw, b, out, native)


# --------------------------------------------------------------------------- conv2d


@dataclass(frozen=True)
class ConvArgs:
    x: np.ndarray  # [B, C, H, W]
    x_type: str
    w: np.ndarray  # [O, C/g, KH, KW] int8 or [O, ceil(C/g*KH*KW/2)] packed
    w_format: str
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    out_hw: tuple[int, int]
    x_zero_point: int
    w_zero_point: np.ndarray
    bias: np.ndarray
    out: OutStage
    w_packed: dict | None = None  # backend name -> prepacked weight (from a PackedWeight handle)


def conv_weight(w, name: str, w_format: str, cin_g: int, kernel_size) -> tuple[np.ndarray, tuple[int, int]]:
    check_type_name(w_format, "w_format", WEIGHT_FORMATS)
    w = as_array(w, name)
    if w_format == "int8":
        check_dtype(w, name, [np.int8])
        check_ndim(w, name, 4, "[O, C/groups, KH, KW]")
        if w.shape[1] != cin_g:
            raise ValueError(f"{name} must have C/groups={cin_g} input channels, got shape {w.shape}")
        kh, kw = w.shape[2], w.shape[3]
        if kernel_size is not None and pair(kernel_size, "kernel_size", 1) != (kh, kw):
            raise ValueError(f"kernel_size {kernel_size!r} disagrees with {name} shape {w.shape}")
        if not (1 <= kh <= GEOMETRY_MAX and 1 <= kw <= GEOMETRY_MAX):
            raise ValueError(f"{name} kernel must be between 1x1 and {GEOMETRY_MAX}x{GEOMETRY_MAX}, got shape {w.shape}")
    else:
        check_dtype(w, name, [np.uint8])
        check_ndim(w, name, 2, "[O, ceil(C/groups*KH*KW/2)] packed")
        if kernel_size is None:
            raise ValueError(f"kernel_size is required when {name} is packed {w_format}")
        kh, kw = pair(kernel_size, "kernel_size", 1)
        kk = cin_g * kh * kw
        if w.shape[1] != (kk + 1) // 2:
            raise ValueError(f"{name} (packed {w_format}) must have ceil({kk}/2)={(kk + 1) // 2} bytes per row, got shape {w.shape}")
        padding_nibble(w, name, kk)
    return contiguous(w), (kh, kw)


def conv_geometry(h, w_, kernel, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w_ + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"output size ({oh}, {ow}) is not positive for input ({h}, {w_}), kernel {kernel}, "
            f"stride {stride}, padding {padding}, dilation {dilation}"
        )
    return oh, ow


def conv_args(x, w, stride, padding, dilation, groups, x_zero_point, w_zero_point, bias, w_format, kernel_size,
              out_dtype, multiplier, shift, out_zero_point, out_scale, sfx: str = "", numerics="pyqsim") -> ConvArgs:
    """Canonical conv2d arguments; ``sfx`` names a split branch ("1"/"2") in messages."""
    xn, wn = f"x{sfx}", f"w{sfx}"
    x, x_type = activation(x, xn, 4, "NCHW [B, C, H, W]")
    g = as_int(groups, "groups")
    c = x.shape[1]
    if g < 1:
        raise ValueError(f"groups must be >= 1, got {g}")
    if g > max(c, 1):
        raise ValueError(f"groups must be <= max(C, 1) = {max(c, 1)} for C={c} input channels, got {g}")
    if c % g:
        raise ValueError(f"groups={g} must divide the input channels C={c} of {xn}")
    h, w_format, w_zero_point = unpack_handle(w, wn, "conv", w_format, w_zero_point, kernel_size)
    if h is None:
        w, kernel = conv_weight(w, wn, w_format, c // g, kernel_size)
    else:
        if h.cin_per_group != c // g:
            raise ValueError(f"{wn} (packed) has C/groups={h.cin_per_group}, {xn} has C/groups={c // g}")
        if h.groups != g:
            raise ValueError(f"groups={g} disagrees with the packed weight's groups={h.groups}")
        w, kernel = h.w, h.kernel_size
    o = w.shape[0]
    if o % g:
        raise ValueError(f"groups={g} must divide the output channels O={o} of {wn}")
    st, pd, dl = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    ohw = conv_geometry(x.shape[2], x.shape[3], kernel, st, pd, dl)
    zx = zero_point_scalar(x_zero_point, f"{xn}_zero_point", x_type)
    if h is None:
        zw = per_channel_ints(w_zero_point, f"{wn}_zero_point", o, *RANGES[w_format], default=0)
        b_term, native = weight_b_term(w_format, zw), None
    else:
        zw, b_term, native = h.w_zero_point, h.b_term, h.native
    b = bias_vector(bias, o)
    kk = c // g * kernel[0] * kernel[1]
    bmax = int(np.abs(b.astype(np.int64)).max()) if o else 0
    check_overflow(kk * act_term(x_type, zx) * b_term + bmax, "int_conv2d", f"C/groups*KH*KW={kk}")
    if profile(numerics).pair_saturation:
        raise ValueError(f"int_conv2d: numerics={numerics!r} is defined for int_gemm and requantize only; FBGEMM's "
                         "conv kernels pair the reduction in their own layout (spec §14.5)")
    out = out_stage(out_dtype, o, multiplier, shift, out_zero_point, out_scale, numerics=numerics)
    return ConvArgs(x, x_type, w, w_format, kernel, st, pd, dl, g, ohw, zx, zw, b, out, native)


# --------------------------------------------------------------------------- split shortcut


@dataclass(frozen=True)
class SplitOutStage:
    dtype: str
    multiplier1: np.ndarray
    multiplier2: np.ndarray
    shift: np.ndarray
    zero_point: int
    scale1: np.ndarray
    scale2: np.ndarray


def split_out_stage(out_dtype, n, multiplier1, multiplier2, shift, out_zero_point, out_scale1, out_scale2) -> SplitOutStage:
    out_dtype = check_type_name(out_dtype, "out_dtype", ("float32",) + REQUANT_OUT)
    zi, zf = np.zeros(n, np.int32), np.zeros(n, np.float32)
    if out_dtype == "float32":
        return SplitOutStage(out_dtype, zi, zi, zi, 0,
                             per_channel_scales(out_scale1, "out_scale1", n), per_channel_scales(out_scale2, "out_scale2", n))
    if multiplier1 is None or multiplier2 is None or shift is None:
        raise ValueError(f"multiplier1, multiplier2 and shift are required for out_dtype={out_dtype!r}")
    m1 = per_channel_ints(multiplier1, "multiplier1", n, 0, INT32_MAX)
    m2 = per_channel_ints(multiplier2, "multiplier2", n, 0, INT32_MAX)
    s = per_channel_ints(shift, "shift", n, SHIFT_MIN, SHIFT_MAX)
    z = zero_point_scalar(out_zero_point, "out_zero_point", out_dtype)
    return SplitOutStage(out_dtype, m1, m2, s, z, zf, zf)


def split_numerics(numerics, op: str) -> None:
    """Split ops exist under the pyqsim profile only: no runtime of §14 has one op that accumulates two
    differently quantized inputs (spec §14.6)."""
    if profile(numerics).name != "pyqsim":
        raise ValueError(f"{op}: numerics={numerics!r} has no split-shortcut form (spec §14.6): the runtime "
                         "requantizes both inputs to one scale (a concat) before one conv/matmul; use numerics='pyqsim'")


@dataclass(frozen=True)
class SplitGemmArgs:
    a: GemmArgs  # branch 1 (out stage unused: int32)
    b: GemmArgs  # branch 2
    out: SplitOutStage


def _branch_gemm(x, w, zx, zw, w_format, suffix, n_expected, bias):
    x, x_type = activation(x, f"x{suffix}", 2, f"[M, K{suffix}]", "split_gemm")
    k = x.shape[1]
    w, w_format, zwv, _, native = gemm_weight(w, f"w{suffix}", w_format, zw, k, n_expected)
    n = w.shape[0]
    zxv = zero_point_scalar(zx, f"x{suffix}_zero_point", x_type)
    none = OutStage("int32", np.zeros(n, np.int32), np.zeros(n, np.int32), 0, np.zeros(n, np.float32))
    return GemmArgs(x, x_type, w, w_format, k, zxv, zwv, bias_vector(bias, n), none, native)


def split_gemm_args(x1, w1, x2, w2, x1_zero_point, x2_zero_point, w1_zero_point, w2_zero_point, bias, w1_format,
                    w2_format, out_dtype, multiplier1, multiplier2, shift, out_zero_point, out_scale1, out_scale2):
    a = _branch_gemm(x1, w1, x1_zero_point, w1_zero_point, w1_format, "1", None, bias)
    n = a.w.shape[0]
    b = _branch_gemm(x2, w2, x2_zero_point, w2_zero_point, w2_format, "2", n, None)
    if a.x.shape[0] != b.x.shape[0]:
        raise ValueError(f"x1 and x2 must have the same number of rows M, got {a.x.shape[0]} and {b.x.shape[0]}")
    bmax = int(np.abs(a.bias.astype(np.int64)).max()) if n else 0
    total = overflow_term(a.k, a.x_type, a.x_zero_point, a.w_format, a.w_zero_point) \
        + overflow_term(b.k, b.x_type, b.x_zero_point, b.w_format, b.w_zero_point) + bmax
    check_overflow(total, "split_gemm", f"K1={a.k} + K2={b.k}")
    out = split_out_stage(out_dtype, n, multiplier1, multiplier2, shift, out_zero_point, out_scale1, out_scale2)
    return SplitGemmArgs(a, b, out)


@dataclass(frozen=True)
class SplitConvArgs:
    a: ConvArgs
    b: ConvArgs
    out: SplitOutStage


def split_conv_args(x1, w1, x2, w2, stride, padding, dilation, x1_zero_point, x2_zero_point, w1_zero_point,
                    w2_zero_point, bias, w1_format, w2_format, kernel_size, out_dtype, multiplier1, multiplier2,
                    shift, out_zero_point, out_scale1, out_scale2):
    def branch(x, w, zx, zw, fmt, sfx, bias_):
        return conv_args(x, w, stride, padding, dilation, 1, zx, zw, bias_, fmt, kernel_size,
                         "int32", None, None, 0, None, sfx)
    a = branch(x1, w1, x1_zero_point, w1_zero_point, w1_format, "1", bias)
    b = branch(x2, w2, x2_zero_point, w2_zero_point, w2_format, "2", None)
    if a.x.shape[0] != b.x.shape[0] or a.x.shape[2:] != b.x.shape[2:]:
        raise ValueError(f"x1 and x2 must share batch and spatial size, got {a.x.shape} and {b.x.shape}")
    if a.w.shape[0] != b.w.shape[0]:
        raise ValueError(f"w1 and w2 must have the same output channels, got {a.w.shape[0]} and {b.w.shape[0]}")
    if a.kernel_size != b.kernel_size:
        raise ValueError(f"w1 and w2 must have the same kernel size, got {a.kernel_size} and {b.kernel_size}")
    n = a.w.shape[0]
    k1 = a.x.shape[1] * a.kernel_size[0] * a.kernel_size[1]
    k2 = b.x.shape[1] * b.kernel_size[0] * b.kernel_size[1]
    bmax = int(np.abs(a.bias.astype(np.int64)).max()) if n else 0
    total = overflow_term(k1, a.x_type, a.x_zero_point, a.w_format, a.w_zero_point) \
        + overflow_term(k2, b.x_type, b.x_zero_point, b.w_format, b.w_zero_point) + bmax
    check_overflow(total, "split_conv2d", f"C1*KH*KW={k1} + C2*KH*KW={k2}")
    out = split_out_stage(out_dtype, n, multiplier1, multiplier2, shift, out_zero_point, out_scale1, out_scale2)
    return SplitConvArgs(a, b, out)


# --------------------------------------------------------------------------- log2 attention


def at_least_2d(a, name: str, layout: str) -> None:
    if a.ndim < 2:
        raise ValueError(f"{name} must be at least 2-D {layout}, got shape {a.shape}")


def batched_second(first, fname: str, second, sname: str, layout: str):
    """``(array, type)`` of the activation operand of a batched op: the first operand's number of dimensions and
    identical leading dimensions (spec §4.3, §7.1; no broadcasting)."""
    second = as_array(second, sname)
    if second.ndim != first.ndim:
        raise ValueError(f"{sname} must be {first.ndim}-D {layout} like {fname} {first.shape}, got shape {second.shape}")
    second, stype = activation(second, sname, first.ndim, layout, rows=True)
    if second.shape[:-2] != first.shape[:-2]:
        raise ValueError(f"{sname} must have the leading dimensions of {fname} {first.shape[:-2]}, got shape {second.shape}")
    return second, stype


@dataclass(frozen=True)
class Log2AttnArgs:
    codes: np.ndarray  # uint8 [..., M, L]
    v: np.ndarray  # int8/uint8 [..., L, N], the same leading dimensions, C-contiguous rows (rows_view)
    v_type: str
    v_zero_point: int
    bits: int
    k: int  # 1 = log2, 2 = log-sqrt2
    frac_bits: int
    out: OutStage
    out_array: np.ndarray | None = None  # the caller's array to write the result into (``out``)


def log_bits(bits) -> int:
    b = as_int(bits, "bits")
    if not 2 <= b <= 8:
        raise ValueError(f"bits must be in [2, 8], got {b}")
    return b


def log_mode(mode) -> int:
    return LOG_MODES[check_type_name(mode, "mode", tuple(LOG_MODES))]


@dataclass
class QuantizeLogArgs:
    p: np.ndarray  # float32, C-contiguous, finite, >= 0
    delta: float   # a float32 value, finite, > 0
    k: int         # 1 (log2) or 2 (log-sqrt2)
    zero_code: int  # 2^bits - 1


def quantize_log_args(p, delta, bits, mode, scan: bool = True) -> QuantizeLogArgs:
    """Canonical arguments of ``quantize_log`` (spec §3); ``scan`` as in ``to_float32``."""
    p = finite_float(p, "p", scan)
    if scan and p.size and float(p.min()) < 0:  # without the scan, the kernel rejects negative values itself
        raise ValueError("p must be >= 0 (post-softmax probabilities)")
    d = float(np.float32(positive_scale(delta, "delta")))
    return QuantizeLogArgs(p, d, log_mode(mode), 2 ** log_bits(bits) - 1)


def log2_attn_args(codes, v, v_zero_point, bits, mode, frac_bits, out_dtype, multiplier, shift, out_zero_point,
                   out_scale, scan: bool = True, out=None) -> Log2AttnArgs:
    """Canonical §7 arguments; ``scan=False`` leaves the code range check to the kernel (the backend's
    VALUE_CHECKED); ``out``: a host array for the result, with C-contiguous rows (``result_array``)."""
    codes = as_array(codes, "codes")
    check_dtype(codes, "codes", [np.uint8])
    at_least_2d(codes, "codes", "[..., M, L]")
    v, v_type = batched_second(codes, "codes", v, "v", "[..., L, N]")
    if v.shape[-2] != codes.shape[-1]:
        raise ValueError(f"v must have L={codes.shape[-1]} rows to match codes, got shape {v.shape}")
    b = log_bits(bits)
    kk = log_mode(mode)
    if scan and codes.size and int(codes.max()) > 2**b - 1:
        raise ValueError(f"codes must be in [0, {2**b - 1}] for bits={b}, got {int(codes.max())}")
    f = as_int(frac_bits, "frac_bits")
    if not 0 <= f <= FRAC_BITS_MAX:
        raise ValueError(f"frac_bits must be in [0, {FRAC_BITS_MAX}], got {f}")
    zv = zero_point_scalar(v_zero_point, "v_zero_point", v_type)
    length = codes.shape[-1]
    if length * 255 * (2**f) * (2**LOG2_P + LOG2_Q) >= 2**63:
        raise ValueError(f"L={length} is too long for frac_bits={f}: the int64 accumulator could overflow (spec §7)")
    n = v.shape[-1]
    stage = out_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale, ("int64", "float32") + REQUANT_OUT)
    dest = None if out is None else result_array(out, codes.shape[:-1] + (n,), OUT_DTYPES[stage.dtype], (codes, v))
    return Log2AttnArgs(contiguous(codes), v, v_type, zv, b, kk, f, stage, dest)


def result_array(out, shape: tuple, dtype, inputs) -> np.ndarray:
    """``out`` checked as the destination of an op's result: a writeable host array of that shape and dtype whose rows
    (last axis) are C-contiguous, with no negative stride, sharing no memory with the inputs."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {np.dtype(dtype)}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable")
    if out.size and ((out.shape[-1] > 1 and out.strides[-1] != out.itemsize)
                     or any(s < 0 for s, d in zip(out.strides, out.shape) if d > 1)):
        raise ValueError("out must have C-contiguous rows (its last axis) and no negative stride")
    if any(np.may_share_memory(out, a) for a in inputs if isinstance(a, np.ndarray)):
        raise ValueError("out must not share memory with the inputs")
    return out


# --------------------------------------------------------------------------- batched matmul of activations


@dataclass(frozen=True)
class BmmArgs:
    a: np.ndarray  # int8/uint8 [..., M, K], C-contiguous rows (rows_view)
    a_type: str
    b: np.ndarray  # int8/uint8 [..., N, K], the same leading dimensions, C-contiguous rows
    b_type: str
    a_zero_point: int
    b_zero_point: int
    out: OutStage


def bmm_args(a, b, a_zero_point, b_zero_point, out_dtype, multiplier, shift, out_zero_point, out_scale) -> BmmArgs:
    a = as_array(a, "a")
    at_least_2d(a, "a", "[..., M, K]")
    a, a_type = activation(a, "a", a.ndim, "[..., M, K]", "int_bmm", rows=True)
    b, b_type = batched_second(a, "a", b, "b", "[..., N, K]")
    k = a.shape[-1]
    if b.shape[-1] != k:
        raise ValueError(f"b must have K={k} columns to match a, got shape {b.shape}")
    za = zero_point_scalar(a_zero_point, "a_zero_point", a_type)
    zb = zero_point_scalar(b_zero_point, "b_zero_point", b_type)
    check_overflow(k * act_term(a_type, za) * act_term(b_type, zb), "int_bmm", f"K={k}")
    out = out_stage(out_dtype, b.shape[-2], multiplier, shift, out_zero_point, out_scale)
    return BmmArgs(a, a_type, b, b_type, za, zb, out)


# --------------------------------------------------------------------------- requantize


@dataclass(frozen=True)
class RequantArgs:
    acc: np.ndarray  # int32 [R, N, I]: channel axis moved to the middle
    shape: tuple
    axis: int
    out: OutStage


def requantize_args(acc, multiplier, shift, zero_point, out_dtype, axis, numerics="pyqsim") -> RequantArgs:
    acc = as_array(acc, "acc")
    check_dtype(acc, "acc", [np.int32])
    ax = as_int(axis, "axis")
    if acc.ndim == 0:
        acc = acc.reshape(1)
    if not -acc.ndim <= ax < acc.ndim:
        raise ValueError(f"axis must be in [{-acc.ndim}, {acc.ndim - 1}] for acc of shape {acc.shape}, got {ax}")
    ax %= acc.ndim
    n = acc.shape[ax]
    out_dtype = check_type_name(out_dtype, "out_dtype", REQUANT_OUT)
    out = out_stage(out_dtype, n, multiplier, shift, zero_point, None, REQUANT_OUT, numerics)
    outer = int(np.prod(acc.shape[:ax], dtype=np.int64))
    inner = int(np.prod(acc.shape[ax + 1:], dtype=np.int64))
    return RequantArgs(canonical(acc).reshape(outer, n, inner), acc.shape, ax, out)


# --------------------------------------------------------------------------- float inputs


def finite_float(x, name: str, scan: bool = True) -> np.ndarray:
    x = host(as_array(x, name))
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    return to_float32(x, name, "finite (no NaN or inf)", scan)


def code_range(dtype: str = "int8", bits: int | None = None, narrow: bool = False) -> tuple[int, int]:
    """Code range of ``dtype`` or of a ``bits``-wide signed/unsigned code held in it (spec §1, §2)."""
    check_type_name(dtype, "dtype", tuple(CONTAINERS))
    lo, hi = RANGES[dtype]
    if bits is not None:
        b = as_int(bits, "bits")
        full = 8 if dtype in ("int8", "uint8") else 4
        if not 2 <= b <= full:
            raise ValueError(f"bits must be in [2, {full}] for {dtype}, got {b}")
        lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if lo < 0 else (0, 2**b - 1)
    if narrow:
        if lo >= 0:
            raise ValueError("narrow=True needs a signed dtype")
        lo += 1
    return lo, hi


@dataclass
class QuantizeArgs:
    x: np.ndarray           # float32 [outer, N, inner], finite; each x[o] C-contiguous (the whole array unless scan=False)
    scale: np.ndarray       # float32 [N], finite, > 0
    zero_point: np.ndarray  # int32 [N] in [lo, hi]
    lo: int
    hi: int
    container: str          # "int8" or "uint8"
    shape: tuple


def row_view(x: np.ndarray):
    """``x`` as a [rows, cols] view (cols: its trailing C-contiguous axes; rows: the others, one uniform stride), or
    None when its layout has no such view."""
    if x.ndim == 0 or x.size == 0:
        return None
    cols, k = 1, x.ndim
    while k > 0 and (x.shape[k - 1] == 1 or x.strides[k - 1] == cols * x.itemsize):
        cols *= x.shape[k - 1]
        k -= 1
    lead = [(n, st) for n, st in zip(x.shape[:k], x.strides[:k]) if n != 1]
    for (_, outer), (n, inner) in zip(lead, lead[1:]):
        if outer != n * inner:
            return None
    rstride = lead[-1][1] if lead else cols * x.itemsize
    if rstride < cols * x.itemsize:
        return None
    v = x.reshape(x.size // cols, cols)  # the layout above merges into a view with row stride rstride
    return v if np.may_share_memory(v, x) else None


def quantize_args(x, scale, zero_point, dtype, axis, bits, narrow, scan: bool = True) -> QuantizeArgs:
    """Canonical arguments of ``quantize`` (spec §2): per tensor (N = 1) or per channel along ``axis``; ``scan`` as
    in ``to_float32``. Per tensor without a scan, a float32 view of whole rows (a head of a fused qkv) is kept as
    ``[rows, 1, cols]`` rows of its buffer, which the native kernel reads in place."""
    if (not scan and axis is None and type(x) is np.ndarray and x.dtype == np.float32 and x.flags.aligned
            and not x.flags.c_contiguous):
        rows = row_view(x)
        if rows is not None and rows.shape[1] >= 16:  # shorter rows: one contiguous copy is faster
            lo, hi = code_range(dtype, bits, narrow)
            z = as_int(zero_point, "zero_point")
            if not lo <= z <= hi:
                raise ValueError(f"zero_point must be in [{lo}, {hi}], got {z}")
            container = "int8" if CONTAINERS[dtype] is np.int8 else "uint8"
            return QuantizeArgs(rows[:, None, :], np.array([positive_scale(scale, "scale")], np.float32),
                                np.array([z], np.int32), lo, hi, container, x.shape)
    x = finite_float(x, "x", scan)
    lo, hi = code_range(dtype, bits, narrow)
    if axis is None:
        s = np.array([positive_scale(scale, "scale")], np.float32)
        z = as_int(zero_point, "zero_point")
        if not lo <= z <= hi:
            raise ValueError(f"zero_point must be in [{lo}, {hi}], got {z}")
        z = np.array([z], np.int32)
        outer, n, inner = 1, 1, x.size
    else:
        ax = as_int(axis, "axis")
        if not -x.ndim <= ax < x.ndim:
            raise ValueError(f"axis must be in [{-x.ndim}, {x.ndim - 1}] for shape {x.shape}, got {ax}")
        ax %= x.ndim
        n = x.shape[ax]
        s = per_channel_scales(scale, "scale", n)
        z = per_channel_ints(zero_point, "zero_point", n, lo, hi)
        outer, inner = int(np.prod(x.shape[:ax], dtype=np.int64)), int(np.prod(x.shape[ax + 1:], dtype=np.int64))
    container = "int8" if CONTAINERS[dtype] is np.int8 else "uint8"
    return QuantizeArgs(x.reshape(outer, n, inner), s, z, lo, hi, container, x.shape)


# --------------------------------------------------------------------------- float stages (spec §15)

UNARY_OPS = ("gelu", "gelu_tanh", "silu")


@dataclass(frozen=True)
class CodesSpec:
    """Spec §15.9: the uint8 codes a float stage returns instead of its float32 result: §2 uniform codes (``scale``,
    ``zero_point``, ``bits``; code range [0, 2^bits - 1]) or §3 log codes (``delta``, ``bits``, ``mode``)."""
    log: bool
    scale: float = 1.0
    zero_point: int = 0
    bits: int = 8
    delta: float = 1.0
    mode: str = "sqrt2"

    def native(self) -> tuple:
        """The form the native kernels take."""
        if self.log:
            return ("log", self.delta, log_mode(self.mode), 2**self.bits - 1)
        return ("uniform", self.scale, self.zero_point, 0, 2**self.bits - 1)


def codes_spec(codes) -> CodesSpec | None:
    """``codes`` of a float stage: None (float32 result), {"scale", "zero_point"[, "bits"]} (§2, uint8 codes) or
    {"delta"[, "bits", "mode"]} (§3)."""
    if codes is None or isinstance(codes, CodesSpec):
        return codes
    if not isinstance(codes, dict):
        raise TypeError(f"codes must be None or a dict, got {type(codes).__name__}")
    keys = set(codes)
    if keys in ({"scale", "zero_point"}, {"scale", "zero_point", "bits"}):
        bits = 8 if codes.get("bits") is None else as_int(codes["bits"], "codes bits")
        lo, hi = code_range("uint8", bits, False)
        z = as_int(codes["zero_point"], "codes zero_point")
        if not lo <= z <= hi:
            raise ValueError(f"codes zero_point must be in [{lo}, {hi}], got {z}")
        return CodesSpec(False, scale=float(np.float32(positive_scale(codes["scale"], "codes scale"))), zero_point=z,
                         bits=hi.bit_length())
    if "delta" in keys and keys <= {"delta", "bits", "mode"}:
        bits, mode = log_bits(codes.get("bits", 4)), codes.get("mode", "sqrt2")
        log_mode(mode)
        return CodesSpec(True, delta=float(np.float32(positive_scale(codes["delta"], "codes delta"))), bits=bits,
                         mode=mode)
    raise ValueError(f"codes must have the keys scale, zero_point[, bits] or delta[, bits, mode], got {sorted(keys)}")


@dataclass
class FloatArgs:
    x: np.ndarray  # float32, C-contiguous
    op: str = ""   # the elementwise function (UNARY_OPS) for gelu / silu
    codes: CodesSpec | None = None  # §15.9: codes of the result instead of float32


@dataclass
class NormArgs:
    x: np.ndarray       # float32, C-contiguous: [..., C] (layer_norm) or [N, C, *spatial] (group_norm)
    weight: np.ndarray  # float32 [C]; 1.0 when absent
    bias: np.ndarray    # float32 [C]; -0.0 when absent (x + -0.0 == x for every x)
    eps: float          # a float32 value, finite, >= 0
    groups: int = 0     # group_norm only
    codes: CodesSpec | None = None  # §15.9


def float32_input(x, name: str, min_ndim: int = 0) -> np.ndarray:
    """A float32 host array (any values, NaN and inf included), C-contiguous."""
    x = host(as_array(x, name))
    if x.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
    return canonical(x)


def unary_args(x, op: str, codes=None) -> FloatArgs:
    return FloatArgs(float32_input(x, "x"), check_type_name(op, "op", UNARY_OPS), codes_spec(codes))


@dataclass
class AddArgs:
    a: np.ndarray  # float32, C-contiguous: the full-shape operand
    b: np.ndarray  # float32, C-contiguous [m]: added to a[i] as b[(i // inner) % m]
    m: int
    inner: int


def add_args(a, b) -> AddArgs:
    """The two float32 operands of ``add`` (NumPy broadcasting): b's values as one block of the output's axes, each
    value repeated over the axes after the block; any other broadcast of b is expanded."""
    a, b = float32_input(a, "a"), float32_input(b, "b")
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"a and b must broadcast to one shape, got {a.shape} and {b.shape}") from None
    if a.shape != shape:  # add is commutative (§15.8): keep the full-shape operand first
        a, b = b, a
    if a.shape != shape:
        a = np.ascontiguousarray(np.broadcast_to(a, shape))
    if a.size == 0:  # nothing is added
        return AddArgs(a, np.zeros(1, np.float32), 1, 1)
    bs = (1,) * (len(shape) - b.ndim) + b.shape
    axes = [i for i, d in enumerate(bs) if d != 1] or [len(shape)]
    lo, hi = axes[0], axes[-1] + 1
    if bs[lo:hi] != shape[lo:hi]:  # not one block of whole axes
        b, lo, hi = np.ascontiguousarray(np.broadcast_to(b, shape)), 0, len(shape)
    m, inner = int(np.prod(shape[lo:hi], dtype=np.int64)), int(np.prod(shape[hi:], dtype=np.int64))
    return AddArgs(a, b.reshape(-1), m, inner)


def softmax_args(x, codes=None) -> FloatArgs:
    return FloatArgs(float32_input(x, "x", 1), codes=codes_spec(codes))


def _affine_vector(v, name: str, c: int, absent: float) -> np.ndarray:
    if v is None:
        return np.full(c, absent, np.float32)
    v = float32_input(v, name)
    if v.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},), got {v.shape}")
    return v


def _eps(eps) -> float:
    try:
        e = np.float32(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}") from None
    if np.ndim(e) != 0 or not (np.isfinite(e) and e >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    return float(e)


def layer_norm_args(x, weight, bias, eps, codes=None) -> NormArgs:
    x = float32_input(x, "x", 1)
    c = x.shape[-1]
    return NormArgs(x, _affine_vector(weight, "weight", c, 1.0), _affine_vector(bias, "bias", c, -0.0), _eps(eps),
                    codes=codes_spec(codes))


def group_norm_args(x, groups, weight, bias, eps, codes=None) -> NormArgs:
    x = float32_input(x, "x", 2)
    c = x.shape[1]
    g = as_int(groups, "groups")
    if g < 1 or (c % g if c else g != 1):
        raise ValueError(f"groups must be >= 1 and divide the {c} channels of x, got {g}")
    return NormArgs(x, _affine_vector(weight, "weight", c, 1.0), _affine_vector(bias, "bias", c, -0.0), _eps(eps), g,
                    codes_spec(codes))


# --------------------------------------------------------------------------- layout stages (spec §15.10)


@dataclass
class ConcatArgs:
    xs: list       # C-contiguous host arrays of one numeric dtype, one ndim, equal but along axis
    axis: int      # in [0, ndim)


def concat_args(xs, axis) -> ConcatArgs:
    """Canonical arguments of ``concat``."""
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError(f"xs must be a non-empty list of arrays, got {type(xs).__name__}")
    arrs = [host(as_array(x, f"xs[{i}]")) for i, x in enumerate(xs)]
    first = arrs[0]
    if first.dtype.kind not in "biuf":
        raise TypeError(f"xs[0] must have a numeric dtype, got {first.dtype}")
    ax = as_int(axis, "axis")
    if first.ndim == 0 or not -first.ndim <= ax < first.ndim:
        raise ValueError(f"axis must be in [{-first.ndim}, {first.ndim - 1}] for ndim {first.ndim}, got {ax}")
    ax %= first.ndim
    for i, a in enumerate(arrs):
        if a.dtype != first.dtype:
            raise TypeError(f"xs[{i}] must have the dtype of xs[0] ({first.dtype}), got {a.dtype}")
        if a.ndim != first.ndim or a.shape[:ax] + a.shape[ax + 1:] != first.shape[:ax] + first.shape[ax + 1:]:
            raise ValueError(f"xs[{i}] has shape {a.shape}; it must match xs[0] {first.shape} in every axis but {ax}")
    return ConcatArgs([canonical(a, a.dtype.newbyteorder("=")) for a in arrs], ax)


@dataclass
class ResampleArgs:
    x: np.ndarray     # C-contiguous host array of a numeric dtype, ndim >= 2
    rows: np.ndarray  # int64 [OH] in [0, H)
    cols: np.ndarray  # int64 [OW] in [0, W)


def _source_index(v, name: str, bound: int) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= bound):
        raise ValueError(f"{name} values must be in [0, {bound - 1}], got values in [{int(a.min())}, {int(a.max())}]")
    return canonical(a, np.int64)


def resample_args(x, rows, cols) -> ResampleArgs:
    """Canonical arguments of ``resample_nearest``."""
    x = host(as_array(x, "x"))
    if x.dtype.kind not in "biuf":
        raise TypeError(f"x must have a numeric dtype, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions, got shape {x.shape}")
    return ResampleArgs(canonical(x, x.dtype.newbyteorder("=")), _source_index(rows, "rows", x.shape[-2]),
                        _source_index(cols, "cols", x.shape[-1]))
