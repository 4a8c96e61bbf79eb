"""Every node kind of the program format, declared once: schema and reference semantics (docs/program.md).

Integer kinds, the normalization/activation kinds and float32 adds call the op table (``pyqsim.ops``, spec §15
for the float stages) on the program's backend; the other float and shape kinds are float32 NumPy (spec §9), identical
whatever the backend. So two backends give bit-identical programs exactly when every integer op agrees.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from .schema import (ANY, BOOL, FLOAT, INT, INTS, OPT_FLOAT, OPT_INT, OPT_INTS, OPT_TENSOR, REQUIRED,
                     SCALAR, STR, TENSOR, TENSORS, TensorSpec, kind)

F32, I32, I8, U8, I64 = "float32", "int32", "int8", "uint8", "int64"
W_FORMATS = ("int8", "int4", "uint4")
LOG_MODES = ("log2", "sqrt2")
OUT = ("float32", "requant")
_SCALAR_F32 = TensorSpec((F32,), 0)
# The interpreter's run-time attribute of a float stage whose only consumer is a quantize / quantize_log node: that
# node's codes (spec §15.9), computed by the stage in one pass; never stored in a program.
CODES = "_codes"
CODE_STAGES = ("gelu", "silu", "softmax", "layer_norm", "group_norm")
_SCALAR_I32 = TensorSpec((I32,), 0)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


# --------------------------------------------------------------------------- integer kinds (pyqsim.ops)

def _out_kw(attrs, t) -> dict:
    """Output-stage keywords of an integer node: float32 via out_scale, or requantized uint8 codes."""
    if attrs.get("out", "float32") == "float32":
        return dict(out_dtype="float32", out_scale=t["out_scale"])
    return dict(out_dtype="uint8", multiplier=t["multiplier"], shift=t["shift"],
                out_zero_point=int(attrs["out_zero_point"]))


def _stage(ctx, n: int, kw: dict, numerics: str = "pyqsim") -> dict:
    """The node's output stage for ``n`` channels, validated once per program, size and profile
    (``ops.output_stage``); keyed on the stage's arrays too (a §9.1 fold gives the node another out_scale)."""
    key = (ctx.node, "out", n, numerics, tuple(id(v) if isinstance(v, np.ndarray) else v for v in kw.values()))
    st = ctx.cache.get(key)
    if st is None:
        st = ctx.cache[key] = ops.output_stage(n, **kw, numerics=numerics)
    return dict(out_dtype=st)


def _call(ctx, fn, *acts):
    """``fn(*acts)``, the node's op call, through an ``ops.Prepared`` of its step, backend and profile (constant
    arguments checked on the first run only)."""
    key = (ctx.step, "call")
    p = ctx.cache.get(key)
    if p is None:
        p = ctx.cache[key] = ops.Prepared()
    return p.run(fn, *acts)


def _clip_bits(y, attrs):
    if attrs.get("out", "float32") == "requant" and attrs.get("out_bits", 8) < 8:
        return np.minimum(y, np.uint8(2 ** attrs["out_bits"] - 1))
    return y


def _weight_rows(t, key="weight", zp="w_zero_point"):
    n = len(t[zp]) if t[zp].ndim else None
    if n is not None and t[key].shape[0] != n:
        raise ValueError(f"{key} has {t[key].shape[0]} rows but {zp} has {n} entries")
    return t[key].shape[0]


def _check_out(attrs, t, n):
    if attrs.get("out", "float32") == "float32":
        if "out_scale" not in t:
            raise ValueError("a float32 output needs the out_scale tensor")
        if t["out_scale"].size not in (1, n):
            raise ValueError(f"out_scale has {t['out_scale'].size} entries, expected 1 or {n}")
    else:
        for key in ("multiplier", "shift"):
            if key not in t:
                raise ValueError(f"a requantized output needs the {key} tensor")
            if t[key].size not in (1, n):
                raise ValueError(f"{key} has {t[key].size} entries, expected 1 or {n}")
        if "out_zero_point" not in attrs:
            raise ValueError("a requantized output needs the out_zero_point attribute")
    if "bias" in t and t["bias"].shape != (n,):
        raise ValueError(f"bias has shape {list(t['bias'].shape)}, expected [{n}]")


_FOUR_BIT = ("int4", "uint4")


def _packed(ctx, t, key, zp, w_format, kind, **shape):
    """The node's weight ``t[key]`` validated and prepacked once per program (``ops.pack_weight``), then reused."""
    cache_key = (ctx.node, key, ctx.backend)
    h = ctx.cache.get(cache_key)
    if h is None:
        if w_format not in _FOUR_BIT:
            shape.pop("k", None)
            shape.pop("cin_per_group", None)
        backend = "reference" if ctx.backend == "reference" else "auto"
        h = ops.pack_weight(t[key], w_format=w_format, w_zero_point=t[zp], kind=kind, backend=backend, **shape)
        ctx.cache[cache_key] = h
    return h


def _check_gemm(attrs, t):
    _check_out(attrs, t, _weight_rows(t))


_INT_ATTRS = {"x_zero_point": (INT, REQUIRED, None), "w_format": (STR, "int8", W_FORMATS),
              "x_bits": (INT, 8, None), "w_bits": (INT, 8, None), "out": (STR, "float32", OUT),
              "out_zero_point": (INT, 0, None), "out_bits": (INT, 8, None)}
