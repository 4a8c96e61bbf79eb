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


def to_float32(arr: np.ndarray, name: str, must_be: str) -> np.ndarray:
    """Contiguous float32 copy of a real array; a value that is not finite, or that rounds beyond float32, is an error.

    The cast's overflow is detected here (a finite value that became inf), not warned about by NumPy (spec §11)."""
    arr = np.asarray(arr)
    with np.errstate(over="ignore"):
        out = np.array(arr, dtype=np.float32, order="C")
    if out.size and not np.all(np.isfinite(out)):
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
    f = float(to_float32(np.float64(d), name, "finite and > 0"))
    if not f > 0:
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
    scale: np.ndarray  # float32 [N] (float32 outputs; zeros otherwise)


def out_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale, allowed=GEMM_OUT) -> OutStage:
    out_dtype = check_type_name(out_dtype, "out_dtype", allowed)
    zeros_i = np.zeros(n, np.int32)
    zeros_f = np.zeros(n, np.float32)
    if out_dtype in REQUANT_OUT:
        if multiplier is None or shift is None:
            raise ValueError(f"multiplier and shift are required for out_dtype={out_dtype!r}")
        m = per_channel_ints(multiplier, "multiplier", n, 0, INT32_MAX)
        s = per_channel_ints(shift, "shift", n, SHIFT_MIN, SHIFT_MAX)
        z = zero_point_scalar(out_zero_point, "out_zero_point", out_dtype)
        return OutStage(out_dtype, m, s, z, zeros_f)
    if out_dtype == "float32":
        return OutStage(out_dtype, zeros_i, zeros_i, 0, per_channel_scales(out_scale, "out_scale", n))
    return OutStage(out_dtype, zeros_i, zeros_i, 0, zeros_f)


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


def overflow_term(k: int, act_type: str, zx: int, w_format: str, zw: np.ndarray) -> int:
    """K * A * B of spec §4.1 (exact Python int)."""
    xlo, xhi = RANGES[act_type]
    wlo, whi = RANGES[w_format]
    a = max(abs(xlo - zx), abs(xhi - zx))
    b = max(abs(wlo - int(zw.max())), abs(whi - int(zw.min()))) if zw.size else 0
    return k * a * b


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


def activation(x, name: str, ndim: int, layout: str, op: str | None = None) -> tuple[np.ndarray, str]:
    """Checked activation array. With ``op`` (GEMMs: K = last axis), a K that overflows for every zero point
    is rejected before the array is copied (a zero-stride view of a huge K must not be materialized)."""
    x = as_array(x, name)
    check_dtype(x, name, [np.int8, np.uint8])
    check_ndim(x, name, ndim, layout)
    if op is not None and x.shape[-1] >= K_ALWAYS_OVERFLOWS:
        raise ValueError(f"{op}: K={x.shape[-1]} of {name}: the worst-case accumulation exceeds 2^31-1 (spec §4.1) "
                         f"for every zero point (K must be < {K_ALWAYS_OVERFLOWS}); reduce K")
    return contiguous(x), ACT_DTYPES[x.dtype]


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


