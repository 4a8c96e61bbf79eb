"""Capture a PyTorch model as an ATen graph (torch.export) and lower a calibrated graph to a program.

The lowering walks the graph node by node: quantized modules inserted by calibration (any module with a
``lower(lw, node, args)`` method) become integer nodes, every other ATen op maps to one float/shape node
kind of :mod:`pyqsim.program.kinds`. An op with no mapping raises :class:`LoweringError` naming the op
and the module path. Sizes read from tensors stay symbolic, so batch and sequence length are free.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.fx as fx
from torch.export import Dim

from ..program import Program
from ..program.schema import encode_float, unique_name

_SKIP = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range",
         "_assert_async", "_functional_assert_async"}


class LoweringError(ValueError):
    """A graph node that has no program form (names the op and the module path)."""


# --------------------------------------------------------------------------- capture


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, dynamic: bool = True):
    """``torch.export`` graph of ``model`` on example inputs as a runnable GraphModule (ATen ops).

    Dimension 0 of every tensor input (batch) and dimension 1 of integer 2-D and float 3-D inputs
    (sequence) are left to export to keep symbolic (``Dim.AUTO``).
    """
    kwargs = dict(kwargs or {})
    model = model.eval()

    def dims(t):
        if not torch.is_tensor(t) or t.dim() == 0:
            return None
        d = {0: Dim.AUTO}
        if t.dim() >= 2 and ((not t.is_floating_point() and t.dim() == 2) or (t.is_floating_point() and t.dim() == 3)):
            d[1] = Dim.AUTO
        return d

    dyn_args = tuple(dims(a) for a in args) if dynamic else None
    dyn_kwargs = {k: dims(v) for k, v in kwargs.items()} if dynamic else None
    spec = None
    if dynamic:
        spec = dyn_args if not kwargs else {**dict(zip(_arg_names(model, len(args)), dyn_args)), **dyn_kwargs}
    try:
        with torch.no_grad():
            ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=spec, strict=False)
    except Exception as exc:  # noqa: BLE001 - report what the exporter said, with the model's name
        if dynamic:
            try:
                return capture(model, args, kwargs, dynamic=False)
            except Exception:  # noqa: BLE001
                pass
        raise LoweringError(f"torch.export cannot capture {type(model).__name__} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    gm = ep.module()
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


_LEAVES: dict = {}


@torch.library.custom_op("pyqsim::leaf", mutates_args=())
def _leaf(xs: list[torch.Tensor], key: int) -> torch.Tensor:
    """A quantized module kept whole through torch.export (eager: the module's own forward)."""
    return _LEAVES[key].leaf_forward(*xs).clone()


@_leaf.register_fake
def _leaf_fake(xs, key):
    return _LEAVES[key].leaf_fake(*xs)


def capture_with_leaves(model: torch.nn.Module, args: tuple, leaf_types: tuple):
    """:func:`capture`, keeping every module of ``leaf_types`` as one call_module node of the graph.

    Each such module needs ``leaf_forward(*tensors)`` and ``leaf_fake(*tensors)`` (the output on fake tensors).
    """
    leaves = {n: m for n, m in model.named_modules() if isinstance(m, leaf_types)}
    saved = {}
    for i, (name, m) in enumerate(leaves.items()):
        _LEAVES[i] = m
        saved[name] = m.forward
        m.forward = (lambda key: lambda *xs: torch.ops.pyqsim.leaf(list(xs), key))(i)
    keys = {i: name for i, name in enumerate(leaves)}
    try:
        gm = capture(model, args)
    finally:
        for name, m in leaves.items():
            del m.forward  # back to the class's forward
        _LEAVES.clear()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.pyqsim.leaf.default:
            xs, key = node.args
            name = keys[key]
            target = name.replace(".", "_")
            gm.add_submodule(target, leaves[name])
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(target, tuple(xs))
            new.meta.update(node.meta)
            new.meta["pyqsim_path"] = name
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _arg_names(model, n):
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [p.name for p in params[:n]]


def module_path(node: fx.Node) -> str:
    """The user-module path a graph node came from ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        return path.replace("L['self'].", "").replace("L__self___", "")
    return ""


def record_values(gm: fx.GraphModule, args, kwargs) -> dict:
    """Every node's output on the example inputs (real tensors)."""
    vals = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            vals[n] = out
            return out

    with torch.no_grad():
        flat = _flatten_call(gm, args, kwargs)
        Rec(gm).run(*flat)
    return vals


def _flatten_call(gm, args, kwargs):
    flat, _ = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
    return flat


# --------------------------------------------------------------------------- lowering


_TORCH_DTYPES = {torch.float32: "float32", torch.float64: "float32", torch.float16: "float32",
                 torch.bfloat16: "float32", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool",
                 torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16"}


class Val:
    """A program value: its JSON reference, and the quantizer of its codes when it holds codes."""

    def __init__(self, ref, codes=None):
        self.ref, self.codes = ref, codes


class Lowerer:
    """Builds program nodes and tensors from a calibrated GraphModule."""

    def __init__(self, gm: fx.GraphModule, values: dict):
        self.gm, self.values = gm, values
        self.nodes, self.tensors, self.env = [], {}, {}
        self._names, self._const_cache, self._deq_cache = set(), {}, {}
        self.scope = ""

    # ---------------------------------------------------------------- building blocks

    def fresh(self, base: str) -> str:
        return unique_name(base, self._names)

    def tensor(self, key: str, arr) -> str:
        """Store an array under a fresh tensor name; returns the name."""
        if torch.is_tensor(arr):
            arr = arr.detach().cpu()
            arr = arr.float().numpy() if arr.is_floating_point() else arr.numpy()
        arr = np.array(arr, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        name = key
        i = 1
        while name in self.tensors:
            name, i = f"{key}_{i}", i + 1
        self.tensors[name] = arr
        return name

    def emit(self, kind: str, args=(), attrs=None, tensors=None, base=None, dtype=None) -> dict:
        """Append a node; returns its reference."""
        name = self.fresh(base or kind)
        node = {"name": name, "kind": kind, "args": list(args)}
        a = dict(attrs or {})
        if dtype is not None:
            a["dtype"] = dtype
        if a:
            node["attrs"] = a
        if tensors:
            node["tensors"] = dict(tensors)
        if self.scope:
            node["scope"] = self.scope
        self.nodes.append(node)
        return {"@": name}

    def const(self, arr, base="const") -> dict:
        """A constant node holding ``arr``; bool arrays are stored as uint8 and cast back."""
        key = id(arr) if torch.is_tensor(arr) else None
        if key is not None and key in self._const_cache:
            return self._const_cache[key][1]
        is_bool = (torch.is_tensor(arr) and arr.dtype == torch.bool) or (isinstance(arr, np.ndarray) and arr.dtype == bool)
        ref = self.emit("constant", tensors={"value": self.tensor(base, arr)}, base=base,
                        dtype="bool" if is_bool else None)
        if key is not None:
            self._const_cache[key] = (arr, ref)  # keeps arr alive, so its id is not reused
        return ref

    def float_ref(self, v) -> object:
        """The float form of a value: codes are dequantized (once)."""
        if isinstance(v, Val):
            if v.codes is None:
                return v.ref
            key = v.ref["@"]
            if key not in self._deq_cache:
                q = v.codes
                self._deq_cache[key] = self.emit("dequantize", [v.ref], tensors=self.qparams(q, key), base=f"{key}.dq")
            return self._deq_cache[key]
        return v

    def qparams(self, q, base: str) -> dict:
        """scale / zero_point tensors of a per-tensor uniform quantizer (float32 scale, int zero point)."""
        s, z = quant_scale_zp(q)
        return {"scale": self.tensor(f"{base}.scale", np.array(s, np.float32)),
                "zero_point": self.tensor(f"{base}.zero_point", np.array(z, np.int32))}

    def quantize(self, v, q, base: str) -> Val:
        """Codes of value ``v`` under per-tensor uniform quantizer ``q`` (reused when ``v`` already holds them)."""
        if isinstance(v, Val) and v.codes is q:
            return v
        ref = self.emit("quantize", [self.float_ref(v)], {"bits": int(q.bits)}, self.qparams(q, base), base=base)
        return Val(ref, q)

    # ---------------------------------------------------------------- argument conversion

    def arg(self, a, codes_ok=False):
        """JSON form of an fx argument: nodes become references, lists recurse, dtypes become names."""
        if isinstance(a, fx.Node):
            v = self.env.get(a)
            if v is None:
                raise LoweringError(f"value {a.name} is used before it is defined")
            return v.ref if (codes_ok and isinstance(v, Val)) else self.float_ref(v)
        if isinstance(a, (list, tuple)):
            return [self.arg(x) for x in a]
        if isinstance(a, bool) or a is None or isinstance(a, str) or isinstance(a, int):
            return a
        if isinstance(a, float):
            return encode_float(a)
        if isinstance(a, torch.dtype):
            return _TORCH_DTYPES.get(a, str(a))
        if isinstance(a, (torch.device, torch.layout, torch.memory_format)):
            return None
        if torch.is_tensor(a):
            return self.const(a)
        raise LoweringError(f"argument of type {type(a).__name__} ({a!r}) has no program form")

    def dtype_of(self, node) -> str | None:
        v = self.values.get(node)
        if torch.is_tensor(v):
            return _TORCH_DTYPES.get(v.dtype)
        return None

    # ---------------------------------------------------------------- the walk

    def run(self, input_ranges=None) -> tuple[list, list]:
        inputs, outputs = [], []
        for node in self.gm.graph.nodes:
            self.scope = module_path(node)
            if node.op == "placeholder":
                v = self.values.get(node)
                if not torch.is_tensor(v):
                    continue
                name = self.fresh(node.target)
                meta = node.meta.get("val")
                shape = [d if isinstance(d, int) else None for d in (meta.shape if meta is not None else v.shape)]
                spec = {"name": name, "dtype": _TORCH_DTYPES.get(v.dtype, "float32"), "shape": shape}
                if input_ranges and node.target in input_ranges:
                    spec["range"] = list(input_ranges[node.target])
                inputs.append(spec)
                self.env[node] = Val({"@": name})
            elif node.op == "get_attr":
                obj = _fetch_attr(self.gm, node.target)
                if torch.is_tensor(obj):
                    self.env[node] = Val(self.const(obj, base=node.target))
            elif node.op == "call_module":
                mod = self.gm.get_submodule(node.target)
                if node.target.startswith("_guards"):
                    continue
                lower = getattr(mod, "lower", None)
                if lower is None:
                    lower = _MODULES.get(type(mod))
                    if lower is None:
                        raise LoweringError(f"module {node.target} ({type(mod).__name__}) has no program form")
                    res = lower(self, mod, node)
                else:
                    self.scope = node.meta.get("pyqsim_path", node.target)
                    res = lower(self, node)
                self.env[node] = res if isinstance(res, Val) else Val(res)
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                flat, _ = torch.utils._pytree.tree_flatten(node.args[0])
                for i, o in enumerate(flat):
                    if isinstance(o, fx.Node):
                        ref = self.float_ref(self.env[o])
                        outputs.append({"name": f"output{i}", "value": ref})
        return inputs, outputs

    def _call(self, node):
        target = node.target
        name = _op_name(target)
        if name in _SKIP:
            return
        conv = _ATEN.get(name)
        if conv is None:
            raise LoweringError(f"op {name} (graph node {node.name}, module {self.scope or '<top>'}) has no program "
                                f"form; supported ops: docs/program.md")
        res = conv(self, node)
        if res is not None:
            self.env[node] = res if isinstance(res, Val) else Val(res)


def _fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__ if hasattr(target, "overloadpacket") else str(target)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    mod = getattr(target, "__module__", "") or ""
    return f"{mod.split('.')[0]}.{getattr(target, '__name__', str(target))}" if mod in ("_operator", "operator", "math", "torch", "builtins") or mod.startswith("torch") else getattr(target, "__name__", str(target))


def quant_scale_zp(q) -> tuple[float, int]:
    """(float32 scale, integer zero point) of a per-tensor uniform quantizer of either calibration method."""
    if hasattr(q, "export"):  # Q-Diffusion ActQuantizer
        s, z = q.export()
        return float(np.float32(s)), int(z)
    if q.scale.dim() != 0:
        raise LoweringError(f"{getattr(q, 'name', 'quantizer')}: a per-channel activation quantizer cannot be "
                            "executed by an integer GEMM (use post_ln='reparam' or 'layer')")
    return float(np.float32(q.scale)), int(q.zero_point)


# --------------------------------------------------------------------------- ATen op table

_ATEN: dict = {}


def aten(*names):
    def deco(fn):
        for n in names:
            _ATEN[n] = fn
        return fn
    return deco


def _codes_source(lw, node):
    """The quantizer of the codes held by the node's first argument, or None."""
    src = lw.env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    return src.codes if isinstance(src, Val) else None


def _simple(kind, nargs=None, attrs=None, codes_ok=False):
    """Converter emitting ``kind`` with the node's positional args (first ``nargs``); a layout op (``codes_ok``)
    applied to codes keeps them as codes (no dtype cast)."""
    def conv(lw, node):
        a = list(node.args)[:nargs] if nargs is not None else list(node.args)
        codes = _codes_source(lw, node) if codes_ok else None
        args = [lw.arg(x, codes_ok=codes_ok and i == 0) for i, x in enumerate(a)]
        ref = lw.emit(kind, args, attrs, base=node.name, dtype=None if codes is not None else lw.dtype_of(node))
        return Val(ref, codes) if codes is not None else ref
    return conv


for _n, _k in (("view", "reshape"), ("reshape", "reshape"), ("_unsafe_view", "reshape"), ("permute", "permute"),
               ("transpose", "transpose"), ("expand", "expand"), ("unsqueeze", "unsqueeze"), ("unflatten", "unflatten"),
               ("slice", "slice"), ("select", "select"), ("flatten", "flatten"), ("repeat", "repeat")):
    aten(_n)(_simple(_k, codes_ok=True))

for _n in ("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "dropout", "feature_dropout", "alpha_dropout"):
    aten(_n)(_simple("identity", 1, codes_ok=True))


@aten("squeeze")
def _squeeze(lw, node):
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], int):
        args[1] = [args[1]]
    codes = _codes_source(lw, node)
    ref = lw.emit("squeeze", [lw.arg(a, codes_ok=i == 0) for i, a in enumerate(args)], base=node.name,
                  dtype=None if codes is not None else lw.dtype_of(node))
    return Val(ref, codes) if codes is not None else ref


@aten("t", "numpy_T")
def _t(lw, node):
    return lw.emit("transpose", [lw.arg(node.args[0]), 0, 1], base=node.name, dtype=lw.dtype_of(node))


for _n, _op in (("neg", "neg"), ("exp", "exp"), ("log", "log"), ("sqrt", "sqrt"), ("rsqrt", "rsqrt"), ("sin", "sin"),
                ("cos", "cos"), ("tanh", "tanh"), ("sigmoid", "sigmoid"), ("relu", "relu"), ("abs", "abs"),
                ("reciprocal", "reciprocal"), ("logical_not", "logical_not"), ("bitwise_not", "logical_not"),
                ("floor", "floor"), ("ceil", "ceil"), ("round", "round"), ("erf", "erf"), ("square", "square"),
                ("sign", "sign")):
    aten(_n)(_simple("unary", 1, {"op": _op}))

for _n, _op in (("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div"), ("pow", "pow"), ("maximum", "maximum"),
                ("minimum", "minimum"), ("eq", "eq"), ("ne", "ne"), ("lt", "lt"), ("le", "le"), ("gt", "gt"),
                ("ge", "ge"), ("__and__", "and"), ("logical_and", "and"), ("__or__", "or"), ("logical_or", "or"),
                ("logical_xor", "xor"), ("bitwise_and", "and"), ("bitwise_or", "or"), ("floor_divide", "floor_divide"),
                ("remainder", "remainder"), ("fmod", "remainder"), ("atan2", "atan2")):
    def _mk(op):
        def conv(lw, node):
            attrs = {"op": op}
            alpha = node.kwargs.get("alpha", 1)
            if alpha != 1:
                attrs["alpha"] = alpha
            if op == "div" and node.kwargs.get("rounding_mode") == "floor":
                attrs["op"] = "floor_divide"
            elif op == "div" and node.kwargs.get("rounding_mode") == "trunc":
                raise LoweringError(f"div with rounding_mode='trunc' (node {node.name}) has no program form")
            return lw.emit("binary", [lw.arg(node.args[0]), lw.arg(node.args[1])], attrs, base=node.name,
                           dtype=lw.dtype_of(node))
        return conv
    aten(_n)(_mk(_op))


@aten("rsub")
def _rsub(lw, node):
    a, b = node.args[:2]
    alpha = node.kwargs.get("alpha", 1)
    scaled = lw.arg(a) if alpha == 1 else lw.emit("binary", [lw.arg(a), alpha], {"op": "mul"}, base=node.name + "_a")
    return lw.emit("binary", [lw.arg(b), scaled], {"op": "sub"}, base=node.name, dtype=lw.dtype_of(node))


@aten("where")
def _where(lw, node):
    return lw.emit("where", [lw.arg(a) for a in node.args[:3]], base=node.name, dtype=lw.dtype_of(node))


@aten("masked_fill")
def _masked_fill(lw, node):
    return lw.emit("masked_fill", [lw.arg(a) for a in node.args[:3]], base=node.name, dtype=lw.dtype_of(node))


@aten("clamp", "clip", "hardtanh")
def _clamp(lw, node):
    args = list(node.args) + [node.kwargs.get("min"), node.kwargs.get("max")][len(node.args) - 1:]
    if _op_name(node.target) == "hardtanh":
        args = [node.args[0], node.args[1] if len(node.args) > 1 else -1.0, node.args[2] if len(node.args) > 2 else 1.0]
    return lw.emit("clamp", [lw.arg(a) for a in args[:3]], base=node.name, dtype=lw.dtype_of(node))


@aten("clamp_min")
def _clamp_min(lw, node):
    return lw.emit("clamp", [lw.arg(node.args[0]), lw.arg(node.args[1]), None], base=node.name, dtype=lw.dtype_of(node))


@aten("clamp_max")
def _clamp_max(lw, node):
    return lw.emit("clamp", [lw.arg(node.args[0]), None, lw.arg(node.args[1])], base=node.name, dtype=lw.dtype_of(node))


@aten("to", "_to_copy", "type_as", "_to_dtype")
def _to(lw, node):
    src = lw.env.get(node.args[0])
    if isinstance(src, Val) and src.codes is not None and lw.dtype_of(node) == "float32" and \
            _TORCH_DTYPES.get(getattr(lw.values.get(node.args[0]), "dtype", None)) == "float32":
        return src  # a float -> float no-op on a value held as codes
    return lw.emit("cast", [lw.arg(node.args[0])], base=node.name, dtype=lw.dtype_of(node))


@aten("linear")
def _linear(lw, node):
    return lw.emit("linear", [lw.arg(a) for a in node.args[:3]], base=node.name, dtype="float32")


@aten("matmul", "bmm", "mm")
def _matmul(lw, node):
    return lw.emit("matmul", [lw.arg(a) for a in node.args[:2]], base=node.name, dtype="float32")


@aten("addmm")
def _addmm(lw, node):
    mm = lw.emit("matmul", [lw.arg(node.args[1]), lw.arg(node.args[2])], base=node.name + "_mm", dtype="float32")
    return lw.emit("binary", [mm, lw.arg(node.args[0])], {"op": "add"}, base=node.name, dtype="float32")


def _pair(v, n=2):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


@aten("conv2d", "convolution")
def _conv2d(lw, node):
    a = list(node.args) + [None] * 9
    x, w, b = a[:3]
    stride, padding, dilation = _pair(a[3] or 1), _pair(a[4] or 0), _pair(a[5] or 1)
    if _op_name(node.target) == "convolution":
        if a[6]:
            raise LoweringError(f"transposed convolution (node {node.name}) has no program form")
        groups = a[8] or 1
    else:
        groups = a[6] or 1
    if isinstance(padding[0], str):
        raise LoweringError(f"conv2d padding={padding[0]!r} (node {node.name}) has no program form; use integers")
    wv = lw.values.get(w) if isinstance(w, fx.Node) else None
    if wv is not None and wv.dim() != 4:
        raise LoweringError(f"convolution of weight rank {wv.dim()} (node {node.name}): only conv2d is supported")
    return lw.emit("conv2d", [lw.arg(x), lw.arg(w), lw.arg(b)],
                   {"stride": stride, "padding": padding, "dilation": dilation, "groups": int(groups)},
                   base=node.name, dtype="float32")


@aten("layer_norm")
def _layer_norm(lw, node):
    a = list(node.args) + [None] * 5
    return lw.emit("layer_norm", [lw.arg(a[0]), list(a[1]), lw.arg(a[2]), lw.arg(a[3])],
                   {"eps": float(a[4] if a[4] is not None else 1e-5)}, base=node.name, dtype="float32")


@aten("group_norm")
def _group_norm(lw, node):
    a = list(node.args) + [None] * 5
    return lw.emit("group_norm", [lw.arg(a[0]), int(a[1]), lw.arg(a[2]), lw.arg(a[3])],
                   {"eps": float(a[4] if a[4] is not None else 1e-5)}, base=node.name, dtype="float32")


@aten("batch_norm", "_native_batch_norm_legit_no_training")
def _batch_norm(lw, node):
    a = list(node.args) + [None] * 9
    if _op_name(node.target) == "batch_norm":
        if a[5]:
            raise LoweringError(f"batch_norm in training mode (node {node.name}) has no program form; call .eval()")
        eps = a[7]
    else:  # (x, w, b, mean, var, momentum, eps) -> (out, save_mean, save_rstd); users read item 0
        eps = a[6]
    ref = lw.emit("batch_norm", [lw.arg(x) for x in a[:5]], {"eps": float(eps if eps is not None else 1e-5)},
                  base=node.name, dtype="float32")
    if _op_name(node.target) == "batch_norm":
        return ref
    return lw.emit("identity", [[ref]], base=node.name + "_tuple")


def _pool_attrs(node, kernel, stride, padding):
    kernel = _pair(kernel)
    stride = _pair(stride) if stride else kernel
    return {"kernel": [int(k) for k in kernel], "stride": [int(s) for s in stride],
            "padding": [int(p) for p in _pair(padding or 0)]}


@aten("max_pool2d", "max_pool2d_with_indices")
def _max_pool2d(lw, node):
    a = list(node.args) + [None] * 5
    if any(d != 1 for d in _pair(a[4] or 1)):
        raise LoweringError(f"max_pool2d with dilation {a[4]} (node {node.name}) has no program form")
    attrs = {"op": "max", **_pool_attrs(node, a[1], a[2], a[3]), "ceil_mode": bool(a[5])}
    ref = lw.emit("pool2d", [lw.arg(a[0])], attrs, base=node.name, dtype="float32")
    if _op_name(node.target) == "max_pool2d_with_indices":
        for user in node.users:
            if not (_op_name(user.target).endswith("getitem") and user.args[1] == 0):
                raise LoweringError(f"max_pool2d indices (node {node.name}) have no program form")
        return lw.emit("identity", [[ref]], base=node.name + "_tuple")
    return ref


@aten("avg_pool2d")
def _avg_pool2d(lw, node):
    a = list(node.args) + [None] * 6
    attrs = {"op": "avg", **_pool_attrs(node, a[1], a[2], a[3]), "ceil_mode": bool(a[4]),
             "count_include_pad": True if a[5] is None else bool(a[5])}
    if a[6] is not None:
        attrs["divisor"] = int(a[6])
    return lw.emit("pool2d", [lw.arg(a[0])], attrs, base=node.name, dtype="float32")


@aten("adaptive_avg_pool2d", "_adaptive_avg_pool2d")
def _adaptive_avg_pool2d(lw, node):
    x = lw.values[node.args[0]]
    size = [x.shape[-2 + i] if s is None else int(s) for i, s in enumerate(_pair(node.args[1]))]
    if size == [1, 1]:
        return lw.emit("reduce", [lw.arg(node.args[0]), [-2, -1], True], {"op": "mean"}, base=node.name,
                       dtype="float32")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % size[0] or w % size[1]:
        raise LoweringError(f"adaptive_avg_pool2d from {h}x{w} to {size[0]}x{size[1]} (node {node.name}): only "
                            "output sizes that divide the input have a program form")
    k = [h // size[0], w // size[1]]
    return lw.emit("pool2d", [lw.arg(node.args[0])], {"op": "avg", "kernel": k, "stride": k}, base=node.name,
                   dtype="float32")


@aten("softmax", "_softmax", "_safe_softmax")
def _softmax(lw, node):
    return lw.emit("softmax", [lw.arg(node.args[0]), int(node.args[1])], base=node.name, dtype="float32")


@aten("log_softmax", "_log_softmax")
def _log_softmax(lw, node):
    return lw.emit("log_softmax", [lw.arg(node.args[0]), int(node.args[1])], base=node.name, dtype="float32")


@aten("gelu")
def _gelu(lw, node):
    approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return lw.emit("gelu", [lw.arg(node.args[0])], {"approximate": approx}, base=node.name, dtype="float32")


@aten("silu")
def _silu(lw, node):
    return lw.emit("silu", [lw.arg(node.args[0])], base=node.name, dtype="float32")


@aten("scaled_dot_product_attention")
def _sdpa(lw, node):
    a = list(node.args) + [None] * 4
    kw = node.kwargs
    mask = kw.get("attn_mask", a[3])
    if kw.get("dropout_p", a[4] or 0.0):
        raise LoweringError(f"scaled_dot_product_attention with dropout (node {node.name}) has no program form")
    if kw.get("enable_gqa", False):
        raise LoweringError(f"scaled_dot_product_attention with enable_gqa (node {node.name}) has no program form")
    attrs = {"causal": bool(kw.get("is_causal", a[5] or False))}
    if kw.get("scale") is not None:
        attrs["scale"] = float(kw["scale"])
    return lw.emit("sdpa", [lw.arg(a[0]), lw.arg(a[1]), lw.arg(a[2]), lw.arg(mask)], attrs, base=node.name,
                   dtype="float32")


def _reduce(op):
    def conv(lw, node):
        a = list(node.args)
        dims = a[1] if len(a) > 1 else node.kwargs.get("dim")
        if isinstance(dims, int):
            dims = [dims]
        keep = a[2] if len(a) > 2 else node.kwargs.get("keepdim", False)
        return lw.emit("reduce", [lw.arg(a[0]), dims, bool(keep)], {"op": op}, base=node.name, dtype=lw.dtype_of(node))
    return conv


for _n, _op in (("mean", "mean"), ("sum", "sum"), ("amax", "amax"), ("amin", "amin"), ("prod", "prod")):
    aten(_n)(_reduce(_op))


@aten("index")
def _index(lw, node):
    idx = [None if i is None else lw.arg(i) for i in node.args[1]]
    return lw.emit("index", [lw.arg(node.args[0]), idx], base=node.name, dtype=lw.dtype_of(node))


@aten("gather")
def _gather(lw, node):
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    return lw.emit("gather", [lw.arg(node.args[0]), int(dim), lw.arg(node.args[2])], base=node.name,
                   dtype=lw.dtype_of(node))


@aten("cat", "concat", "concatenate")
def _cat(lw, node):
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return lw.emit("cat", [[lw.arg(x) for x in node.args[0]], int(dim)], base=node.name, dtype=lw.dtype_of(node))


@aten("stack")
def _stack(lw, node):
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return lw.emit("stack", [[lw.arg(x) for x in node.args[0]], int(dim)], base=node.name, dtype=lw.dtype_of(node))


@aten("split", "split_with_sizes")
def _split(lw, node):
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return lw.emit("split", [lw.arg(node.args[0]), lw.arg(node.args[1]), int(dim)], base=node.name)


@aten("chunk")
def _chunk(lw, node):
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return lw.emit("chunk", [lw.arg(node.args[0]), int(node.args[1]), int(dim)], base=node.name)


@aten("unbind")
def _unbind(lw, node):
    dim = node.args[1] if len(node.args) > 1 else 0
    parts = lw.emit("split", [lw.arg(node.args[0]), 1, int(dim)], base=node.name + "_parts")
    n = lw.values[node.args[0]].shape[dim]
    return lw.emit("stack", [[lw.emit("squeeze", [lw.emit("getitem", [parts, i]), [dim]]) for i in range(n)], 0],
                   base=node.name)


@aten("embedding")
def _embedding(lw, node):
    return lw.emit("embedding", [lw.arg(node.args[0]), lw.arg(node.args[1])], base=node.name, dtype="float32")


@aten("upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest1d", "upsample_nearest3d")
def _upsample(lw, node):
    if _op_name(node.target) == "_upsample_nearest_exact2d":
        raise LoweringError(f"nearest-exact upsampling (node {node.name}) has no program form")
    a = list(node.args) + [None, None]
    size = a[1] if a[1] is not None else node.kwargs.get("output_size")
    scales = a[2] if len(node.args) > 2 else node.kwargs.get("scale_factors")
    if size is None:
        out = lw.values[node].shape[2:]
        size = [int(s) for s in out] if scales is None else None
    attrs = {"scales": [float(s) for s in scales]} if size is None else {}
    return lw.emit("upsample_nearest", [lw.arg(a[0]), lw.arg(size) if size is not None else None], attrs,
                   base=node.name, dtype=lw.dtype_of(node))


@aten("constant_pad_nd", "pad")
def _pad(lw, node):
    a = list(node.args)
    if _op_name(node.target) == "pad":  # pad(x, pad, mode="constant", value=None)
        a = a + [node.kwargs.get("mode", "constant"), node.kwargs.get("value")][len(a) - 2:]
        mode, value = a[2], a[3]
    else:  # constant_pad_nd(x, pad, value=0)
        mode, value = "constant", a[2] if len(a) > 2 else node.kwargs.get("value", 0)
    if mode != "constant":
        raise LoweringError(f"pad mode {mode!r} (node {node.name}) has no program form")
    return lw.emit("pad", [lw.arg(a[0]), lw.arg(a[1]), 0 if value is None else value], base=node.name,
                   dtype=lw.dtype_of(node))


@aten("arange")
def _arange(lw, node):
    return lw.emit("arange", [lw.arg(a) for a in node.args], base=node.name, dtype=lw.dtype_of(node))


@aten("full", "zeros", "ones", "empty", "new_full", "new_zeros", "new_ones", "new_empty", "full_like", "zeros_like",
      "ones_like", "empty_like", "scalar_tensor")
def _full(lw, node):
    name = _op_name(node.target)
    a = list(node.args)
    if name in ("full", "new_full"):
        shape, value = a[-2], a[-1]
    elif name == "scalar_tensor":
        shape, value = [], a[0]
    elif name.endswith("_like"):
        value = a[1] if name == "full_like" else (1 if name == "ones_like" else 0)
        shape = _shape_args(lw, a[0])
    else:
        shape = a[-1] if name.startswith("new_") else a[0]
        value = 1 if "ones" in name else 0
    return lw.emit("full", [lw.arg(shape), value], base=node.name, dtype=lw.dtype_of(node))


def _shape_args(lw, x):
    n = lw.values[x].dim()
    return [lw.emit("size", [lw.arg(x), i]) for i in range(n)]


@aten("repeat_interleave")
def _repeat_interleave(lw, node):
    a = list(node.args)
    dim = a[2] if len(a) > 2 else node.kwargs.get("dim")
    if not isinstance(a[1], int) or dim is None:
        raise LoweringError(f"repeat_interleave with tensor repeats or no dim (node {node.name}) has no program form")
    return lw.emit("repeat_interleave", [lw.arg(a[0]), a[1], int(dim)], base=node.name, dtype=lw.dtype_of(node))


@aten("expand_as")
def _expand_as(lw, node):
    return lw.emit("expand", [lw.arg(node.args[0]), _shape_args(lw, node.args[1])], base=node.name,
                   dtype=lw.dtype_of(node))


@aten("sym_size")
def _sym_size(lw, node):
    return lw.emit("size", [lw.arg(node.args[0]), int(node.args[1])], base=node.name)


@aten("getitem", "_operator.getitem")
def _getitem(lw, node):
    return lw.emit("getitem", [lw.arg(node.args[0]), int(node.args[1])], base=node.name, dtype=lw.dtype_of(node))


for _n, _op in (("_operator.add", "add"), ("_operator.sub", "sub"), ("_operator.mul", "mul"),
                ("_operator.floordiv", "floordiv"), ("_operator.truediv", "truediv"), ("_operator.mod", "mod"),
                ("_operator.neg", "neg"), ("_operator.pow", "pow"), ("math.ceil", "ceil"), ("math.floor", "floor"),
                ("torch.sym_float", "float"), ("torch.sym_int", "int"), ("torch.sym_max", "max"),
                ("torch.sym_min", "min"), ("sym_float", "float"), ("sym_int", "int"), ("sym_max", "max"),
                ("sym_min", "min")):
    def _mk_scalar(op):
        def conv(lw, node):
            args = [lw.arg(a) for a in node.args]
            return lw.emit("scalar", args[:2], {"op": op}, base=node.name)
        return conv
    aten(_n)(_mk_scalar(_op))


# --------------------------------------------------------------------------- plain modules left in a graph

def _ln_module(lw, mod, node):
    return lw.emit("layer_norm", [lw.arg(node.args[0]), list(mod.normalized_shape),
                                  lw.const(mod.weight) if mod.weight is not None else None,
                                  lw.const(mod.bias) if mod.bias is not None else None],
                   {"eps": float(mod.eps)}, base=node.target, dtype="float32")


_MODULES = {torch.nn.LayerNorm: _ln_module}


# --------------------------------------------------------------------------- whole program


def lower(gm: fx.GraphModule, args=(), kwargs=None, quant: dict | None = None, source: dict | None = None,
          input_ranges: dict | None = None) -> Program:
    """The program of calibrated graph ``gm`` (example inputs ``args``/``kwargs`` give dtypes and shapes)."""
    kwargs = dict(kwargs or {})
    values = record_values(gm, args, kwargs)
    lw = Lowerer(gm, values)
    inputs, outputs = lw.run(input_ranges)
    examples = {}
    names = [i["name"] for i in inputs]
    flat = _flatten_call(gm, args, kwargs)
    flat = [t for t in flat if torch.is_tensor(t)]
    for name, t in zip(names, flat):
        examples[name] = lw.tensor(f"examples.{name}", t)
    prog = {"inputs": inputs, "outputs": outputs, "nodes": lw.nodes, "quant": quant or {}, "source": source or {},
            "examples": examples}
    return Program(lw.tensors, {"program": prog})
