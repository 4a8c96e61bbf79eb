"""A program: typed graph of nodes plus the tensors they read, validated whole at load (docs/program.md)."""
from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from .. import ops
from .._checks import codes_spec
from ..runtime.memory import block_cache
from ..runtime.paramfile import ParamFileError, load_params, save_params
from . import kinds as _kinds  # noqa: F401  (registers every node kind)
from .schema import DTYPES, KINDS, decode_literal, is_ref, refs_in, validate_node

PROGRAM_KEY = "program"


@dataclasses.dataclass
class _Ctx:
    backend: str
    cache: dict  # per-program values built once (prepacked weights), keyed by node
    node: str = ""
    numerics: str = "pyqsim"  # the profile of the quantize and integer nodes (spec §14)
    step: tuple = ()  # the running step of its plan, with the backend and profile: key of the step's op call


class _Ref(str):
    """A decoded argument that names a value."""


def _compiled(v):
    """An argument decoded once for execute: a value reference becomes ``_Ref``, literals their values."""
    if is_ref(v):
        return _Ref(v["@"])
    if isinstance(v, list):
        return [_compiled(x) for x in v]
    return decode_literal(v)


def _resolve(v, env):
    """A compiled argument's value in ``env`` (lists fresh on every call: a kind may keep or change them)."""
    if type(v) is _Ref:
        return env[v]
    if type(v) is list:
        return [_resolve(x, env) for x in v]
    return v


def _spec_error(where: str, msg: str):
    return ParamFileError(f"{where}: {msg}")


def _pow2_product(node):
    """(source node, 2^e) when ``node`` multiplies one node's value by a literal power of two 2^e (or divides it by
    2^-e) and nothing else; (None, None) otherwise."""
    if node["kind"] != "binary":
        return None, None
    attrs = {a: decode_literal(v) for a, v in node.get("attrs", {}).items()}
    args = node.get("args", [])
    if (attrs.get("alpha", 1) != 1 or len(args) != 2 or attrs.get("op") not in ("mul", "div")
            or attrs.get("dtype", "float32") != "float32"):
        return None, None
    refs = [is_ref(a) for a in args]
    if attrs["op"] == "mul" and refs in ([True, False], [False, True]):
        src, lit = (args[0], args[1]) if refs[0] else (args[1], args[0])
    elif attrs["op"] == "div" and refs == [True, False]:
        src, lit = args
    else:
        return None, None
    c = decode_literal(lit)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not np.isfinite(c) or c == 0:
        return None, None
    m, _ = math.frexp(abs(c))
    if m != 0.5 or float(np.float32(c)) != c:
        return None, None
    c = float(c) if attrs["op"] == "mul" else 1.0 / float(c)
    return src["@"], c


def _folded_scale(s: np.ndarray, c: float):
    """fl32(s * c) when fl32(fl32(a * s) * c) == fl32(a * fl32(s * c)) for every int32 a (spec §9.1), else None."""
    s = np.asarray(s, np.float32)
    mag = np.abs(s.astype(np.float64))
    lo, hi = np.minimum(mag, mag * abs(c)), np.maximum(mag, mag * abs(c))
    if s.size == 0 or np.any(lo < 2.0**-126) or np.any(hi * 2.0**31 >= float(np.finfo(np.float32).max)):
        return None
    return (s.astype(np.float64) * c).astype(np.float32)


