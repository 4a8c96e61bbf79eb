"""CPU backend: canonical op arguments (``pyqsim._checks``) -> ``pyqsim._C`` kernels. No math here.

The compiled extension picks scalar, AVX2, AVX-512 VNNI or AMX kernels at call time
(``PYQSIM_CPU_ISA=auto|scalar|avx2|avx512vnni|amx``, or :func:`set_isa`) and runs them on :func:`get_num_threads` threads; results are identical either way.
A weight may be a plain array (packed on every call) or a :func:`pack_weight` result (packed once): the
canonical arguments may carry it as ``w_packed`` (a ``_C.PackedWeight``, or a dict with a ``"cpu"`` entry)
next to the plain ``w`` that the other backends use.
"""
from __future__ import annotations

from ..numerics import NATIVE as _NATIVE_NUMERICS

try:
    from .. import _C
except ImportError as _exc:  # pragma: no cover - exercised only in builds without the extension
    _C = None
    _IMPORT_ERROR = str(_exc)
else:
    _IMPORT_ERROR = None

PackedWeight = getattr(_C, "PackedWeight", None)
# numerics profiles (spec §14) the kernels implement: the accumulation is exact for all, so a runtime
# profile is the exact int32 op followed by the profile's requantization pass
NUMERICS = _NATIVE_NUMERICS
# ops whose kernels reject out-of-range inputs in their own pass (non-finite floats, log codes above the zero code):
# the argument checks then skip their scan
VALUE_CHECKED = ("quantize", "quantize_log", "log2_attn_matmul")


def available() -> bool:
    return _C is not None


def info() -> dict:
    if _C is None:
        return {"compiled": False, "reason": _IMPORT_ERROR}
    d = dict(_C.build_info())
    d["compiled"] = True
    d["extension"] = _C.__file__
    return d


def set_num_threads(n: int) -> None:
    _C.set_num_threads(int(n))


def get_num_threads() -> int:
    return _C.get_num_threads()


def isas() -> list[str]:
    """The kernel ISAs this build and this CPU can run, baseline first (``"scalar"``, ``"avx2"``, ``"avx512vnni"``,
    ``"amx"``)."""
    if _C is None:
        return []
    d = _C.build_info()
    usable = {"scalar": True, "avx2": d["cpu_has_avx2"], "avx512vnni": d.get("cpu_has_avx512vnni", False),
              "amx": d.get("cpu_has_amx", False)}
    return [i for i in d["simd_compiled"] if usable[i]]


def set_isa(name: str | None) -> None:
    """Force ``"scalar"``/``"avx2"``/``"avx512vnni"``/``"amx"``/``"auto"`` for later calls; ``None`` defers to
    ``PYQSIM_CPU_ISA``."""
    _C.set_cpu_isa(name)


def get_isa() -> str:
    return _C.get_cpu_isa()


def pack_weight(w, w_format: str = "int8", *, k: int | None = None, kind: str = "gemm", kernel_size=None,
                groups: int = 1, cin_per_group: int | None = None):
    """Prepack a GEMM weight ([N, K] int8 / [N, ceil(K/2)] packed int4) or a conv weight for the CPU kernels.

    ``k`` is required for packed int4 GEMM weights (an odd K cannot be read off the shape). For conv,
    int8 weights give their shape; packed int4 weights need ``kernel_size`` and ``cin_per_group``.
    """
    if kind == "gemm":
        if k is None:
            if w_format != "int8":
                raise ValueError("k is required to pack an int4/uint4 GEMM weight")
            k = w.shape[1]
        return _C.pack_gemm_weight(w, w_format, int(k))
    if kind == "conv":
        if w_format == "int8":
            if w.ndim != 4:
                raise ValueError(f"w must be 4-D [O, C/groups, KH, KW], got shape {w.shape}")
            cin_per_group = w.shape[1] if cin_per_group is None else cin_per_group
            kernel_size = (w.shape[2], w.shape[3]) if kernel_size is None else kernel_size
        if kernel_size is None or cin_per_group is None:
            raise ValueError("kernel_size and cin_per_group are required to pack an int4/uint4 conv weight")
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        return _C.pack_conv_weight(w, w_format, int(cin_per_group), ks, int(groups))
    raise ValueError(f"kind must be 'gemm' or 'conv', got {kind!r}")


def _w(a):
    """The weight to hand to _C: a prepacked one when the op layer attached it (``w_packed``), else the array."""
    packed = getattr(a, "w_packed", None)
    if packed is not None:
        packed = packed.get("cpu") if isinstance(packed, dict) else packed
    return packed if packed is not None else a.w


