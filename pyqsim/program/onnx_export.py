"""A program as a standard ONNX graph (opset 17): integer nodes as MatMulInteger / ConvInteger with exact int32
corrections, quantize as QuantizeLinear, the float stages of spec §15 as subgraphs of correctly rounded primitive
operators in §15's order (spec §14.7), other float and layout nodes as their ONNX operators (docs/program.md).

Every mapped integer node computes the same bits as pyqsim's op (spec §4-§6 with a float32 output stage:
``fl32(fl32(acc) * scale)`` is Cast then Mul). A node kind without a mapping raises :class:`OnnxExportError`
naming the node; the log2 attention product (spec §7) and the split ops (spec §8) have no ONNX operator.
"""
from __future__ import annotations

import numpy as np

from ..reference import floatops as F
from .schema import DTYPES, decode_literal, is_ref, unique_name

OPSET = 17


class OnnxExportError(ValueError):
    """A program node that has no ONNX form."""


_ONNX_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh", "sigmoid": "Sigmoid",
               "relu": "Relu", "abs": "Abs", "reciprocal": "Reciprocal", "erf": "Erf", "floor": "Floor",
               "ceil": "Ceil", "sin": "Sin", "cos": "Cos"}
_ONNX_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
                "minimum": "Min", "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
                "ge": "GreaterOrEqual", "and": "And", "or": "Or", "xor": "Xor"}
_REDUCE = {"mean": "ReduceMean", "sum": "ReduceSum", "amax": "ReduceMax", "amin": "ReduceMin", "prod": "ReduceProd"}


class _Builder:
    def __init__(self, program):
        import onnx
        from onnx import helper, numpy_helper

        self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
        self.program = program
        self.nodes, self.inits, self.names = [], [], set()
        self.env: dict = {}   # program value name -> ONNX tensor name
        self.rank: dict = {}  # ONNX tensor name -> rank, where known
        self.consts: dict = {}  # (dtype, shape, bytes) -> initializer name, for the shared small constants
        self._shapes = None
        self.fixed = False  # whether the graph's layout depends on the example's sizes

    def fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def const(self, value, dtype=np.float32) -> str:
        """A shared initializer holding ``value`` (by its bits: -0.0 and +0.0, NaNs stay apart)."""
        a = np.asarray(value, dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self.consts:
            self.consts[key] = self.init("c", a)
        return self.consts[key]

    def example(self, node, v, required: bool = True):
        """(shape, dtype) of program value ``v`` in a run on the program's example inputs (None when the program
        stores none and not ``required``)."""
        if self._shapes is None:
            ex = self.program.example_inputs()
            if not ex and not required:
                return None
            if not ex:
                raise OnnxExportError(f"node {node['name']!r} ({node['kind']}): the shape or dtype of its input is "
                                      "not known (the program stores no example inputs)")
            _, env = self.program.execute((), ex, "auto", keep=True)
            self._shapes = {k: (np.shape(a), np.asarray(a).dtype) for k, a in env.items()
                            if isinstance(a, (np.ndarray, np.generic))}
        return self._shapes[v["@"]]

    def shape(self, node, v) -> tuple:
        """The shape program value ``v`` has in a run on the program's example inputs (a length the graph fixes)."""
        self.fixed = True
        return self.example(node, v)[0]

    def ops(self, kind: str, inputs: list, base: str, n: int, rank=None, **attrs) -> list:
        """A node with ``n`` outputs."""
        outs = [self.fresh(f"{base}.{i}") for i in range(n)]
        self.nodes.append(self.helper.make_node(kind, inputs, outs, name=outs[0], **attrs))
        for o in outs:
            self.rank[o] = rank
        return outs

    def init(self, base: str, value) -> str:
        name = self.fresh(base)
        self.inits.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, kind: str, inputs: list, base: str, rank=None, **attrs) -> str:
        out = self.fresh(base)
        self.nodes.append(self.helper.make_node(kind, inputs, [out], name=out, **attrs))
        if rank is not None:
            self.rank[out] = rank
        return out

    def tensor(self, node, v) -> str:
        if is_ref(v):
            name = v["@"]
            if name not in self.env:
                raise OnnxExportError(f"node {node['name']!r} ({node['kind']}): its argument {name!r} is not a "
                                      "tensor the ONNX graph has (a symbolic size or scalar has no ONNX form here)")
            return self.env[name]
        return self.init(f"{node['name']}.const", np.asarray(decode_literal(v), np.float32))

    def literal(self, node, v, what: str):
        if is_ref(v) or (isinstance(v, list) and any(is_ref(x) for x in v)):
            raise OnnxExportError(f"node {node['name']!r} ({node['kind']}): {what} is computed at run time "
                                  "(a symbolic shape); only constant shapes have an ONNX form here")
        return decode_literal(v) if not isinstance(v, list) else [decode_literal(x) for x in v]