_INT_TENSORS = {"weight": TensorSpec((I8, U8), 2), "w_zero_point": TensorSpec((I32,), 1),
                "bias": TensorSpec((I32,), 1, optional=True), "out_scale": TensorSpec((F32,), None, optional=True),
                "multiplier": TensorSpec((I32,), None, optional=True), "shift": TensorSpec((I32,), None, optional=True)}


@kind("int_gemm", args=(("x", TENSOR),), attrs=_INT_ATTRS, tensors=_INT_TENSORS, integer=True, check=_check_gemm)
def _int_gemm(args, attrs, t, ctx):
    """Integer x @ W^T over the last axis of uint8/int8 codes (spec §4, §6)."""
    x = args[0]
    lead = x.shape[:-1]
    w = _packed(ctx, t, "weight", "w_zero_point", attrs.get("w_format", "int8"), "gemm", k=x.shape[-1])
    stage = _stage(ctx, w.n, _out_kw(attrs, t), ctx.numerics)
    y = _call(ctx, lambda x2: ops.int_gemm(x2, w, x_zero_point=attrs["x_zero_point"], bias=t.get("bias"),
                                           numerics=ctx.numerics, backend=ctx.backend, **stage),
              np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
    return _clip_bits(y, attrs).reshape(*lead, -1)


_CONV_ATTRS = dict(_INT_ATTRS, stride=(INTS, [1, 1], None), padding=(INTS, [0, 0], None),
                   dilation=(INTS, [1, 1], None), groups=(INT, 1, None), kernel_size=(INTS, [1, 1], None))
_CONV_TENSORS = dict(_INT_TENSORS, weight=TensorSpec((I8, U8), None))


@kind("int_conv2d", args=(("x", TENSOR),), attrs=_CONV_ATTRS, tensors=_CONV_TENSORS, integer=True, check=_check_gemm)
def _int_conv2d(args, attrs, t, ctx):
    """Integer NCHW conv2d with zero-point padding (spec §5, §6)."""
    x, groups = args[0], attrs.get("groups", 1)
    ks = tuple(attrs.get("kernel_size", [1, 1]))
    w = _packed(ctx, t, "weight", "w_zero_point", attrs.get("w_format", "int8"), "conv", kernel_size=ks,
                groups=groups, cin_per_group=x.shape[1] // groups if x.ndim == 4 else None)
    stage = _stage(ctx, w.n, _out_kw(attrs, t), ctx.numerics)
    return _clip_bits(_call(ctx, lambda x4: ops.int_conv2d(
        x4, w, stride=tuple(attrs.get("stride", [1, 1])), padding=tuple(attrs.get("padding", [0, 0])),
        dilation=tuple(attrs.get("dilation", [1, 1])), groups=groups, x_zero_point=attrs["x_zero_point"],
        bias=t.get("bias"), numerics=ctx.numerics, backend=ctx.backend, **stage), np.ascontiguousarray(x)), attrs)


_SPLIT_ATTRS = {"x1_zero_point": (INT, REQUIRED, None), "x2_zero_point": (INT, REQUIRED, None),
                "w_format": (STR, "int8", W_FORMATS), "x_bits": (INT, 8, None), "w_bits": (INT, 8, None)}
_SPLIT_TENSORS = {"w1": TensorSpec((I8, U8), None), "w2": TensorSpec((I8, U8), None), "w1_zero_point": TensorSpec((I32,), 1),
                  "w2_zero_point": TensorSpec((I32,), 1), "bias": TensorSpec((I32,), 1, optional=True),
                  "out_scale1": TensorSpec((F32,), 1), "out_scale2": TensorSpec((F32,), 1)}


def _check_split(attrs, t):
    n = _weight_rows(t, "w1", "w1_zero_point")
    if _weight_rows(t, "w2", "w2_zero_point") != n:
        raise ValueError(f"w1 has {n} rows but w2 has {t['w2'].shape[0]}")
    for key in ("out_scale1", "out_scale2"):
        if t[key].shape != (n,):
            raise ValueError(f"{key} has shape {list(t[key].shape)}, expected [{n}]")
    if "bias" in t and t["bias"].shape != (n,):
        raise ValueError(f"bias has shape {list(t['bias'].shape)}, expected [{n}]")


def _split_kw(attrs, t, ctx, kind, x1, x2, **shape):
    """The two branches' weights, prepacked once per program (``_packed``), and the other split-op keywords."""
    fmt = attrs.get("w_format", "int8")
    ws = [_packed(ctx, t, f"w{i}", f"w{i}_zero_point", fmt, kind, **shape,
                  **(dict(k=x.shape[-1]) if kind == "gemm" else dict(cin_per_group=x.shape[1] if x.ndim == 4 else None)))
          for i, x in (("1", x1), ("2", x2))]
    return ws, dict(x1_zero_point=attrs["x1_zero_point"], x2_zero_point=attrs["x2_zero_point"], bias=t.get("bias"),
                    out_dtype="float32", out_scale1=t["out_scale1"], out_scale2=t["out_scale2"],
                    numerics=ctx.numerics, backend=ctx.backend)


@kind("split_gemm", args=(("x1", TENSOR), ("x2", TENSOR)), attrs=_SPLIT_ATTRS, tensors=_SPLIT_TENSORS, integer=True,
      check=_check_split)
def _split_gemm(args, attrs, t, ctx):
    """Split-shortcut GEMM over concat(x1, x2) on the last axis, one rounding (spec §8)."""
    x1, x2 = args
    lead = x1.shape[:-1]
    (w1, w2), kw = _split_kw(attrs, t, ctx, "gemm", x1, x2)
    y = _call(ctx, lambda a, b: ops.split_gemm(a, w1, b, w2, **kw), np.ascontiguousarray(x1.reshape(-1, x1.shape[-1])),
              np.ascontiguousarray(x2.reshape(-1, x2.shape[-1])))
    return y.reshape(*lead, -1)


@kind("split_conv2d", args=(("x1", TENSOR), ("x2", TENSOR)),
      attrs=dict(_SPLIT_ATTRS, stride=(INTS, [1, 1], None), padding=(INTS, [0, 0], None),
                 dilation=(INTS, [1, 1], None), kernel_size=(INTS, [1, 1], None)),
      tensors=_SPLIT_TENSORS, integer=True, check=_check_split)
def _split_conv2d(args, attrs, t, ctx):
    """Split-shortcut conv2d over concat(x1, x2) channels, one rounding (spec §8)."""
    ks = tuple(attrs.get("kernel_size", [1, 1]))
    (w1, w2), kw = _split_kw(attrs, t, ctx, "conv", args[0], args[1], kernel_size=ks, groups=1)
    return _call(ctx, lambda a, b: ops.split_conv2d(
        a, w1, b, w2, stride=tuple(attrs.get("stride", [1, 1])), padding=tuple(attrs.get("padding", [0, 0])),
        dilation=tuple(attrs.get("dilation", [1, 1])), kernel_size=ks, **kw),
        np.ascontiguousarray(args[0]), np.ascontiguousarray(args[1]))


def _leading(a: np.ndarray, b: np.ndarray):
    """Broadcast leading dimensions of two batched operands [..., X, Y] (views: the ops read strided rows)."""
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return np.broadcast_to(a, lead + a.shape[-2:]), np.broadcast_to(b, lead + b.shape[-2:])


@kind("int_bmm", args=(("a", TENSOR), ("b", TENSOR)),
      attrs={"a_zero_point": (INT, REQUIRED, None), "b_zero_point": (INT, REQUIRED, None), "a_bits": (INT, 8, None),
             "b_bits": (INT, 8, None)},
      tensors={"out_scale": _SCALAR_F32}, integer=True)
def _int_bmm(args, attrs, t, ctx):
    """Batched integer a @ b^T of two code tensors [..., M, K] x [..., N, K], float32 out (spec §4.3, §6)."""
    a, b = _leading(args[0], args[1])
    out = _stage(ctx, b.shape[-2], dict(out_dtype="float32", out_scale=t["out_scale"]))
    return _call(ctx, lambda u, v: ops.int_bmm(u, v, a_zero_point=attrs["a_zero_point"],
                                               b_zero_point=attrs["b_zero_point"], backend=ctx.backend, **out), a, b)


@kind("log2_attn_matmul", args=(("codes", TENSOR), ("v", TENSOR)),
      attrs={"bits": (INT, REQUIRED, None), "mode": (STR, REQUIRED, LOG_MODES), "frac_bits": (INT, 16, None),
             "v_zero_point": (INT, REQUIRED, None), "v_bits": (INT, 8, None)},
      tensors={"out_scale": _SCALAR_F32}, integer=True)
def _log2_attn(args, attrs, t, ctx):
    """Batched attn @ (v - zv) from log codes [..., L, S] and value codes [..., S, d] with shifts and adds (spec §7)."""
    c, v = _leading(args[0], args[1])
    out = None
    if c.ndim == 4 and c.size and v.shape[-1]:  # [B, H, L, d] written as [B, L, H, d]: heads back to tokens is free
        b, h, length, d = c.shape[0], c.shape[1], c.shape[2], v.shape[-1]
        out = np.empty((b, length, h, d), np.float32).transpose(0, 2, 1, 3)
    return ops.log2_attn_matmul(c, v, v_zero_point=attrs["v_zero_point"], bits=attrs["bits"], mode=attrs["mode"],
                                frac_bits=attrs.get("frac_bits", 16),
                                **_stage(ctx, v.shape[-1], dict(out_dtype="float32", out_scale=t["out_scale"])),
                                out=out, backend=ctx.backend)


@kind("quantize", args=(("x", TENSOR),), attrs={"bits": (INT, 8, None)},
      tensors={"scale": _SCALAR_F32, "zero_point": _SCALAR_I32}, integer=True)
def _quantize(args, attrs, t, ctx):
    """Float32 -> unsigned b-bit codes in uint8, per tensor (spec §2).

    Elementwise, so a permuted view (a transposed head of a fused qkv) is quantized with its axes in memory order,
    which makes the contiguous copy ``ops.quantize`` takes a forward read, and the codes come back permuted to match
    (a view laid out as the input: transposing it back, as attention does, gives contiguous codes again)."""
    x = _f32(args[0])
    order = None
    if x.ndim > 1 and not x.flags.c_contiguous:
        order = sorted(range(x.ndim), key=lambda i: -abs(x.strides[i]))
        x = x.transpose(order)
    q = _call(ctx, lambda v: ops.quantize(v, t["scale"][()], int(t["zero_point"][()]), "uint8",
                                          bits=attrs.get("bits", 8), numerics=ctx.numerics, backend=ctx.backend), x)
    return q if order is None else q.transpose(np.argsort(order))


@kind("dequantize", args=(("q", TENSOR),), tensors={"scale": _SCALAR_F32, "zero_point": _SCALAR_I32}, integer=True)
def _dequantize(args, attrs, t, ctx):
    """Codes -> float32 (q - z) * s (spec §2)."""
    return ops.dequantize(args[0], t["scale"][()], int(t["zero_point"][()]), backend=ctx.backend)


@kind("quantize_log", args=(("p", TENSOR),), attrs={"bits": (INT, REQUIRED, None), "mode": (STR, REQUIRED, LOG_MODES)},
      tensors={"delta": _SCALAR_F32}, integer=True)
def _quantize_log(args, attrs, t, ctx):
    """Post-softmax float32 -> log2 / log-sqrt2 codes (spec §3)."""
    return ops.quantize_log(_f32(args[0]), float(t["delta"][()]), attrs["bits"], attrs["mode"], backend=ctx.backend)


# --------------------------------------------------------------------------- values, constants, scalars

@kind("constant", tensors={"value": TensorSpec(())})
def _constant(args, attrs, t, ctx):
    """A tensor stored in the file."""
    return t["value"]


_SCALAR_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
               "floordiv": lambda a, b: a // b, "truediv": lambda a, b: a / b, "mod": lambda a, b: a % b,
               "neg": lambda a, b: -a, "pow": lambda a, b: a ** b, "ceil": lambda a, b: math.ceil(a),
               "floor": lambda a, b: math.floor(a), "int": lambda a, b: int(a), "float": lambda a, b: float(a),
               "max": lambda a, b: max(a, b), "min": lambda a, b: min(a, b)}


@kind("scalar", args=(("a", ANY), ("b", ANY, None)), attrs={"op": (STR, REQUIRED, tuple(_SCALAR_OPS))})
def _scalar(args, attrs, t, ctx):
    """Python-number arithmetic on symbolic sizes."""
    a, b = (x.item() if isinstance(x, np.ndarray) else x for x in (list(args) + [None])[:2])
    return _SCALAR_OPS[attrs["op"]](a, b)


@kind("size", args=(("x", TENSOR), ("dim", INT)))
def _size(args, attrs, t, ctx):
    """One dimension of a tensor (a symbolic size)."""
    return int(args[0].shape[args[1]])


@kind("getitem", args=(("x", ANY), ("index", INT)))
def _getitem(args, attrs, t, ctx):
    """Element of a multi-output value."""
    return args[0][args[1]]


# --------------------------------------------------------------------------- elementwise float math

def _unary(fn):
    def run(args, attrs, t, ctx):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return fn(np.asarray(args[0]))
    return run


_UNARY = {"neg": np.negative, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "rsqrt": lambda x: 1 / np.sqrt(x),
          "sin": np.sin, "cos": np.cos, "tanh": np.tanh, "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
          "relu": lambda x: np.maximum(x, np.zeros((), x.dtype)), "abs": np.abs, "reciprocal": lambda x: 1 / x,
          "logical_not": np.logical_not, "floor": np.floor, "ceil": np.ceil, "round": np.rint,
          "erf": lambda x: _erf(x.astype(np.float64)), "square": np.square, "sign": np.sign}


@kind("unary", args=(("x", TENSOR),), attrs={"op": (STR, REQUIRED, tuple(_UNARY))})
def _unary_kind(args, attrs, t, ctx):
    """Elementwise float32 function (neg, exp, log, sqrt, sin, cos, tanh, sigmoid, relu, ...)."""
    return _unary(_UNARY[attrs["op"]])(args, attrs, t, ctx)


_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
           "floor_divide": np.floor_divide, "remainder": np.remainder, "pow": np.power, "maximum": np.maximum,
           "minimum": np.minimum, "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
           "gt": np.greater, "ge": np.greater_equal, "and": np.logical_and, "or": np.logical_or,
           "xor": np.logical_xor, "bitwise_and": np.bitwise_and, "bitwise_or": np.bitwise_or, "atan2": np.arctan2}