class Program:
    """An integer program: ``run`` it on NumPy inputs with any backend; no PyTorch needed."""

    def __init__(self, tensors: dict, meta: dict, where: str = "program"):
        prog = meta.get(PROGRAM_KEY)
        if not isinstance(prog, dict):
            raise ParamFileError(f"{where}: no program in the file (written by an older pyqsim? re-export it)")
        self.tensors, self.meta, self.where = tensors, meta, where
        self.inputs = prog.get("inputs")
        self.outputs = prog.get("outputs")
        self.nodes = prog.get("nodes")
        self.info = {k: v for k, v in prog.items() if k not in ("inputs", "outputs", "nodes")}
        self._user_counts = None  # _users(), built on first use
        self._validate()
        self._cache: dict = {}
        self._folds = None  # (out_scale overrides by node, folded node -> its source), built on the first run
        self._steps: dict = {}  # (fold, free, fuse) -> the decoded per-node steps of execute, built on the first run

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        w = self.where
        if not isinstance(self.inputs, list) or not self.inputs:
            raise _spec_error(w, "program inputs must be a non-empty list")
        if not isinstance(self.nodes, list):
            raise _spec_error(w, "program nodes must be a list")
        if not isinstance(self.outputs, list) or not self.outputs:
            raise _spec_error(w, "program outputs must be a non-empty list")
        defined: set = set()
        for i, inp in enumerate(self.inputs):
            if not (isinstance(inp, dict) and isinstance(inp.get("name"), str) and inp.get("dtype") in DTYPES
                    and isinstance(inp.get("shape"), list)
                    and all(s is None or (isinstance(s, int) and s >= 0) for s in inp["shape"])):
                raise _spec_error(w, f"input {i} must have a name, a dtype in {sorted(DTYPES)} and a shape list")
            if inp["name"] in defined:
                raise _spec_error(w, f"input name {inp['name']!r} is used twice")
            defined.add(inp["name"])
        for node in self.nodes:
            validate_node(node, defined, self.tensors, w)
            if node["name"] in defined:
                raise _spec_error(w, f"node {node['name']!r}: the name is defined twice")
            defined.add(node["name"])
        for i, out in enumerate(self.outputs):
            if not (isinstance(out, dict) and isinstance(out.get("name"), str) and is_ref(out.get("value"))):
                raise _spec_error(w, f"output {i} must have a name and a value reference")
            if out["value"]["@"] not in defined:
                raise _spec_error(w, f"output {out['name']!r} refers to {out['value']['@']!r}, which no node defines")
        for key, name in self.info.get("examples", {}).items():
            if name not in self.tensors:
                raise _spec_error(w, f"example input {key!r} refers to missing tensor {name!r}")

    # ------------------------------------------------------------------ files

    @classmethod
    def load(cls, path) -> "Program":
        tensors, meta = load_params(path)
        return cls(tensors, meta, str(path))

    def save(self, path) -> None:
        save_params(path, self.tensors, {k: v for k, v in self.meta.items() if k not in ("format", "version", "tensors")})

    # ------------------------------------------------------------------ execution

    def _bind(self, inputs, named) -> dict:
        names = [i["name"] for i in self.inputs]
        if len(inputs) > len(names):
            raise TypeError(f"the program takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)} positional")
        env = dict(zip(names, inputs))
        for k, v in named.items():
            if k not in names:
                raise TypeError(f"unknown input {k!r}; the program's inputs are {names}")
            if k in env:
                raise TypeError(f"input {k!r} given twice")
            env[k] = v
        for spec in self.inputs:
            n = spec["name"]
            if n not in env:
                if spec.get("default") is not None:
                    env[n] = self.tensors[spec["default"]]
                    continue
                raise TypeError(f"missing input {n!r} (the program's inputs: {names})")
            env[n] = self._check_input(spec, env[n])
        return env

    @staticmethod
    def _check_input(spec, v) -> np.ndarray:
        n, want = spec["name"], np.dtype(DTYPES[spec["dtype"]])
        if hasattr(v, "detach") and hasattr(v, "numpy"):  # a CPU torch tensor
            v = v.detach().cpu().numpy()
        a = np.asarray(v)
        if want.kind == "f":
            if a.dtype.kind not in "fiu":
                raise TypeError(f"input {n!r} must be a float array, got dtype {a.dtype}")
            a = a.astype(np.float32)
        elif want.kind in "iu":
            if a.dtype.kind not in "iu":
                raise TypeError(f"input {n!r} must be an integer array (dtype {want}), got dtype {a.dtype}")
            rng = spec.get("range")
            if rng is not None and a.size and (a.min() < rng[0] or a.max() > rng[1]):
                raise ValueError(f"input {n!r} has values in [{a.min()}, {a.max()}]; the program accepts "
                                 f"[{rng[0]}, {rng[1]}]")
            a = a.astype(want)
        elif want.kind == "b":
            a = a.astype(bool)
        shape = spec["shape"]
        if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            desc = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"input {n!r} must have shape {desc} (* = any size), got {list(a.shape)}")
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            raise ValueError(f"input {n!r} contains NaN or infinite values")
        return np.ascontiguousarray(a)

    def _node_tensors(self, node) -> dict:
        return {k: self.tensors[v] for k, v in node.get("tensors", {}).items() if v is not None}

    def _users(self) -> collections.Counter:
        """Value name -> how many node arguments and program outputs read it (counted once per program)."""
        if self._user_counts is None:
            users = collections.Counter()
            for node in self.nodes:
                for a in node.get("args", []):
                    users.update(refs_in(a))
            users.update(o["value"]["@"] for o in self.outputs)
            self._user_counts = users
        return self._user_counts

    def _code_fusions(self) -> dict:
        """Spec §15.9: quantize / quantize_log node -> (the float stage it reads, that stage's codes argument, the
        identity nodes between them), for a stage (``CODE_STAGES``) followed by identity nodes and the quantize node,
        each the only reader of the value before it."""
        users, fused = self._users(), {}

        def reads(node, name):  # node's first argument is the value name, which nothing else reads
            a = node.get("args") or [None]
            return is_ref(a[0]) and a[0]["@"] == name and users[name] == 1

        def f32(node):  # no cast of its value
            return decode_literal(node.get("attrs", {}).get("dtype", "float32")) == "float32"

        for i, src in enumerate(self.nodes):
            if src["kind"] not in _kinds.CODE_STAGES or not f32(src):
                continue
            j, prev, chain = i + 1, src["name"], []
            while j < len(self.nodes) and self.nodes[j]["kind"] == "identity" and reads(self.nodes[j], prev) and \
                    f32(self.nodes[j]):
                prev = self.nodes[j]["name"]
                chain.append(prev)
                j += 1
            if j == len(self.nodes) or self.nodes[j]["kind"] not in ("quantize", "quantize_log") or \
                    not reads(self.nodes[j], prev):
                continue
            node = self.nodes[j]
            attrs = {a: decode_literal(v) for a, v in node.get("attrs", {}).items()}
            t = self._node_tensors(node)
            if node["kind"] == "quantize":
                codes = {"scale": t["scale"][()], "zero_point": int(t["zero_point"][()]), "bits": attrs.get("bits", 8)}
            else:
                codes = {"delta": t["delta"][()], "bits": attrs["bits"], "mode": attrs["mode"]}
            fused[node["name"]] = (src["name"], codes_spec(codes), tuple(chain))
        return fused

    def _moves(self, fusions: dict) -> dict:
        """quantize node -> the pad / upsample_nearest node it alone reads (float32 in and out): the quantize runs
        first and the move on its codes, 1/4 of the bytes, with a pad value replaced by its code. Exact: both only
        copy values and quantize is elementwise (spec §9.2)."""
        users, by_name, moves = self._users(), {n["name"]: n for n in self.nodes}, {}
        for node in self.nodes:
            a = node.get("args") or [None]
            if node["kind"] != "quantize" or node["name"] in fusions or not is_ref(a[0]):
                continue
            src = by_name.get(a[0]["@"])
            if src is None or src["kind"] not in ("pad", "upsample_nearest") or users[src["name"]] != 1 or \
                    not is_ref((src.get("args") or [None])[0]) or \
                    decode_literal(src.get("attrs", {}).get("dtype", "float32")) != "float32":
                continue
            if any(True for v in src["args"][1:] for _ in refs_in(v)):  # widths, value or size computed in the run
                continue
            args = [decode_literal(v) for v in src["args"]]
            if src["kind"] == "pad":
                value = args[2] if len(args) > 2 else 0
                if min(args[1], default=0) < 0 or isinstance(value, bool) or not isinstance(value, (int, float)) or \
                        not math.isfinite(value):
                    continue
                t = self._node_tensors(node)
                bits = decode_literal(node.get("attrs", {}).get("bits", 8))
                code = ops.quantize(np.array([value], np.float32), t["scale"][()], int(t["zero_point"][()]), "uint8",
                                    bits=bits, backend="reference")
                moves[node["name"]] = (src["name"], int(code[0]))
            else:
                moves[node["name"]] = (src["name"], None)
        return moves

    def _scale_folds(self):
        """Spec §9.1: float32 output stages followed only by a product with 2^e, run as one output stage."""
        if self._folds is not None:
            return self._folds
        users = self._users()
        by_name = {n["name"]: n for n in self.nodes}
        scales, alias = {}, {}
        for node in self.nodes:
            src, c = _pow2_product(node)
            if src is None or users[src] != 1 or src not in by_name:
                continue
            prod = by_name[src]
            attrs = {a: decode_literal(v) for a, v in prod.get("attrs", {}).items()}
            if prod["kind"] not in ("int_gemm", "int_conv2d", "int_bmm") or attrs.get("out", "float32") != "float32":
                continue
            s = self._node_tensors(prod)["out_scale"]
            folded = _folded_scale(s, c)
            if folded is not None:
                scales[src], alias[node["name"]] = folded, src
        self._folds = (scales, alias)
        return self._folds

    def _plan(self, fold: bool, free: bool, fuse: bool = False) -> list:
        """Per node, what execute needs, decoded once: (name, kind, args, attrs, tensors, scope, alias source, output
        dtype, values dead after it); with the §9.1 folds when ``fold``, freeing dead values when ``free``, and a
        float stage computing the codes of the quantize node that alone reads it (§15.9) when ``fuse``."""
        if (fold, free, fuse) not in self._steps:
            last_use = self._last_use() if free else {}
            scales, alias = self._scale_folds() if fold else ({}, {})
            fusions = self._code_fusions() if fuse else {}
            moves = self._moves(fusions) if fuse else {}
            moved = {src for src, _ in moves.values()}
            stage_of = {src: q for q, (src, _, _) in fusions.items()}
            skipped = {n for _, _, chain in fusions.values() for n in chain}
            steps, pending = [], {}
            for i, node in enumerate(self.nodes):
                name = node["name"]
                attrs = {a: decode_literal(v) for a, v in node.get("attrs", {}).items()}
                t = self._node_tensors(node)
                if name in scales:
                    t["out_scale"] = scales[name]
                dt = attrs.get("dtype")
                dead = tuple(last_use.get(i, ()))
                step = (name, KINDS[node["kind"]], [_compiled(a) for a in node.get("args", [])], attrs, t,
                        node.get("scope"), alias.get(name),
                        None if dt is None else DTYPES[dt], dead)
                if name in stage_of or name in skipped or name in moved:  # runs at its quantize node
                    pending[name] = step
                    continue
                if name in moves:  # quantize the move's input, then move the codes (§9.2)
                    src, code = moves[name]
                    m_name, m_kind, m_args, m_attrs, m_t, m_scope, _, _, m_dead = pending.pop(src)
                    pre = f"{name}\0codes"
                    steps.append((pre, step[1], m_args[:1] + step[2][1:]) + step[3:8] + ((),))
                    m_args = [_Ref(pre)] + m_args[1:] + ([] if code is None else [0] * (3 - len(m_args)))
                    if code is not None:
                        m_args[2] = code
                    steps.append((name, m_kind, m_args, {k: v for k, v in m_attrs.items() if k != "dtype"}, m_t,
                                  m_scope, None, None, m_dead + dead + (pre,)))
                    continue
                if name in fusions:
                    src, codes, chain = fusions[name]
                    _, k, args, s_attrs, s_t, scope, _, _, s_dead = pending.pop(src)
                    for n in chain:
                        s_dead += pending.pop(n)[8]
                    step = (name, k, args, dict(s_attrs, **{_kinds.CODES: codes}), s_t, scope, None, step[7],
                            s_dead + dead)
                steps.append(step)
            self._steps[fold, free, fuse] = steps
        return self._steps[fold, free, fuse]

    def execute(self, inputs=(), named=None, backend: str = "auto", keep: bool = False, numerics: str = "pyqsim"):
        """Run every node; returns (outputs list, env of all values when ``keep``). Large arrays come from the block
        cache (``pyqsim.runtime.memory``)."""
        with block_cache():
            return self._execute(inputs, named, backend, keep, numerics)

    def _execute(self, inputs, named, backend, keep, numerics):
        from ..numerics import profile
        profile(numerics)
        env = self._bind(tuple(inputs), named or {})
        ctx = _Ctx(backend, self._cache, numerics=numerics)
        # kept values and recorded op calls are each node's own (no §9.1 fold)
        recording = ops.recording()
        fold = not (keep or recording)
        plan = (fold, not keep, not keep and numerics == "pyqsim")
        for i, (name, k, raw_args, attrs, t, scope, src, dtype, dead) in enumerate(self._plan(*plan)):
            if src is not None:  # spec §9.1: the product is folded into src's output stage
                env[name] = env[src]
            else:
                args = [_resolve(a, env) for a in raw_args]
                ctx.node, ctx.step = name, (plan, i, backend, numerics)
                try:
                    if recording:  # recorded op calls are named by the node's scope
                        with ops.scope(scope or name):
                            y = k.run(args, attrs, t, ctx)
                    else:
                        y = k.run(args, attrs, t, ctx)
                except (ValueError, TypeError, IndexError) as exc:
                    raise type(exc)(f"node {name!r} ({k.name}, from {scope or '?'}): {exc}") from exc
                if dtype is not None and isinstance(y, np.ndarray) and y.dtype != dtype:
                    y = y.astype(dtype)
                env[name] = y
            for d in dead:
                env.pop(d, None)
        outs = [np.ascontiguousarray(env[o["value"]["@"]]) for o in self.outputs]
        return outs, env

    def _last_use(self) -> dict:
        """Node index -> value names not needed after it (frees memory during a run)."""
        last = {}
        for i, node in enumerate(self.nodes):
            for a in node.get("args", []):
                for r in refs_in(a):
                    last[r] = i
        keep = {o["value"]["@"] for o in self.outputs}
        out = collections.defaultdict(list)
        for name, i in last.items():
            if name not in keep:
                out[i].append(name)
        return out

    def run(self, *inputs, backend: str = "auto", numerics: str = "pyqsim", **named_inputs):
        """The model's outputs (NumPy) for NumPy inputs; one array when the model has one output, else a tuple.

        Inputs are positional in the order of ``describe()["inputs"]`` or by name; PyTorch CPU tensors are
        accepted and converted. Integer ops and the float stages of spec §15 run on ``backend``; the rest in NumPy (spec §9).
        ``numerics`` selects the deployment profile (spec §14) of every quantize and integer node: "onnxruntime",
        "fbgemm", "tflite", ...; the split ops exist under "pyqsim" only.
        """
        outs, _ = self.execute(inputs, named_inputs, backend, numerics=numerics)
        return outs[0] if len(outs) == 1 else tuple(outs)

    __call__ = run

    def to_onnx(self, path=None):
        """The program as an ONNX model (opset 17; written to ``path`` when given). Integer nodes become
        MatMulInteger / ConvInteger with exact int32 corrections and the float stages the primitive operators of
        spec §14.7, so ONNX Runtime computes the same bits for them; a node kind without an ONNX form raises
        OnnxExportError naming the node."""
        from .onnx_export import to_onnx
        return to_onnx(self, path)

    # ------------------------------------------------------------------ introspection

    def example_inputs(self) -> dict:
        """The example inputs stored at export, by input name."""
        return {k: self.tensors[v] for k, v in self.info.get("examples", {}).items()}

    def integer_nodes(self) -> list:
        return [n for n in self.nodes if KINDS[n["kind"]].integer and n["kind"] not in ("quantize", "dequantize",
                                                                                         "quantize_log")]

    def describe(self) -> dict:
        """Inputs, outputs, node counts by kind, the integer nodes with their bit widths, and the quantization."""
        counts = collections.Counter(n["kind"] for n in self.nodes)
        layers = []
        for n in self.integer_nodes():
            a = {k: decode_literal(v) for k, v in n.get("attrs", {}).items()}
            entry = {"node": n["name"], "kind": n["kind"], "scope": n.get("scope")}
            for key in ("x_bits", "w_bits", "a_bits", "b_bits", "bits", "v_bits", "w_format", "mode"):
                if key in a:
                    entry[key] = a[key]
            layers.append(entry)
        float_products = [n["name"] for n in self.nodes if n["kind"] in ("matmul", "linear", "conv2d", "sdpa")]
        return {"inputs": self.inputs, "outputs": [o["name"] for o in self.outputs], "nodes": len(self.nodes),
                "kinds": dict(sorted(counts.items())), "integer_nodes": layers, "float_products": float_products,
                "quant": self.info.get("quant", {}), "source": self.info.get("source", {})}


def load(path) -> Program:
    """The program stored in ``path`` (validated whole; ParamFileError on any defect)."""
    return Program.load(path)