def gemm_args(x, w, x_zero_point, w_zero_point, bias, w_format, out_dtype, multiplier, shift, out_zero_point, out_scale) -> GemmArgs:
    x, x_type = activation(x, "x", 2, "[M, K]", "int_gemm")
    k = x.shape[1]
    w = weight_matrix(w, "w", w_format, None, k)
    n = w.shape[0]
    zx = zero_point_scalar(x_zero_point, "x_zero_point", x_type)
    zw = per_channel_ints(w_zero_point, "w_zero_point", n, *RANGES[w_format], default=0)
    b = bias_vector(bias, n)
    bmax = int(np.abs(b.astype(np.int64)).max()) if n else 0
    check_overflow(overflow_term(k, x_type, zx, w_format, zw) + bmax, "int_gemm", f"K={k}")
    out = out_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale)
    return GemmArgs(x, x_type, w, w_format, k, zx, zw, b, out)


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
              out_dtype, multiplier, shift, out_zero_point, out_scale, sfx: str = "") -> ConvArgs:
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
    w, kernel = conv_weight(w, wn, w_format, c // g, kernel_size)
    o = w.shape[0]
    if o % g:
        raise ValueError(f"groups={g} must divide the output channels O={o} of {wn}")
    st, pd, dl = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    ohw = conv_geometry(x.shape[2], x.shape[3], kernel, st, pd, dl)
    zx = zero_point_scalar(x_zero_point, f"{xn}_zero_point", x_type)
    zw = per_channel_ints(w_zero_point, f"{wn}_zero_point", o, *RANGES[w_format], default=0)
    b = bias_vector(bias, o)
    kk = c // g * kernel[0] * kernel[1]
    bmax = int(np.abs(b.astype(np.int64)).max()) if o else 0
    check_overflow(overflow_term(kk, x_type, zx, w_format, zw) + bmax, "int_conv2d", f"C/groups*KH*KW={kk}")
    out = out_stage(out_dtype, o, multiplier, shift, out_zero_point, out_scale)
    return ConvArgs(x, x_type, w, w_format, kernel, st, pd, dl, g, ohw, zx, zw, b, out)


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


@dataclass(frozen=True)
class SplitGemmArgs:
    a: GemmArgs  # branch 1 (out stage unused: int32)
    b: GemmArgs  # branch 2
    out: SplitOutStage


def _branch_gemm(x, w, zx, zw, w_format, suffix, n_expected, bias):
    x, x_type = activation(x, f"x{suffix}", 2, f"[M, K{suffix}]", "split_gemm")
    k = x.shape[1]
    w = weight_matrix(w, f"w{suffix}", w_format, n_expected, k)
    n = w.shape[0]
    zxv = zero_point_scalar(zx, f"x{suffix}_zero_point", x_type)
    zwv = per_channel_ints(zw, f"w{suffix}_zero_point", n, *RANGES[w_format], default=0)
    none = OutStage("int32", np.zeros(n, np.int32), np.zeros(n, np.int32), 0, np.zeros(n, np.float32))
    return GemmArgs(x, x_type, w, w_format, k, zxv, zwv, bias_vector(bias, n), none)


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


@dataclass(frozen=True)
class Log2AttnArgs:
    codes: np.ndarray  # uint8 [M, L]
    v: np.ndarray  # int8/uint8 [L, N]
    v_type: str
    v_zero_point: int
    bits: int
    k: int  # 1 = log2, 2 = log-sqrt2
    frac_bits: int
    out: OutStage


def log_bits(bits) -> int:
    b = as_int(bits, "bits")
    if not 2 <= b <= 8:
        raise ValueError(f"bits must be in [2, 8], got {b}")
    return b


def log_mode(mode) -> int:
    return LOG_MODES[check_type_name(mode, "mode", tuple(LOG_MODES))]


def log2_attn_args(codes, v, v_zero_point, bits, mode, frac_bits, out_dtype, multiplier, shift, out_zero_point,
                   out_scale) -> Log2AttnArgs:
    codes = as_array(codes, "codes")
    check_dtype(codes, "codes", [np.uint8])
    check_ndim(codes, "codes", 2, "[M, L]")
    v, v_type = activation(v, "v", 2, "[L, N]")
    if v.shape[0] != codes.shape[1]:
        raise ValueError(f"v must have L={codes.shape[1]} rows to match codes, got shape {v.shape}")
    b = log_bits(bits)
    kk = log_mode(mode)
    if codes.size and int(codes.max()) > 2**b - 1:
        raise ValueError(f"codes must be in [0, {2**b - 1}] for bits={b}, got {int(codes.max())}")
    f = as_int(frac_bits, "frac_bits")
    if not 0 <= f <= FRAC_BITS_MAX:
        raise ValueError(f"frac_bits must be in [0, {FRAC_BITS_MAX}], got {f}")
    zv = zero_point_scalar(v_zero_point, "v_zero_point", v_type)
    length = codes.shape[1]
    if length * 255 * (2**f) * (2**LOG2_P + LOG2_Q) >= 2**63:
        raise ValueError(f"L={length} is too long for frac_bits={f}: the int64 accumulator could overflow (spec §7)")
    n = v.shape[1]
    out = out_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale, ("int64", "float32") + REQUANT_OUT)
    return Log2AttnArgs(contiguous(codes), v, v_type, zv, b, kk, f, out)


# --------------------------------------------------------------------------- requantize


@dataclass(frozen=True)
class RequantArgs:
    acc: np.ndarray  # int32 [R, N, I]: channel axis moved to the middle
    shape: tuple
    axis: int
    out: OutStage


def requantize_args(acc, multiplier, shift, zero_point, out_dtype, axis) -> RequantArgs:
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
    out = out_stage(out_dtype, n, multiplier, shift, zero_point, None, REQUANT_OUT)
    outer = int(np.prod(acc.shape[:ax], dtype=np.int64))
    inner = int(np.prod(acc.shape[ax + 1:], dtype=np.int64))
    return RequantArgs(canonical(acc).reshape(outer, n, inner), acc.shape, ax, out)


# --------------------------------------------------------------------------- float inputs


def finite_float(x, name: str) -> np.ndarray:
    x = host(as_array(x, name))
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    return to_float32(x, name, "finite (no NaN or inf)")