def _is_f32(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype == np.float32


def _operand(v, other):
    """A Python scalar operand in the dtype family of the tensor operand (torch's promotion of scalars)."""
    if isinstance(v, np.ndarray) or not isinstance(other, np.ndarray):
        return v
    if isinstance(v, bool):
        return v
    if isinstance(v, float) and other.dtype.kind in "iub":
        return np.float32(v)
    return np.asarray(v, other.dtype if other.dtype.kind == "f" or isinstance(v, int) else np.float32)


@kind("binary", args=(("a", ANY), ("b", ANY)), attrs={"op": (STR, REQUIRED, tuple(_BINARY)), "alpha": (SCALAR, 1, None)})
def _binary(args, attrs, t, ctx):
    """Elementwise binary op with broadcasting (add, sub, mul, div, pow, comparisons, logical ...)."""
    a, b = args
    alpha = attrs.get("alpha", 1)
    if attrs["op"] == "add" and alpha == 1 and _is_f32(a) and _is_f32(b):  # spec §15.8, on the backend
        return _call(ctx, lambda u, v: ops.add(u, v, backend=ctx.backend), a, b)
    a, b = _operand(a, b), _operand(b, a)
    if alpha != 1:
        b = b * _operand(alpha, b if isinstance(b, np.ndarray) else a)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _BINARY[attrs["op"]](a, b)


@kind("where", args=(("cond", TENSOR), ("a", ANY), ("b", ANY)))
def _where(args, attrs, t, ctx):
    """Elementwise select."""
    c, a, b = args
    return np.where(c, a, b)


@kind("masked_fill", args=(("x", TENSOR), ("mask", TENSOR), ("value", ANY)))
def _masked_fill(args, attrs, t, ctx):
    """x with value where mask is true."""
    x, m, v = args
    return np.where(m, np.asarray(v, x.dtype), x)


@kind("clamp", args=(("x", TENSOR), ("min", ANY, None), ("max", ANY, None)))
def _clamp(args, attrs, t, ctx):
    """Clamp to [min, max] (either may be None)."""
    x, lo, hi = (list(args) + [None, None])[:3]
    if lo is not None:
        x = np.maximum(x, _operand(lo, x))
    if hi is not None:
        x = np.minimum(x, _operand(hi, x))
    return x


@kind("cast", args=(("x", TENSOR),))
def _cast(args, attrs, t, ctx):
    """Conversion to the node's dtype (identity when equal)."""
    return args[0]


@kind("identity", args=(("x", ANY),))
def _identity(args, attrs, t, ctx):
    """The input unchanged (dropout in eval, clone, contiguous, alias)."""
    return args[0]


# --------------------------------------------------------------------------- float model stages (spec §9)

def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (Numerical Recipes erfc Chebyshev fit, relative error < 1.2e-7)."""
    z = np.abs(x)
    tt = 1.0 / (1.0 + 0.5 * z)
    poly = (-z * z - 1.26551223 + tt * (1.00002368 + tt * (0.37409196 + tt * (0.09678418 + tt * (
        -0.18628806 + tt * (0.27886807 + tt * (-1.13520398 + tt * (1.48851587 + tt * (-0.82215223 + tt * 0.17087277)))))))))
    erfc = tt * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


@kind("gelu", args=(("x", TENSOR),), attrs={"approximate": (STR, "none", ("none", "tanh"))})
def _gelu(args, attrs, t, ctx):
    """GELU, erf form or tanh form, float32 (spec §15.4)."""
    return _call(ctx, lambda x: ops.gelu(x, attrs.get("approximate", "none"), codes=attrs.get(CODES),
                                         backend=ctx.backend), _f32(args[0]))


@kind("silu", args=(("x", TENSOR),))
def _silu(args, attrs, t, ctx):
    """x * sigmoid(x) in float32 (spec §15.4)."""
    return _call(ctx, lambda x: ops.silu(x, codes=attrs.get(CODES), backend=ctx.backend), _f32(args[0]))


@kind("softmax", args=(("x", TENSOR), ("dim", INT)))
def _softmax(args, attrs, t, ctx):
    """Softmax along dim in float32 (spec §15.5; a row of -inf gives +0.0 everywhere)."""
    x, d = _f32(args[0]), args[1]
    d = d % x.ndim if x.ndim else 0
    if x.ndim == 0:
        return np.ones((), np.float32)
    codes = attrs.get(CODES)
    if d == x.ndim - 1:
        return _call(ctx, lambda v: ops.softmax(v, codes=codes, backend=ctx.backend), x)
    return np.moveaxis(ops.softmax(np.moveaxis(x, d, -1), codes=codes, backend=ctx.backend), -1, d)


@kind("log_softmax", args=(("x", TENSOR), ("dim", INT)))
def _log_softmax(args, attrs, t, ctx):
    """log(softmax(x)) along dim in float32."""
    x, d = _f32(args[0]), args[1]
    s = x - x.max(axis=d, keepdims=True)
    return _f32(s - np.log(np.exp(s).sum(axis=d, keepdims=True)))


def _present(*vs) -> list:
    return [v for v in vs if v is not None]


def _affine(fn, w, b):
    """``fn(x, w, b)`` as a function of x and the weight and bias that are present (node arguments: activations of
    the node's call, which may change from run to run)."""
    def call(x, *wb):
        it = iter(wb)
        return fn(x, None if w is None else next(it), None if b is None else next(it))
    return call


@kind("layer_norm", args=(("x", TENSOR), ("normalized_shape", INTS), ("weight", OPT_TENSOR, None),
                          ("bias", OPT_TENSOR, None)), attrs={"eps": (FLOAT, 1e-5, None)})
def _layer_norm(args, attrs, t, ctx):
    """LayerNorm over the trailing normalized_shape axes in float32 (spec §15.6)."""
    x, shape, w, b = (list(args) + [None, None])[:4]
    x = _f32(x)
    c = int(np.prod(shape, dtype=np.int64))
    flat = lambda v: None if v is None else _f32(v).reshape(c)  # noqa: E731
    w, b = flat(w), flat(b)
    y = _call(ctx, _affine(lambda v, w, b: ops.layer_norm(v, w, b, attrs.get("eps", 1e-5), codes=attrs.get(CODES),
                                                         backend=ctx.backend), w, b),
              x.reshape(x.shape[:x.ndim - len(shape)] + (c,)), *_present(w, b))
    return y.reshape(x.shape)


@kind("group_norm", args=(("x", TENSOR), ("groups", INT), ("weight", OPT_TENSOR, None), ("bias", OPT_TENSOR, None)),
      attrs={"eps": (FLOAT, 1e-5, None)})
def _group_norm(args, attrs, t, ctx):
    """GroupNorm of [N, C, *] in float32 (spec §15.6)."""
    x, g, w, b = (list(args) + [None, None])[:4]
    w, b = None if w is None else _f32(w), None if b is None else _f32(b)
    return _call(ctx, _affine(lambda v, w, b: ops.group_norm(v, g, w, b, attrs.get("eps", 1e-5),
                                                             codes=attrs.get(CODES), backend=ctx.backend), w, b),
                 _f32(x), *_present(w, b))


@kind("batch_norm", args=(("x", TENSOR), ("weight", OPT_TENSOR, None), ("bias", OPT_TENSOR, None), ("mean", TENSOR),
                          ("var", TENSOR)), attrs={"eps": (FLOAT, 1e-5, None)})
def _batch_norm(args, attrs, t, ctx):
    """Inference BatchNorm of [N, C, *] with running statistics, in float32."""
    x, w, b, mean, var = args
    x = _f32(x)
    bshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    y = (x - _f32(mean).reshape(bshape)) / np.sqrt(_f32(var).reshape(bshape) + np.float32(attrs.get("eps", 1e-5)))
    if w is not None:
        y = y * _f32(w).reshape(bshape)
    if b is not None:
        y = y + _f32(b).reshape(bshape)
    return _f32(y)


def _pool_axis(n, k, s, p, ceil):
    """(output size, right padding, per-window divisor with padding, without) along one axis, as PyTorch."""
    span = n + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    start = np.arange(out) * s - p
    end_pad = np.minimum(start + k, n + p)
    with_pad = end_pad - start
    without = np.minimum(end_pad, n) - np.maximum(start, 0)
    return out, max(0, (out - 1) * s + k - n - p), with_pad, without


@kind("pool2d", args=(("x", TENSOR),),
      attrs={"op": (STR, REQUIRED, ("max", "avg")), "kernel": (INTS, REQUIRED, None), "stride": (INTS, REQUIRED, None),
             "padding": (INTS, [0, 0], None), "ceil_mode": (BOOL, False, None), "count_include_pad": (BOOL, True, None),
             "divisor": (OPT_INT, None, None)})
def _pool2d(args, attrs, t, ctx):
    """Max / average pooling of NCHW float32 (PyTorch's max_pool2d / avg_pool2d; dilation 1)."""
    x = _f32(args[0])
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel"], attrs["stride"], attrs.get("padding", [0, 0])
    ceil = bool(attrs.get("ceil_mode", False))
    oh, rh, dh_pad, dh_in = _pool_axis(x.shape[2], kh, sh, ph, ceil)
    ow, rw, dw_pad, dw_in = _pool_axis(x.shape[3], kw, sw, pw, ceil)
    fill = -np.inf if attrs["op"] == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph + rh), (pw, pw + rw)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]
    if attrs["op"] == "max":
        return _f32(win.max(axis=(4, 5)))
    total = win.sum(axis=(4, 5), dtype=np.float32)
    if attrs.get("divisor") is not None:
        return _f32(total / np.float32(attrs["divisor"]))
    dh, dw = (dh_pad, dw_pad) if attrs.get("count_include_pad", True) else (dh_in, dw_in)
    return _f32(total / np.outer(dh, dw).astype(np.float32))