def _profile_pass(acc, o, outer: int, inner: int):
    """The §14 stage of a runtime profile on an exact int32 accumulator (channel axis between outer and inner)."""
    y = _C.requantize_profile(acc.reshape(outer, o.scale.shape[0], inner), o.numerics, o.multiplier, o.shift, o.scale, o.zero_point,
                              o.dtype)
    return y.reshape(acc.shape)



def _int_gemm(a):
    o = a.out
    if o.runtime_profile:
        acc = _C.int_gemm(a.x, _w(a), a.w_format, a.x_zero_point, a.w_zero_point, a.bias, "int32", None, None, 0, None)
        return _profile_pass(acc, o, acc.shape[0], 1)
    return _C.int_gemm(a.x, _w(a), a.w_format, a.x_zero_point, a.w_zero_point, a.bias, o.dtype, o.multiplier, o.shift,
                       o.zero_point, o.scale)


def _int_bmm(a):
    o = a.out
    return _C.int_bmm(a.a, a.b, a.a_zero_point, a.b_zero_point, o.dtype, o.multiplier, o.shift, o.zero_point, o.scale)


def _split_gemm(s):
    a, b, o = s.a, s.b, s.out
    return _C.split_gemm(a.x, _w(a), a.w_format, b.x, _w(b), b.w_format, a.x_zero_point, b.x_zero_point, a.w_zero_point,
                         b.w_zero_point, a.bias, o.dtype, o.multiplier1, o.multiplier2, o.shift, o.zero_point, o.scale1,
                         o.scale2)


def _int_conv2d(a):
    o = a.out
    if o.runtime_profile:
        acc = _C.int_conv2d(a.x, _w(a), a.w_format, a.kernel_size, a.stride, a.padding, a.dilation, a.groups,
                            a.x_zero_point, a.w_zero_point, a.bias, "int32", None, None, 0, None)
        return _profile_pass(acc, o, acc.shape[0], acc.shape[2] * acc.shape[3])
    return _C.int_conv2d(a.x, _w(a), a.w_format, a.kernel_size, a.stride, a.padding, a.dilation, a.groups,
                         a.x_zero_point, a.w_zero_point, a.bias, o.dtype, o.multiplier, o.shift, o.zero_point, o.scale)


def _split_conv2d(s):
    a, b, o = s.a, s.b, s.out
    return _C.split_conv2d(a.x, _w(a), a.w_format, b.x, _w(b), b.w_format, a.kernel_size, a.stride, a.padding, a.dilation,
                           a.x_zero_point, b.x_zero_point, a.w_zero_point, b.w_zero_point, a.bias, o.dtype,
                           o.multiplier1, o.multiplier2, o.shift, o.zero_point, o.scale1, o.scale2)


def _requantize(a):
    o = a.out
    if o.runtime_profile:
        return _C.requantize_profile(a.acc, o.numerics, o.multiplier, o.shift, o.scale, o.zero_point,
                                     o.dtype).reshape(a.shape)
    y = _C.requantize(a.acc, o.multiplier, o.shift, o.zero_point, o.dtype)
    return y.reshape(a.shape)


def _log2_attn_matmul(a):
    o = a.out
    return _C.log2_attn_matmul(a.codes, a.v, a.v_zero_point, a.bits, a.k, a.frac_bits, o.dtype, o.multiplier, o.shift,
                               o.zero_point, o.scale, a.out_array)


def _native(codes):
    return None if codes is None else codes.native()


def _quantize(a):
    return _C.quantize(a.x, a.scale, a.zero_point, a.lo, a.hi, a.container).reshape(a.shape)


def _quantize_log(a):
    return _C.quantize_log(a.p, a.delta, a.k, a.zero_code)


OPS = {} if _C is None else {
    "int_gemm": _int_gemm,
    "int_bmm": _int_bmm,
    "split_gemm": _split_gemm,
    "int_conv2d": _int_conv2d,
    "split_conv2d": _split_conv2d,
    "requantize": _requantize,
    "log2_attn_matmul": _log2_attn_matmul,
    "quantize": _quantize,
    "quantize_log": _quantize_log,
    "softmax": lambda a: _C.softmax(a.x, _native(a.codes)),
    "layer_norm": lambda a: _C.layer_norm(a.x, a.weight, a.bias, a.eps, _native(a.codes)),
    "group_norm": lambda a: _C.group_norm(a.x, a.groups, a.weight, a.bias, a.eps, _native(a.codes)),
    "gelu": lambda a: _C.unary(a.x, a.op, _native(a.codes)),
    "silu": lambda a: _C.unary(a.x, a.op, _native(a.codes)),
    "add": lambda a: _C.add(a.a, a.b, a.m, a.inner),
    "concat": lambda a: _C.concat(a.xs, a.axis),
    "resample_nearest": lambda a: _C.resample_nearest(a.x, a.rows, a.cols),
}