def _out_stage(b: _Builder, node, acc: str, t, channel_shape) -> str:
    """int32 acc (+ bias) -> float32 fl32(fl32(acc) * scale); a requantized output has no ONNX form here."""
    attrs = {a: decode_literal(v) for a, v in node.get("attrs", {}).items()}
    if attrs.get("out", "float32") != "float32":
        raise OnnxExportError(f"node {node['name']!r} ({node['kind']}): requantized outputs have no ONNX form here "
                              "(float32 output stages only)")
    name, r = node["name"], b.rank.get(acc)
    if "bias" in t:
        acc = b.op("Add", [acc, b.init(f"{name}.bias", t["bias"].astype(np.int32).reshape(channel_shape))],
                   f"{name}.acc_b")
    f = b.op("Cast", [acc], f"{name}.acc_f", to=b.onnx.TensorProto.FLOAT)
    s = t["out_scale"].astype(np.float32)
    s = s.reshape(channel_shape) if s.size > 1 else s.reshape(())
    return b.op("Mul", [f, b.init(f"{name}.out_scale", s)], name, rank=r)


def _int_gemm(b: _Builder, node, t, attrs, x: str) -> str:
    name = node["name"]
    codes = t["weight"].astype(np.int8)
    zw = t["w_zero_point"].astype(np.int64).reshape(-1)
    if zw.size == 1:
        zw = np.full(codes.shape[0], zw[0])
    zx = np.uint8(attrs["x_zero_point"])
    acc = b.op("MatMulInteger", [x, b.init(f"{name}.wT", np.ascontiguousarray(codes.T)), b.init(f"{name}.zx", zx),
                                 b.init(f"{name}.zw", zw.astype(np.int8))], f"{name}.acc", rank=b.rank.get(x))
    return _out_stage(b, node, acc, t, (-1,))