@kind("matmul", args=(("a", TENSOR), ("b", TENSOR)))
def _matmul(args, attrs, t, ctx):
    """Float32 matmul (a product the calibration left unquantized)."""
    return np.matmul(_f32(args[0]), _f32(args[1]))


@kind("linear", args=(("x", TENSOR), ("weight", TENSOR), ("bias", OPT_TENSOR, None)))
def _linear(args, attrs, t, ctx):
    """Float32 x @ W^T + b (a layer left unquantized)."""
    x, w, b = (list(args) + [None])[:3]
    y = np.matmul(_f32(x), _f32(w).T)
    return y + b if b is not None else y


def conv2d_f32(x, w, b, stride, padding, dilation, groups):
    """Float32 NCHW convolution (im2col + matmul per group)."""
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    x = np.pad(_f32(x), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    o, cg, kh, kw = w.shape
    n, c, h, wd = x.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), np.float32)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
    og = o // groups
    out = np.empty((n, o, oh, ow), np.float32)
    for g in range(groups):
        cg_cols = cols[:, g * cg:(g + 1) * cg].reshape(n, cg * kh * kw, oh * ow)
        out[:, g * og:(g + 1) * og] = np.matmul(w[g * og:(g + 1) * og].reshape(og, -1), cg_cols).reshape(n, og, oh, ow)
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


