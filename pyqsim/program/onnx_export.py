"""A program as a standard ONNX graph (opset 17): integer nodes as MatMulInteger / ConvInteger with exact int32
corrections, quantize as QuantizeLinear, float and layout nodes as their ONNX operators (docs/program.md).

Every mapped integer node computes the same bits as pyqsim's op (spec §4-§6 with a float32 output stage:
``fl32(fl32(acc) * scale)`` is Cast then Mul). A node kind without a mapping raises :class:`OnnxExportError`
naming the node; the log2 attention product (spec §7) and the split ops (spec §8) have no ONNX operator.
"""
from __future__ import annotations

import numpy as np

from .schema import DTYPES, decode_literal, is_ref, unique_name

OPSET = 17


class OnnxExportError(ValueError):
    """A program node that has no ONNX form."""


_ONNX_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh", "sigmoid": "Sigmoid",
               "relu": "Relu", "abs": "Abs", "reciprocal": "Reciprocal", "erf": "Erf", "floor": "Floor",
               "ceil": "Ceil", "sin": "Sin", "cos": "Cos"}
_ONNX_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
                "minimum": "Min"}
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

    def fresh(self, base: str) -> str:
        return unique_name(base, self.names)

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
    graph_inputs = []
    for spec in program.inputs:
        name = b.fresh(spec["name"])
        b.env[spec["name"]] = name
        b.rank[name] = len(spec["shape"])
        elem = h.np_dtype_to_tensor_dtype(np.dtype(DTYPES[spec["dtype"]]))
        graph_inputs.append(h.make_tensor_value_info(name, elem, ["N" if i == 0 else (None if s is None else s)
                                                                  for i, s in enumerate(spec["shape"])]))
    for node in program.nodes:
        b.env[node["name"]] = _convert(b, node, program._node_tensors(node))
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
    if kind == "constant":
        return b.init(name, t["value"])
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
    if kind == "int_gemm":
        if attrs.get("w_format", "int8") not in ("int8",):
            raise OnnxExportError(f"node {name!r} (int_gemm): {attrs['w_format']} weights are exported as 8-bit "
                                  "codes only; calibrate with w_bits=8 for ONNX")
        return _int_gemm(b, node, t, attrs, b.tensor(node, args[0]))
    if kind == "int_conv2d":
        if attrs.get("w_format", "int8") not in ("int8",):
            raise OnnxExportError(f"node {name!r} (int_conv2d): {attrs['w_format']} weights are exported as 8-bit "
                                  "codes only; calibrate with w_bits=8 for ONNX")
        return _int_conv2d(b, node, t, attrs, b.tensor(node, args[0]))
    if kind == "unary" and attrs["op"] in _ONNX_UNARY:
        x = b.tensor(node, args[0])
        return b.op(_ONNX_UNARY[attrs["op"]], [x], name, rank=b.rank.get(x))
    if kind == "binary" and attrs["op"] in _ONNX_BINARY and attrs.get("alpha", 1) == 1:
        a, c = b.tensor(node, args[0]), b.tensor(node, args[1])
        ranks = [r for r in (b.rank.get(a), b.rank.get(c)) if r is not None]
        return b.op(_ONNX_BINARY[attrs["op"]], [a, c], name, rank=max(ranks) if ranks else None)
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
    if kind == "reshape":
        x = b.tensor(node, args[0])
        shape = [int(s) for s in b.literal(node, args[1], "shape")]
        return b.op("Reshape", [x, b.init(f"{name}.shape", np.array(shape, np.int64))], name, rank=len(shape))
    if kind == "permute":
        x = b.tensor(node, args[0])
        dims = [int(d) for d in b.literal(node, args[1], "dims")]
        return b.op("Transpose", [x], name, rank=len(dims), perm=[d % len(dims) for d in dims])
    if kind == "softmax":
        x = b.tensor(node, args[0])
        return b.op("Softmax", [x], name, rank=b.rank.get(x), axis=int(b.literal(node, args[1], "dim")))
    if kind in ("identity", "cast") and attrs.get("dtype") in (None, "float32"):
        x = b.tensor(node, args[0])
        return b.op("Identity", [x], name, rank=b.rank.get(x))
    raise OnnxExportError(f"node {name!r} ({kind}{'/' + attrs['op'] if 'op' in attrs else ''}) has no ONNX form "
                          "in pyqsim's exporter")