def _int_conv2d(b: _Builder, node, t, attrs, x: str) -> str:
    name = node["name"]
    codes = t["weight"].astype(np.int8)
    o, cg, kh, kw = codes.shape
    g = int(attrs.get("groups", 1))
    ph, pw = attrs.get("padding", [0, 0])
    zx = np.uint8(attrs["x_zero_point"])
    if ph or pw:  # pad with the zero point: padded taps contribute (zx - zx) = 0, as spec §5
        x = b.op("Pad", [x, b.init(f"{name}.pads", np.array([0, 0, ph, pw, 0, 0, ph, pw], np.int64)),
                         b.init(f"{name}.pad_value", zx)], f"{name}.xpad")
    conv = dict(strides=list(attrs.get("stride", [1, 1])), dilations=list(attrs.get("dilation", [1, 1])), group=g)
    zero = b.init(f"{name}.zero", np.int8(0))
    zxn = b.init(f"{name}.zx", zx)
    acc = b.op("ConvInteger", [x, b.init(f"{name}.w", codes), zxn, zero], f"{name}.acc_w", rank=4, **conv)
    zw = t["w_zero_point"].astype(np.int64).reshape(-1)
    if zw.size == 1:
        zw = np.full(o, zw[0])
    if np.any(zw != 0):  # ONNX Runtime's ConvInteger takes one weight zero point: subtract zw[c] * sum(x - zx)
        ones = b.init(f"{name}.ones", np.ones((g, cg, kh, kw), np.int8))
        s = b.op("ConvInteger", [x, ones, zxn, zero], f"{name}.xsum", **conv)
        if g > 1:
            s = b.op("Gather", [s, b.init(f"{name}.group_of", np.arange(o, dtype=np.int64) // (o // g))],
                     f"{name}.xsum_c", axis=1)
        corr = b.op("Mul", [s, b.init(f"{name}.zw", zw.astype(np.int32).reshape(1, o, 1, 1))], f"{name}.corr")
        acc = b.op("Sub", [acc, corr], f"{name}.acc", rank=4)
    return _out_stage(b, node, acc, t, (1, -1, 1, 1))

# --------------------------------------------------------------------------- float stages (spec §15, §14.7)
# One emitter per formula of §15, each step one correctly rounded ONNX operator in §15's order. No ReduceSum,
# ReduceMean, Softmax, Erf or Exp: ONNX Runtime's kernels for those sum and approximate in their own ways.

_POW2_LO, _POW2_HI = -75, 64  # exponents of 2^n1 and 2^n2 in §15.2 (n in [-150, 128])


def _sum(b: _Builder, x: str, length: int, base: str) -> str:
    """S(v) of §15.1 over the last axis, kept as an axis of 1: a +0.0 block, the zero-padded blocks added in
    order, then the halving tree."""
    r = b.rank[x]
    pads = [0] * (2 * r)
    pads[r - 1], pads[2 * r - 1] = F.LANES, -length % F.LANES  # the leading +0.0 block is a[j] = +0.0
    v = b.op("Pad", [x, b.const(pads, np.int64), b.const(0.0)], f"{base}.pad", rank=r)
    blocks = b.ops("Split", [v, b.const([F.LANES] * (1 + -(-length // F.LANES)), np.int64)], f"{base}.blk",
                   1 + -(-length // F.LANES), rank=r, axis=-1)
    a = blocks[0]
    for blk in blocks[1:]:
        a = b.op("Add", [a, blk], f"{base}.acc", rank=r)
    h = F.LANES // 2
    while h:
        lo, hi = b.ops("Split", [a, b.const([h, h], np.int64)], f"{base}.half", 2, rank=r, axis=-1)
        a = b.op("Add", [lo, hi], f"{base}.tree", rank=r)
        h //= 2
    return a


def _horner(b: _Builder, r: str, coeffs, base: str) -> str:
    """((c0 r + c1) r + c2) ... in float32, one Mul and one Add a step."""
    p = b.op("Add", [b.op("Mul", [r, b.const(coeffs[0])], f"{base}.m"), b.const(coeffs[1])], f"{base}.a")
    for k in coeffs[2:]:
        p = b.op("Add", [b.op("Mul", [p, r], f"{base}.m"), b.const(k)], f"{base}.a")
    return p


def _pow2(b: _Builder, n: str, base: str) -> str:
    """2^n for integral float32 n in [-75, 64], read from a table of exact powers (ONNX has no bitcast)."""
    table = b.const(np.ldexp(np.float32(1), np.arange(_POW2_LO, _POW2_HI + 1)).astype(np.float32))
    idx = b.op("Cast", [b.op("Sub", [n, b.const(_POW2_LO)], f"{base}.off")], f"{base}.idx",
               to=b.onnx.TensorProto.INT64)
    return b.op("Gather", [table, idx], base, axis=0)


def _exp(b: _Builder, x: str, base: str) -> str:
    """exp of §15.2 (NaN and -inf clamp to -104, +inf to 89)."""
    r0 = b.rank.get(x)
    lo = b.op("Where", [b.op("GreaterOrEqual", [x, b.const(F.EXP_LO)], f"{base}.ge"), x, b.const(F.EXP_LO)],
              f"{base}.lo")
    c = b.op("Where", [b.op("Greater", [x, b.const(F.EXP_HI)], f"{base}.gt"), b.const(F.EXP_HI), lo], f"{base}.c")
    t = b.op("Add", [b.op("Mul", [c, b.const(F.LOG2E)], f"{base}.cl"), b.const(F.ROUNDER)], f"{base}.t")
    n = b.op("Sub", [t, b.const(F.ROUNDER)], f"{base}.n")
    r = b.op("Sub", [b.op("Sub", [c, b.op("Mul", [n, b.const(F.LN2_HI)], f"{base}.nh")], f"{base}.rh"),
                     b.op("Mul", [n, b.const(F.LN2_LO)], f"{base}.nl")], f"{base}.r")
    p = _horner(b, r, F.EXP_POLY, f"{base}.p")
    n1 = b.op("Floor", [b.op("Mul", [n, b.const(0.5)], f"{base}.nh2")], f"{base}.n1")
    n2 = b.op("Sub", [n, n1], f"{base}.n2")
    y = b.op("Mul", [p, _pow2(b, n1, f"{base}.s1")], f"{base}.ps")
    return b.op("Mul", [y, _pow2(b, n2, f"{base}.s2")], base, rank=r0)


def _recip(b: _Builder, x: str, base: str) -> str:
    """fl32(1 / x) as -((-1) / x): the same bits, and no Div(1, .) for ONNX Runtime's DivMulFusion to turn
    ``(1 / x) * y`` into ``y / x``."""
    return b.op("Neg", [b.op("Div", [b.const(-1.0), x], f"{base}.neg")], base, rank=b.rank.get(x))


def _canon_nan(b: _Builder, y: str, base: str) -> str:
    """Every NaN as the NaN 0x7FC00000 (§15)."""
    return b.op("Where", [b.op("IsNaN", [y], f"{base}.isnan"), b.const(F.NAN), y], base, rank=b.rank.get(y))


def _softmax_last(b: _Builder, x: str, length: int, base: str) -> str:
    """§15.5 over the last axis: rows with NaN or +inf are NaN, rows whose maximum is -inf are +0.0."""
    r = b.rank[x]
    inf = b.const(np.inf)
    m = b.op("ReduceMax", [b.op("Where", [b.op("IsNaN", [x], f"{base}.isnan"), inf, x], f"{base}.nan_inf")],
             f"{base}.max", rank=r, axes=[-1], keepdims=1)
    bad = b.op("Equal", [m, inf], f"{base}.bad")
    masked = b.op("Equal", [m, b.const(-np.inf)], f"{base}.masked")
    m = b.op("Where", [b.op("Or", [bad, masked], f"{base}.special"), b.const(0.0), m], f"{base}.m", rank=r)
    e = _exp(b, b.op("Sub", [x, m], f"{base}.xm", rank=r), f"{base}.e")
    y = b.op("Div", [e, _sum(b, e, length, f"{base}.s")], f"{base}.y")
    y = b.op("Where", [masked, b.const(0.0), y], f"{base}.y0")
    return b.op("Where", [bad, b.const(F.NAN), y], base, rank=r)


def _normalize(b: _Builder, x: str, length: int, eps: float, base: str) -> str:
    """d * rstd of §15.6 over the last axis."""
    lf = b.const(np.float32(length))
    mean = b.op("Div", [_sum(b, x, length, f"{base}.sx"), lf], f"{base}.mean")
    d = b.op("Sub", [x, mean], f"{base}.d", rank=b.rank[x])
    var = b.op("Div", [_sum(b, b.op("Mul", [d, d], f"{base}.dd", rank=b.rank[x]), length, f"{base}.sdd"), lf],
               f"{base}.var")
    rstd = _recip(b, b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(eps))], f"{base}.ve")], f"{base}.sd"),
                  f"{base}.rstd")
    return b.op("Mul", [d, rstd], f"{base}.n", rank=b.rank[x])


def _affine(b: _Builder, y: str, node, weight, bias, shape) -> str:
    """y * w + b per channel (an absent weight or bias is the identity of §15.6 and is left out)."""
    name = node["name"]
    for v, kind in ((weight, "Mul"), (bias, "Add")):
        if v is not None:
            c = b.op("Reshape", [b.tensor(node, v), b.const(shape, np.int64)], f"{name}.{kind.lower()}_c")
            y = b.op(kind, [y, c], f"{name}.{kind.lower()}", rank=b.rank[y])
    return y


def _phi(b: _Builder, x: str, base: str) -> str:
    """Phi(x) of §15.3."""
    u = b.op("Mul", [b.op("Abs", [x], f"{base}.abs"), b.const(F.INV_SQRT2)], f"{base}.u")
    t = _recip(b, b.op("Add", [b.op("Mul", [u, b.const(0.5)], f"{base}.hu"), b.const(1.0)], f"{base}.den"),
               f"{base}.t")
    p = _horner(b, b.op("Sub", [t, b.const(0.5)], f"{base}.v"), F.ERFC_POLY, f"{base}.p")
    q = b.op("Mul", [b.op("Mul", [x, x], f"{base}.xx"), b.const(0.5)], f"{base}.q")
    e = _exp(b, b.op("Sub", [p, q], f"{base}.arg", rank=b.rank.get(x)), f"{base}.e")
    h = b.op("Mul", [b.op("Mul", [t, e], f"{base}.te"), b.const(0.5)], f"{base}.h")
    return b.op("Where", [b.op("GreaterOrEqual", [x, b.const(0.0)], f"{base}.pos"),
                          b.op("Sub", [b.const(1.0), h], f"{base}.1mh"), h], base)


def _gelu(b: _Builder, x: str, approximate: str, base: str) -> str:
    """§15.4: x * Phi(x), or x / (1 + exp(T x (1 + C x^2)))."""
    if approximate == "tanh":
        x2c = b.op("Mul", [b.op("Mul", [x, x], f"{base}.xx"), b.const(F.GELU_C)], f"{base}.cxx")
        w = b.op("Mul", [b.op("Mul", [x, b.op("Add", [x2c, b.const(1.0)], f"{base}.1c")], f"{base}.xw"),
                         b.const(F.GELU_T)], f"{base}.w", rank=b.rank.get(x))
        y = b.op("Div", [x, b.op("Add", [_exp(b, w, f"{base}.e"), b.const(1.0)], f"{base}.den")], f"{base}.y",
                 rank=b.rank.get(x))
    else:
        y = b.op("Mul", [x, _phi(b, x, f"{base}.phi")], f"{base}.y", rank=b.rank.get(x))
    return _canon_nan(b, y, base)


def _silu(b: _Builder, x: str, base: str) -> str:
    """§15.4: x / (1 + exp(-x))."""
    e = _exp(b, b.op("Neg", [x], f"{base}.negx", rank=b.rank.get(x)), f"{base}.e")
    y = b.op("Div", [x, b.op("Add", [e, b.const(1.0)], f"{base}.den")], f"{base}.y", rank=b.rank.get(x))
    return _canon_nan(b, y, base)


def _float_stage(b: _Builder, node, attrs, args) -> str:
    """softmax, layer_norm, group_norm, gelu, silu nodes (spec §15) as primitive operators."""
    kind, name = node["kind"], node["name"]
    x = b.tensor(node, args[0])
    r = b.rank.get(x)
    if not r:
        raise OnnxExportError(f"node {name!r} ({kind}): its input has no axis or a rank unknown to the exporter")
    if kind == "gelu":
        return _gelu(b, x, attrs.get("approximate", "none"), name)
    if kind == "silu":
        return _silu(b, x, name)
    shape = b.shape(node, args[0])
    if kind == "softmax":
        d = int(b.literal(node, args[1], "dim")) % r
        if d == r - 1:
            return _softmax_last(b, x, shape[-1], name)
        perm = list(range(r))
        perm[d], perm[-1] = perm[-1], perm[d]
        y = _softmax_last(b, b.op("Transpose", [x], f"{name}.in", rank=r, perm=perm), shape[d], f"{name}.t")
        return b.op("Transpose", [y], name, rank=r, perm=perm)
    if kind == "layer_norm":
        k = len(b.literal(node, args[1], "normalized_shape"))
        c = int(np.prod(shape[r - k:], dtype=np.int64))
        if k != 1:
            full = b.op("Shape", [x], f"{name}.shape")
            x = b.op("Reshape", [x, b.const([0] * (r - k) + [-1], np.int64)], f"{name}.rows", rank=r - k + 1)
        y = _normalize(b, x, c, attrs.get("eps", 1e-5), name)
        y = _affine(b, y, node, *(list(args[2:4]) + [None, None])[:2], [-1])
        y = _canon_nan(b, y, f"{name}.y")
        return b.op("Reshape", [y, full], name, rank=r) if k != 1 else y
    if kind == "group_norm":
        groups = int(b.literal(node, args[1], "groups"))
        c = shape[1]
        length = int(np.prod(shape[1:], dtype=np.int64)) // groups
        full = b.op("Shape", [x], f"{name}.shape")
        y = _normalize(b, b.op("Reshape", [x, b.const([0, groups, -1], np.int64)], f"{name}.seg", rank=3),
                       length, attrs.get("eps", 1e-5), name)
        y = b.op("Reshape", [y, b.const([0, c, -1], np.int64)], f"{name}.chan", rank=3)
        y = _affine(b, y, node, *(list(args[2:4]) + [None, None])[:2], [c, 1])
        return b.op("Reshape", [_canon_nan(b, y, f"{name}.y"), full], name, rank=r)
    raise AssertionError(kind)


_FLOAT_STAGES = ("softmax", "layer_norm", "group_norm", "gelu", "silu")


def _int_bmm(b: _Builder, node, t, attrs, a: str, bt: str) -> str:
    """a [..., M, K] @ b[..., N, K]^T as MatMulInteger on b transposed, then the float32 output stage."""
    name = node["name"]
    rb = b.rank.get(bt)
    if rb is None or rb < 2:
        raise OnnxExportError(f"node {name!r} (int_bmm): the rank of its second operand is not known to the exporter")
    perm = list(range(rb))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    acc = b.op("MatMulInteger", [a, b.op("Transpose", [bt], f"{name}.bT", perm=perm),
                                 b.const(attrs["a_zero_point"], np.uint8), b.const(attrs["b_zero_point"], np.uint8)],
               f"{name}.acc", rank=max(rb, b.rank.get(a) or 0))
    return _out_stage(b, node, acc, t, (-1,))


def _shape_input(b: _Builder, node, entries, keep_as_one: bool = False) -> str:
    """An int64 shape vector from literal sizes and run-time sizes (``size`` nodes); with ``keep_as_one``, a
    literal -1 (keep the axis) becomes 1, which Expand's broadcasting keeps."""
    parts, lit = [], []
    for e in entries:
        if is_ref(e):
            if lit:
                parts.append(b.const(lit, np.int64))
                lit = []
            parts.append(b.op("Unsqueeze", [b.tensor(node, e), b.const([0], np.int64)], f"{node['name']}.dim"))
        else:
            v = int(decode_literal(e))
            if v == 0:
                raise OnnxExportError(f"node {node['name']!r} ({node['kind']}): a zero-size axis has no ONNX "
                                      "Reshape/Expand form here")
            lit.append(1 if (keep_as_one and v == -1) else v)
    if lit:
        parts.append(b.const(lit, np.int64))
    return parts[0] if len(parts) == 1 else b.op("Concat", parts, f"{node['name']}.shape", axis=0)


def _is_f32(b: _Builder, node, v) -> bool:
    """Whether program value ``v`` is a float32 tensor (in the example run)."""
    ex = b.example(node, v, required=False) if is_ref(v) else None
    return ex is not None and ex[1] == np.float32


def _operand(b: _Builder, node, v, other) -> str:
    """A binary operand; a literal takes the dtype of the tensor operand (torch's scalar promotion, as the
    program's binary kind) where that needs no cast of the tensor."""
    if is_ref(v) or not is_ref(other):
        return b.tensor(node, v)
    ex = b.example(node, other, required=False)
    lit, dt = decode_literal(v), np.dtype(np.float32) if ex is None else ex[1]
    if isinstance(lit, float) and dt.kind != "f":
        raise OnnxExportError(f"node {node['name']!r} (binary): a float scalar with a {dt} tensor promotes the "
                              "tensor to float, which has no ONNX form here")
    return b.const(lit, dt)


def _layout(b: _Builder, node, attrs, args) -> str:
    """Layout and indexing kinds (sizes computed at run time included): size, reshape, expand, cat, arange,
    where, unsqueeze, select, transpose, slice, embedding, gather, index."""
    kind, name = node["kind"], node["name"]
    if kind == "cat":
        xs = [b.tensor(node, v) for v in args[0]]
        return b.op("Concat", xs, name, rank=b.rank.get(xs[0]), axis=int(b.literal(node, args[1], "dim"))
                    if len(args) > 1 else 0)
    if kind == "arange":
        ends = [b.tensor(node, a) if is_ref(a) else b.const(decode_literal(a), np.int64) for a in args]
        start, end, step = ([b.const(0, np.int64)] + ends + [b.const(1, np.int64)])[:3] if len(ends) == 1 \
            else (ends + [b.const(1, np.int64)])[:3]
        return b.op("Range", [start, end, step], name, rank=1)
    if kind == "where":
        dt = DTYPES[attrs.get("dtype", "float32")]
        vals = [b.tensor(node, a) if is_ref(a) else b.const(decode_literal(a), dt) for a in args[1:]]
        c = b.tensor(node, args[0])
        ranks = [b.rank[t] for t in [c] + vals if b.rank.get(t) is not None]
        return b.op("Where", [c] + vals, name, rank=max(ranks) if ranks else None)
    x = b.tensor(node, args[0])
    r = b.rank.get(x)
    if kind == "size":
        return b.op("Gather", [b.op("Shape", [x], f"{name}.shape"), b.const(b.literal(node, args[1], "dim"), np.int64)],
                    name, rank=0, axis=0)
    if kind == "reshape":
        return b.op("Reshape", [x, _shape_input(b, node, args[1])], name, rank=len(args[1]))
    if kind == "expand":
        return b.op("Expand", [x, _shape_input(b, node, args[1], keep_as_one=True)], name, rank=len(args[1]))
    if r is None:
        raise OnnxExportError(f"node {name!r} ({kind}): the rank of its input is not known to the exporter")
    if kind == "unsqueeze":
        d = int(b.literal(node, args[1], "dim"))
        return b.op("Unsqueeze", [x, b.const([d % (r + 1)], np.int64)], name, rank=r + 1)
    if kind == "select":
        return b.op("Gather", [x, b.const(b.literal(node, args[2], "index"), np.int64)], name, rank=r - 1,
                    axis=int(b.literal(node, args[1], "dim")) % r)
    if kind == "transpose":
        perm = list(range(r))
        d0, d1 = (int(b.literal(node, a, "dim")) % r for a in args[1:3])
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return b.op("Transpose", [x], name, rank=r, perm=perm)
    if kind == "slice":
        d, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
        big = np.iinfo(np.int64).max
        bounds = [_shape_input(b, node, [v]) if is_ref(v) else b.const([min(int(decode_literal(v)), big)], np.int64)
                  for v in (0 if start is None else start, big if end is None else end)]
        return b.op("Slice", [x, *bounds, b.const([int(b.literal(node, d, "dim"))], np.int64),
                              b.const([int(b.literal(node, step, "step"))], np.int64)], name, rank=r)
    if kind == "embedding":  # args: weight, ids
        ids = b.tensor(node, args[1])
        return b.op("Gather", [x, ids], name, rank=(b.rank.get(ids) or 0) + r - 1, axis=0)
    if kind == "gather":
        return b.op("GatherElements", [x, b.tensor(node, args[2])], name, rank=r,
                    axis=int(b.literal(node, args[1], "dim")) % r)
    if kind == "index":
        return _advanced_index(b, node, x, args[1])
    raise AssertionError(kind)


def _advanced_index(b: _Builder, node, x: str, indices) -> str:
    """x[i0, i1, ...] with integer index tensors on the leading axes: broadcast, stacked, GatherND."""
    name = node["name"]
    def integer(i) -> bool:
        ex = b.example(node, i, required=False)
        return ex is None or ex[1].kind in "iu"

    if not isinstance(indices, list) or not all(is_ref(i) and integer(i) for i in indices):
        raise OnnxExportError(f"node {name!r} (index): only integer index tensors on the leading axes have an ONNX "
                              "form here")
    idx = [b.tensor(node, i) for i in indices]
    total = idx[0]
    for i in idx[1:]:
        total = b.op("Add", [total, i], f"{name}.bcast")
    shape = b.op("Shape", [total], f"{name}.shape")
    last = b.const([-1], np.int64)
    parts = [b.op("Unsqueeze", [b.op("Expand", [i, shape], f"{name}.i"), last], f"{name}.u") for i in idx]
    stacked = parts[0] if len(parts) == 1 else b.op("Concat", parts, f"{name}.idx", axis=-1)
    ranks = [b.rank.get(i) for i in idx]
    r = b.rank.get(x)
    rank = None if None in ranks or r is None else max(ranks) + r - len(idx)
    return b.op("GatherND", [x, stacked], name, rank=rank)


_LAYOUT = ("size", "select", "slice", "transpose", "cat", "expand", "unsqueeze", "arange", "where", "embedding",
           "gather", "index")


def to_onnx(program, path=None):
    """The program as an ONNX ModelProto (written to ``path`` when given); OnnxExportError names a node without
    an ONNX form."""
    try:
        import onnx
        del onnx  # only checking that it is installed; _Builder imports what it uses
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install onnx (or pyqsim[test])") from None
    b = _Builder(program)
    h = b.helper
    for spec in program.inputs:
        name = b.fresh(spec["name"])
        b.env[spec["name"]] = name
        b.rank[name] = len(spec["shape"])
    for node in program.nodes:
        b.env[node["name"]] = _convert(b, node, program._node_tensors(node))
    graph_inputs = []
    for spec in program.inputs:
        elem = h.np_dtype_to_tensor_dtype(np.dtype(DTYPES[spec["dtype"]]))
        # a float stage's sums are laid out for the example's lengths: open axes other than the batch are fixed
        fixed = b._shapes[spec["name"]][0] if b.fixed else [None] * len(spec["shape"])
        graph_inputs.append(h.make_tensor_value_info(b.env[spec["name"]], elem, [
            "N" if i == 0 else (f if s is None else s) for i, (s, f) in enumerate(zip(spec["shape"], fixed))]))
    outputs = []
    for o in program.outputs:
        src = b.env[o["value"]["@"]]
        r = b.rank.get(src)
        if r is None:
            raise OnnxExportError(f"output {o['name']!r}: its rank is not known to the exporter")
        name = b.op("Identity", [src], o["name"])
        outputs.append(h.make_tensor_value_info(name, b.onnx.TensorProto.FLOAT, [f"{name}_{i}" for i in range(r)]))
    graph = h.make_graph(b.nodes, "pyqsim_program", graph_inputs, outputs, initializer=b.inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="pyqsim")
    b.onnx.checker.check_model(model)
    if path is not None:
        b.onnx.save(model, str(path))
    return model


def _convert(b: _Builder, node, t) -> str:
    kind, name = node["kind"], node["name"]
    attrs = {a: decode_literal(v) for a, v in node.get("attrs", {}).items()}
    args = node.get("args", [])
    if kind in ("constant", "full", "cast"):
        if kind == "cast":
            x = b.tensor(node, args[0])
        else:
            value = t["value"] if kind == "constant" else np.full([int(v) for v in b.literal(node, args[0], "shape")],
                                                                 b.literal(node, args[1], "value"))
            x = b.init(name, value)
            b.rank[x] = np.ndim(value)
        if attrs.get("dtype") is None:
            return x
        elem = b.helper.np_dtype_to_tensor_dtype(np.dtype(DTYPES[attrs["dtype"]]))
        return b.op("Cast", [x], f"{name}.as", rank=b.rank.get(x), to=elem)
    if kind == "quantize":
        x = b.tensor(node, args[0])
        q = b.op("QuantizeLinear", [x, b.init(f"{name}.scale", t["scale"].astype(np.float32).reshape(())),
                                    b.init(f"{name}.zp", np.uint8(t["zero_point"].reshape(())))],
                 f"{name}.q" if attrs.get("bits", 8) < 8 else name, rank=b.rank.get(x))
        if attrs.get("bits", 8) < 8:  # b-bit codes in uint8: clamp to 2^b - 1 (spec §2)
            q = b.op("Clip", [q, b.init(f"{name}.lo", np.uint8(0)), b.init(f"{name}.hi", np.uint8(2 ** attrs["bits"] - 1))],
                     name, rank=b.rank.get(x))
        return q
    if kind == "dequantize":
        x = b.tensor(node, args[0])
        return b.op("DequantizeLinear", [x, b.init(f"{name}.scale", t["scale"].astype(np.float32).reshape(())),
                                         b.init(f"{name}.zp", np.uint8(t["zero_point"].reshape(())))], name,
                    rank=b.rank.get(x))
    if kind in ("int_gemm", "int_conv2d"):
        if attrs.get("w_format", "int8") != "int8":
            raise OnnxExportError(f"node {name!r} ({kind}) has no ONNX form with {attrs['w_format']} weights (8-bit "
                                  "codes only): calibrate with w_bits=8 for ONNX")
        return (_int_gemm if kind == "int_gemm" else _int_conv2d)(b, node, t, attrs, b.tensor(node, args[0]))
    if kind == "unary" and attrs["op"] in _ONNX_UNARY:
        x = b.tensor(node, args[0])
        return b.op(_ONNX_UNARY[attrs["op"]], [x], name, rank=b.rank.get(x))
    if kind == "binary" and attrs["op"] in _ONNX_BINARY and attrs.get("alpha", 1) == 1:
        a, c = _operand(b, node, args[0], args[1]), _operand(b, node, args[1], args[0])
        ranks = [r for r in (b.rank.get(a), b.rank.get(c)) if r is not None]
        rank = max(ranks) if ranks else None
        if attrs["op"] == "add" and all(_is_f32(b, node, v) for v in args[:2]):  # §15.8: the NaN of §15
            return _canon_nan(b, b.op("Add", [a, c], f"{name}.sum", rank=rank), name)
        return b.op(_ONNX_BINARY[attrs["op"]], [a, c], name, rank=rank)
    if kind == "pool2d" and (attrs["op"] == "max" or (attrs.get("padding", [0, 0]) == [0, 0]
                                                      and attrs.get("divisor") is None)):
        x = b.tensor(node, args[0])
        (ph, pw) = attrs.get("padding", [0, 0])
        return b.op("MaxPool" if attrs["op"] == "max" else "AveragePool", [x], name, rank=4,
                    kernel_shape=list(attrs["kernel"]), strides=list(attrs["stride"]), pads=[ph, pw, ph, pw],
                    ceil_mode=int(bool(attrs.get("ceil_mode", False))))
    if kind == "reduce":
        x = b.tensor(node, args[0])
        dims = b.literal(node, args[1], "dims") if len(args) > 1 else None
        keep = bool(b.literal(node, args[2], "keepdim")) if len(args) > 2 else False
        kw = {"keepdims": int(keep)}
        if dims:
            kw["axes"] = [int(d) for d in dims]
        r = b.rank.get(x)
        return b.op(_REDUCE[attrs["op"]], [x], name, rank=None if r is None else (r if keep else None), **kw)
    if kind == "flatten":
        x = b.tensor(node, args[0])
        start = b.literal(node, args[1], "start") if len(args) > 1 else 0
        end = b.literal(node, args[2], "end") if len(args) > 2 else -1
        r = b.rank.get(x)
        if r is None or end % max(r, 1) != r - 1:
            raise OnnxExportError(f"node {name!r} (flatten): only flattening through the last axis of a tensor of "
                                  "known rank has an ONNX form here")
        start %= r
        shape = np.array([0] * start + [-1], np.int64)  # Reshape's 0 copies that axis
        return b.op("Reshape", [x, b.init(f"{name}.shape", shape)], name, rank=start + 1)
    if kind in _LAYOUT or kind == "reshape":
        return _layout(b, node, attrs, args)
    if kind == "int_bmm":
        return _int_bmm(b, node, t, attrs, b.tensor(node, args[0]), b.tensor(node, args[1]))
    if kind == "permute":
        x = b.tensor(node, args[0])
        dims = [int(d) for d in b.literal(node, args[1], "dims")]
        return b.op("Transpose", [x], name, rank=len(dims), perm=[d % len(dims) for d in dims])
    if kind in _FLOAT_STAGES:
        return _float_stage(b, node, attrs, args)
    if kind == "identity":
        x = b.tensor(node, args[0])
        return b.op("Identity", [x], name, rank=b.rank.get(x))
    raise OnnxExportError(f"node {name!r} ({kind}{'/' + attrs['op'] if 'op' in attrs else ''}) has no ONNX form "
                          "in pyqsim's exporter")