@kind("conv2d", args=(("x", TENSOR), ("weight", TENSOR), ("bias", OPT_TENSOR, None)),
      attrs={"stride": (INTS, [1, 1], None), "padding": (INTS, [0, 0], None), "dilation": (INTS, [1, 1], None),
             "groups": (INT, 1, None)})
def _conv2d(args, attrs, t, ctx):
    """Float32 NCHW conv2d (a layer left unquantized)."""
    x, w, b = (list(args) + [None])[:3]
    return conv2d_f32(x, _f32(w), b, attrs.get("stride", [1, 1]), attrs.get("padding", [0, 0]),
                      attrs.get("dilation", [1, 1]), attrs.get("groups", 1))


@kind("sdpa", args=(("q", TENSOR), ("k", TENSOR), ("v", TENSOR), ("mask", OPT_TENSOR, None)),
      attrs={"scale": (OPT_FLOAT, None, None), "causal": (BOOL, False, None)})
def _sdpa(args, attrs, t, ctx):
    """Float32 scaled dot-product attention (bool mask: True attends; float mask: added)."""
    q, k, v, mask = (list(args) + [None])[:4]
    scale = attrs.get("scale")
    s = np.matmul(_f32(q), np.swapaxes(_f32(k), -1, -2)) * np.float32(q.shape[-1] ** -0.5 if scale is None else scale)
    s = s + additive_mask(mask, causal=attrs.get("causal", False), shape=s.shape)
    return np.matmul(_softmax([s, -1], {}, None, ctx), _f32(v))


def additive_mask(mask, causal: bool, shape) -> np.ndarray | float:
    """Float additive form of an SDPA mask (bool: True attends) and of causal masking."""
    add = np.float32(0)
    if causal:
        n, m = shape[-2], shape[-1]
        add = np.where(np.triu(np.ones((n, m), bool), 1), np.float32(-np.inf), np.float32(0))
    if mask is not None:
        add = add + (np.where(mask, np.float32(0), np.float32(-np.inf)) if mask.dtype == np.bool_ else _f32(mask))
    return add


@kind("reduce", args=(("x", TENSOR), ("dims", OPT_INTS, None), ("keepdim", BOOL, False)),
      attrs={"op": (STR, REQUIRED, ("mean", "sum", "amax", "amin", "prod"))})
def _reduce(args, attrs, t, ctx):
    """Mean / sum / max / min over dims (all when None)."""
    x, dims, keep = (list(args) + [None, False])[:3]
    axis = None if dims is None or dims == [] else tuple(dims)
    fn = {"mean": np.mean, "sum": np.sum, "amax": np.max, "amin": np.min, "prod": np.prod}[attrs["op"]]
    return np.asarray(fn(x, axis=axis, keepdims=bool(keep)))


# --------------------------------------------------------------------------- shape ops

@kind("reshape", args=(("x", TENSOR), ("shape", INTS)))
def _reshape(args, attrs, t, ctx):
    """Reshape (view) to shape; -1 inferred."""
    return np.reshape(args[0], [int(s) for s in args[1]])


@kind("permute", args=(("x", TENSOR), ("dims", INTS)))
def _permute(args, attrs, t, ctx):
    """Permute axes."""
    return np.transpose(args[0], args[1])


@kind("transpose", args=(("x", TENSOR), ("dim0", INT), ("dim1", INT)))
def _transpose(args, attrs, t, ctx):
    """Swap two axes."""
    return np.swapaxes(args[0], args[1], args[2])


@kind("expand", args=(("x", TENSOR), ("shape", INTS)))
def _expand(args, attrs, t, ctx):
    """Broadcast to shape (-1 keeps a dimension)."""
    x, shape = args[0], [int(s) for s in args[1]]
    lead = len(shape) - x.ndim
    shape = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(shape)]
    return np.broadcast_to(x, shape)


@kind("unsqueeze", args=(("x", TENSOR), ("dim", INT)))
def _unsqueeze(args, attrs, t, ctx):
    """Insert a unit axis."""
    x, d = args
    return np.expand_dims(x, d if d >= 0 else d + x.ndim + 1)


@kind("squeeze", args=(("x", TENSOR), ("dims", OPT_INTS, None)))
def _squeeze(args, attrs, t, ctx):
    """Remove unit axes (only those listed, when given)."""
    x, dims = (list(args) + [None])[:2]
    if dims is None:
        return np.squeeze(x)
    return np.squeeze(x, tuple(d % x.ndim for d in dims if x.shape[d] == 1))


@kind("flatten", args=(("x", TENSOR), ("start", INT, 0), ("end", INT, -1)))
def _flatten(args, attrs, t, ctx):
    """Merge axes start..end."""
    x, s, e = (list(args) + [0, -1][len(args) - 1:])[:3]
    if x.ndim == 0:
        return x.reshape(1)
    s, e = s % x.ndim, e % x.ndim
    return x.reshape(x.shape[:s] + (-1,) + x.shape[e + 1:])


@kind("unflatten", args=(("x", TENSOR), ("dim", INT), ("sizes", INTS)))
def _unflatten(args, attrs, t, ctx):
    """Split one axis into sizes."""
    x, d, sizes = args
    d %= x.ndim
    return x.reshape(x.shape[:d] + tuple(int(s) for s in sizes) + x.shape[d + 1:])


@kind("slice", args=(("x", TENSOR), ("dim", INT, 0), ("start", OPT_INT, None), ("end", OPT_INT, None),
                     ("step", INT, 1)))
def _slice(args, attrs, t, ctx):
    """x[start:end:step] along dim."""
    x, d, s, e, st = (list(args) + [0, None, None, 1][len(args) - 1:])[:5]
    idx = [slice(None)] * x.ndim
    idx[d] = slice(s, e if e is None or e < 2**62 else None, st)
    return x[tuple(idx)]


@kind("select", args=(("x", TENSOR), ("dim", INT), ("index", INT)))
def _select(args, attrs, t, ctx):
    """x[index] along dim (the axis removed)."""
    x, d, i = args
    idx = [slice(None)] * x.ndim
    idx[d] = i
    return x[tuple(idx)]


@kind("index", args=(("x", TENSOR), ("indices", ANY)))
def _index(args, attrs, t, ctx):
    """Advanced indexing x[i0, i1, ...] (None entries keep the axis)."""
    x, idx = args
    return x[tuple(slice(None) if i is None else i for i in idx)]


@kind("gather", args=(("x", TENSOR), ("dim", INT), ("index", TENSOR)))
def _gather(args, attrs, t, ctx):
    """torch.gather: x values at integer index along dim (bounds checked)."""
    x, dim, idx = args
    idx = np.asarray(idx, np.int64)
    if idx.size and (idx.min() < -x.shape[dim] or idx.max() >= x.shape[dim]):
        raise IndexError(f"gather index out of range for size {x.shape[dim]}")
    if idx.shape != x.shape:  # index may be smaller than x on every axis but dim
        x = x[tuple(slice(0, n) if a != dim % x.ndim else slice(None) for a, n in enumerate(idx.shape))]
    return np.take_along_axis(x, idx, axis=dim)


@kind("cat", args=(("tensors", TENSORS), ("dim", INT, 0)))
def _cat(args, attrs, t, ctx):
    """Concatenate along dim."""
    xs, d = (list(args) + [0])[:2]
    if all(type(x) is np.ndarray and x.dtype == xs[0].dtype and x.ndim for x in xs) and xs[0].dtype.kind in "biuf":
        return ops.concat(xs, d, backend=ctx.backend)  # spec §15.10, on the backend
    return np.concatenate(xs, axis=d)


@kind("stack", args=(("tensors", TENSORS), ("dim", INT, 0)))
def _stack(args, attrs, t, ctx):
    """Stack along a new axis."""
    xs, d = (list(args) + [0])[:2]
    return np.stack(xs, axis=d)


@kind("split", args=(("x", TENSOR), ("sizes", ANY), ("dim", INT, 0)))
def _split(args, attrs, t, ctx):
    """Split along dim into chunks of size (int) or the listed sizes (a multi-output value)."""
    x, sizes, d = (list(args) + [0])[:3]
    n = x.shape[d]
    if isinstance(sizes, (int, np.integer)):
        sizes = [sizes] * (n // sizes) + ([n % sizes] if n % sizes else [])
    return list(np.split(x, np.cumsum(sizes)[:-1], axis=d))


@kind("chunk", args=(("x", TENSOR), ("chunks", INT), ("dim", INT, 0)))
def _chunk(args, attrs, t, ctx):
    """torch.chunk: equal chunks of ceil(n / chunks)."""
    x, c, d = (list(args) + [0])[:3]
    size = -(-x.shape[d] // c)
    return _split([x, size, d], attrs, t, ctx)


@kind("embedding", args=(("weight", TENSOR), ("ids", TENSOR)))
def _embedding(args, attrs, t, ctx):
    """Rows of weight at integer ids (bounds checked)."""
    w, ids = args
    if ids.size and (ids.min() < 0 or ids.max() >= len(w)):
        raise ValueError(f"embedding ids must be in [0, {len(w) - 1}], got values in [{ids.min()}, {ids.max()}]")
    return w[ids]


@kind("upsample_nearest", args=(("x", TENSOR), ("size", OPT_INTS, None)), attrs={"scales": (ANY, None, None)})
def _upsample(args, attrs, t, ctx):
    """Nearest-neighbour upsampling of the spatial axes (integer scales or an output size)."""
    x, size = (list(args) + [None])[:2]
    sp = x.shape[2:]
    if size is None:
        size = [int(math.floor(s * f)) for s, f in zip(sp, attrs["scales"])]
    idx = [np.minimum(np.floor(np.arange(dst) * (src / dst)).astype(np.int64), src - 1) for src, dst in zip(sp, size)]
    if len(sp) == 2 and all(sp) and x.dtype.kind in "biuf":
        return ops.resample_nearest(x, idx[0], idx[1], backend=ctx.backend)  # spec §15.10, on the backend
    for ax, i in enumerate(idx):
        x = np.take(x, i, axis=2 + ax)
    return x


@kind("pad", args=(("x", TENSOR), ("pad", INTS), ("value", SCALAR, 0)))
def _pad(args, attrs, t, ctx):
    """Constant padding, torch order (last axis first: [left, right, top, bottom, ...])."""
    x, p, v = (list(args) + [0])[:3]
    width = [(0, 0)] * x.ndim
    for i in range(len(p) // 2):
        width[x.ndim - 1 - i] = (p[2 * i], p[2 * i + 1])
    if min(p, default=0) < 0:
        return np.pad(x, width, constant_values=v)  # NumPy's error for a negative width
    out = np.full([n + a + b for n, (a, b) in zip(x.shape, width)], v, x.dtype)
    out[tuple(slice(a, a + n) for n, (a, _) in zip(x.shape, width))] = x
    return out


@kind("arange", args=(("start", ANY), ("end", ANY, None), ("step", ANY, 1)))
def _arange(args, attrs, t, ctx):
    """Evenly spaced values (end exclusive)."""
    a = list(args)
    if len(a) == 1:
        return np.arange(a[0])
    return np.arange(*a)


@kind("full", args=(("shape", INTS), ("value", SCALAR)))
def _full(args, attrs, t, ctx):
    """A tensor of shape filled with value."""
    return np.full([int(s) for s in args[0]], args[1])


@kind("repeat", args=(("x", TENSOR), ("repeats", INTS)))
def _repeat(args, attrs, t, ctx):
    """torch.Tensor.repeat (tile)."""
    x, r = args
    return np.tile(x.reshape((1,) * (len(r) - x.ndim) + x.shape), r)


@kind("repeat_interleave", args=(("x", TENSOR), ("repeats", INT), ("dim", INT)))
def _repeat_interleave(args, attrs, t, ctx):
    """Repeat each element along dim."""
    return np.repeat(args[0], args[1], axis=args[2])

