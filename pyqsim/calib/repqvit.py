"""RepQ-ViT post-training quantization (Li et al., ICCV 2023) for any PyTorch model with the
LayerNorm -> Linear and softmax-attention patterns, found on its torch.export (ATen) graph.

- weights: asymmetric uniform, per output channel; activations: asymmetric uniform, per tensor;
  every quantizer calibrated once on a small calibration batch by a percentile clipping search (MSE);
- post-LayerNorm activations: per-channel during calibration, then scale reparameterization into one
  per-tensor quantizer by folding r1 = s / mean(s) and r2 = z - round(mean(z)) into the LayerNorm affine
  and the following Linear layers, whose weights are then re-calibrated;
- post-softmax attention: log-sqrt2 during calibration, executed in the shift-based log2 form
  (spec §7) whose fake-quant twin decodes odd codes with the fixed-point sqrt(2);
- patch-embedding (conv) inputs at 8 bits.

Numerics follow docs/spec.md §2-§3 so the fake-quant graph and its lowered integer program agree.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from .. import ops
from ._common import PERCENTILES, WEIGHT_SHRINK, LogQuantizer, UniformQuantizer
from .lower import LoweringError, Val, _fetch_attr, _op_name, capture, lower, module_path, quant_scale_zp

POST_LN_MODES = ("layer", "channel", "reparam")
SOFTMAX_MODES = ("log2", "log-sqrt2", "reparam", "uniform")


class PatternError(ValueError):
    """The model lacks a pattern RepQ-ViT needs (named in the message)."""


@dataclasses.dataclass(frozen=True)
class RepQConfig:
    """Bit widths and the quantizer choices of the paper's ablation.

    post_ln: "layer" (per-tensor), "channel" (per-channel; not executable by an integer GEMM) or
    "reparam" (per-channel calibration folded into per-tensor). softmax: "log2", "log-sqrt2" (float
    sqrt(2)), "reparam" (log-sqrt2 executed as shift-based log2) or "uniform" (a_bits uniform codes, attn @ v
    as an ``int_bmm``: the form ONNX export takes).
    """

    w_bits: int = 4
    a_bits: int = 4
    post_ln: str = "reparam"
    softmax: str = "reparam"
    input_bits: int = 8
    percentiles: tuple = PERCENTILES
    weight_shrink: tuple = WEIGHT_SHRINK  # extra MSE candidates for weights; () = the paper code's search
    require_patterns: bool = True  # False: a model without attention or LayerNorm -> Linear (a CNN) is accepted

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "input_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise ValueError(f"{name} must be in [2, 8], got {getattr(self, name)}")
        if self.post_ln not in POST_LN_MODES:
            raise ValueError(f"post_ln must be one of {POST_LN_MODES}, got {self.post_ln!r}")
        if self.softmax not in SOFTMAX_MODES:
            raise ValueError(f"softmax must be one of {SOFTMAX_MODES}, got {self.softmax!r}")


# --------------------------------------------------------------------------- scale reparameterization


def reparam_factors(scale, zero_point, round_scale=lambda v: v):
    """(s_mean, z_mean, r1, r2) of the paper with the mean zero point rounded first.

    r1 = s / s_mean and r2 = z - z_mean (integers), so that per-tensor codes of the folded activations
    equal the per-channel codes. ``round_scale`` maps the mean to the stored per-tensor scale (e.g. fp32).
    Works on any array type with +, -, /, mean (torch, numpy, numpy object arrays of Fractions).
    """
    s_mean = round_scale(scale.sum() / len(scale))
    z_mean = zero_point.sum() / len(zero_point)
    z_mean = z_mean.round() if hasattr(z_mean, "round") else round(z_mean)  # half to even
    return s_mean, z_mean, scale / s_mean, zero_point - z_mean


def fold_layernorm(gamma, beta, scale, r1, r2):
    """LayerNorm affine whose output is (X + s*r2) / r1: gamma' = gamma/r1, beta' = (beta + s*r2)/r1."""
    return gamma / r1, (beta + scale * r2) / r1


def fold_linear(weight, bias, scale, r1, r2):
    """Next-layer Linear undoing the fold: W' = W * r1 (per input column), b' = b - W @ (s*r2)."""
    return weight * r1[None, :], bias - weight @ (scale * r2)


# --------------------------------------------------------------------------- fake-quant modules


class QAct(nn.Module):
    """Activation quantizer node placed on a LayerNorm output (post-LN activations)."""

    def __init__(self, quant: UniformQuantizer):
        super().__init__()
        self.quant = quant

    def forward(self, x):
        return self.quant(x)

    def lower(self, lw, node):
        return lw.quantize(lw.env[node.args[0]], self.quant, node.target)


class _QWeighted(nn.Module):
    """Shared part of QLinear / QConv2d: per-output-channel weights, optional own input quantizer."""

    def __init__(self, module, cfg: RepQConfig, in_bits: int | None):
        super().__init__()
        self.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        bias = module.bias.detach().clone() if module.bias is not None else torch.zeros(module.weight.shape[0])
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.w_quant = UniformQuantizer(cfg.w_bits, axis=0, percentiles=cfg.percentiles, shrink=cfg.weight_shrink)
        self.in_quant = UniformQuantizer(in_bits, percentiles=cfg.percentiles) if in_bits else None
        self._act_source = []  # the upstream QAct's quantizer when the input arrives quantized

    def input_quantizer(self) -> UniformQuantizer | None:
        if self.in_quant is not None:
            return self.in_quant
        return self._act_source[0] if self._act_source else None

    def fake_weight_bias(self):
        """Fake-quantized weight and bias; the bias is rounded to int32 at scale fl32(s_x * s_w) once the
        input scale is per tensor (as exported)."""
        w, b = self.w_quant(self.weight), self.bias
        qi = self.input_quantizer()
        if qi is not None and qi.enabled and qi.initialized and qi.scale.dim() == 0 and self.w_quant.enabled:
            step = (qi.scale.double() * self.w_quant.scale.double()).float()
            b = torch.round(b.double() / step.double()).float() * step
        return w, b

    def _quant_input_and_bias(self, x):
        if self.in_quant is not None:
            x = self.in_quant(x)
        return (x, *self.fake_weight_bias())


class QLinear(_QWeighted):
    def __init__(self, linear: nn.Linear, cfg: RepQConfig, quant_input: bool):
        super().__init__(linear, cfg, cfg.a_bits if quant_input else None)

    def forward(self, x):
        x, w, b = self._quant_input_and_bias(x)
        return F.linear(x, w, b)

    def lower(self, lw, node):
        q = self.input_quantizer()
        xc = lw.quantize(lw.env[node.args[0]], q, f"{node.target}.in")
        t, attrs = _weight_tensors(lw, node.target, self, q)
        return Val(lw.emit("int_gemm", [xc.ref], attrs, t, base=node.target))


class QConv2d(_QWeighted):
    """Convolution (the patch embedding) with ``input_bits`` inputs."""

    def __init__(self, conv: nn.Conv2d, cfg: RepQConfig):
        super().__init__(conv, cfg, cfg.input_bits)
        self.conv_args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
        if conv.padding_mode != "zeros":
            raise PatternError(f"conv padding_mode {conv.padding_mode!r} is not supported (zeros only)")

    def forward(self, x):
        x, w, b = self._quant_input_and_bias(x)
        return F.conv2d(x, w, b, **self.conv_args)

    def lower(self, lw, node):
        q = self.input_quantizer()
        xc = lw.quantize(lw.env[node.args[0]], q, f"{node.target}.in")
        t, attrs = _weight_tensors(lw, node.target, self, q)
        c = self.conv_args
        attrs.update(stride=list(c["stride"]), padding=list(c["padding"]), dilation=list(c["dilation"]),
                     groups=int(c["groups"]), kernel_size=list(self.weight.shape[2:]))
        return Val(lw.emit("int_conv2d", [xc.ref], attrs, t, base=node.target))


class QMatMul(nn.Module):
    """q @ k^T with both operands quantized per tensor."""

    def __init__(self, cfg: RepQConfig):
        super().__init__()
        self.a_quant = UniformQuantizer(cfg.a_bits, percentiles=cfg.percentiles)
        self.b_quant = UniformQuantizer(cfg.a_bits, percentiles=cfg.percentiles)

    def forward(self, a, b):
        return self.a_quant(a) @ self.b_quant(b)

    def lower_values(self, lw, a, b, base: str, b_transposed: bool = True):
        """int_bmm of a [..., M, K] and b ([..., K, N] when ``b_transposed``, else [..., N, K]); float32 out."""
        ac, bc = lw.quantize(a, self.a_quant, f"{base}.a"), lw.quantize(b, self.b_quant, f"{base}.b")
        bref = lw.emit("transpose", [bc.ref, -2, -1], base=f"{base}.bt") if b_transposed else bc.ref
        (sa, za), (sb, zb) = quant_scale_zp(self.a_quant), quant_scale_zp(self.b_quant)
        out = lw.tensor(f"{base}.out_scale", np.array(np.float32(sa) * np.float32(sb), np.float32))
        return lw.emit("int_bmm", [ac.ref, bref], {"a_zero_point": za, "b_zero_point": zb, "a_bits": self.a_quant.bits,
                                                  "b_bits": self.b_quant.bits}, {"out_scale": out}, base=base)

    def lower(self, lw, node):
        return self.lower_values(lw, lw.env[node.args[0]], lw.env[node.args[1]], node.target)


class QAttnV(nn.Module):
    """attn @ v with a log2 / log-sqrt2 attention quantizer and a per-tensor v quantizer."""

    def __init__(self, cfg: RepQConfig):
        super().__init__()
        mode = "log2" if cfg.softmax == "log2" else "sqrt2"
        self.p_quant = LogQuantizer(cfg.a_bits, mode, shift_form=cfg.softmax == "reparam", percentiles=cfg.percentiles)
        self.v_quant = UniformQuantizer(cfg.a_bits, percentiles=cfg.percentiles)

    def forward(self, attn, v):
        return self.p_quant(attn) @ self.v_quant(v)

    def lower_values(self, lw, p, v, base: str):
        """log2_attn_matmul of post-softmax p [..., L, S] and v [..., S, d]; float32 out (spec §7)."""
        pq = self.p_quant
        if pq.mode == "sqrt2" and not pq.shift_form:
            raise LoweringError(f"{base}: softmax='log-sqrt2' (float sqrt(2) weights) has no shift-based integer "
                                "form; calibrate with softmax='reparam' or 'log2'")
        delta = np.float32(pq.delta)
        codes = lw.emit("quantize_log", [lw.float_ref(p)], {"bits": pq.bits, "mode": pq.mode},
                        {"delta": lw.tensor(f"{base}.delta", np.array(delta, np.float32))}, base=f"{base}.p")
        vc = lw.quantize(v, self.v_quant, f"{base}.v")
        sv, zv = quant_scale_zp(self.v_quant)
        out = np.float32(np.float64(delta) * np.float64(np.float32(sv)) * 2.0 ** -(FRAC_BITS + _LOG_P))
        return lw.emit("log2_attn_matmul", [codes, vc.ref],
                       {"bits": pq.bits, "mode": pq.mode, "frac_bits": FRAC_BITS, "v_zero_point": zv,
                        "v_bits": self.v_quant.bits},
                       {"out_scale": lw.tensor(f"{base}.out_scale", np.array(out, np.float32))}, base=base)

    def lower(self, lw, node):
        return self.lower_values(lw, lw.env[node.args[0]], lw.env[node.args[1]], node.target)


def attn_v(cfg: RepQConfig) -> nn.Module:
    """The attn @ v module of a softmax mode: "uniform" quantizes both operands per tensor (an int_bmm)."""
    return QMatMul(cfg) if cfg.softmax == "uniform" else QAttnV(cfg)


def _additive_mask(mask, like):
    """Float additive form of a scaled_dot_product_attention mask (bool: True takes part in attention)."""
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=like.dtype).masked_fill(~mask, float("-inf"))
    return mask.to(like.dtype)


class QSDPA(nn.Module):
    """F.scaled_dot_product_attention made explicit with quantized matmuls."""

    def __init__(self, cfg: RepQConfig):
        super().__init__()
        self.matmul_qk = QMatMul(cfg)
        self.matmul_av = attn_v(cfg)

    def forward(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa:
            raise PatternError("scaled_dot_product_attention with enable_gqa=True is not supported")
        s = self.matmul_qk(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:
            n, m = s.shape[-2], s.shape[-1]
            s = s.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
        if attn_mask is not None:
            s = s + _additive_mask(attn_mask, s)
        return self.matmul_av(s.softmax(dim=-1), v)

    def lower(self, lw, node):
        from ..program.schema import encode_float

        a = list(node.args) + [None] * 4
        kw = node.kwargs
        q, k, v = (lw.env[x] for x in a[:3])
        mask = kw.get("attn_mask", a[3])
        base = node.target
        s = self.matmul_qk.lower_values(lw, q, k, f"{base}.qk", b_transposed=False)
        scale = kw.get("scale")
        if scale is None:
            scale = lw.values[node.args[0]].shape[-1] ** -0.5
        s = lw.emit("binary", [s, float(scale)], {"op": "mul"}, base=f"{base}.scaled", dtype="float32")
        inf = encode_float(float("-inf"))
        if kw.get("is_causal", False):
            rows = lw.emit("arange", [lw.emit("size", [lw.arg(node.args[0]), -2])])
            cols = lw.emit("arange", [lw.emit("size", [lw.arg(node.args[1]), -2])])
            above = lw.emit("binary", [lw.emit("unsqueeze", [cols, 0]), lw.emit("unsqueeze", [rows, 1])], {"op": "gt"})
            s = lw.emit("binary", [s, lw.emit("where", [above, inf, 0.0], dtype="float32")], {"op": "add"},
                        dtype="float32")
        if mask is not None:
            m = lw.arg(mask)
            if lw.values[mask].dtype == torch.bool:
                m = lw.emit("where", [m, 0.0, inf], base=f"{base}.mask", dtype="float32")
            s = lw.emit("binary", [s, m], {"op": "add"}, base=f"{base}.masked", dtype="float32")
        p = lw.emit("softmax", [s, -1], base=f"{base}.softmax", dtype="float32")
        return self.matmul_av.lower_values(lw, Val(p), v, f"{base}.av")


# --------------------------------------------------------------------------- pattern detection on the ATen graph

_MATMUL_OPS = ("matmul", "bmm")
_SOFTMAX_OPS = ("softmax", "_softmax", "_safe_softmax")
_SCORE_OPS = ("mul", "div", "add", "sub", "masked_fill", "where", "to", "_to_copy", "type_as")
_IDENTITY_OPS = ("contiguous", "clone", "alias", "detach", "dropout", "to", "_to_copy", "type_as", "lift_fresh_copy")
_META_OPS = ("sym_size", "sym_numel", "sym_stride")


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is(node, *names) -> bool:
    return node.op == "call_function" and _op_name(node.target) in names


def _ndim(node) -> int | None:
    v = node.meta.get("val")
    return v.dim() if torch.is_tensor(v) else None


def _is_identity(gm, node) -> bool:
    """Ops that pass values through unchanged in eval mode (dropout, clone, dtype/layout no-ops)."""
    return _is(node, *_IDENTITY_OPS)


def _keeps_last_dim(gm, node, src) -> bool:
    """Channel-preserving selections between a LayerNorm and a Linear (e.g. the class token x[:, 0])."""
    if _is_identity(gm, node):
        return True
    nd = _ndim(src)
    if nd is None or node.args[0] is not src:
        return False
    if _is(node, "select", "slice"):
        dim = node.args[1] if len(node.args) > 1 else 0
        return dim % nd != nd - 1
    return False


@dataclasses.dataclass
class PostLNGroup:
    """A LayerNorm whose output (possibly through channel-preserving selections) feeds Linear layers."""

    ln: str
    act: str
    linears: list
    shared: bool  # the LayerNorm output also feeds non-Linear consumers (post-LN models: the residual)


@dataclasses.dataclass
class AttentionSite:
    """Names of the quantized q@k^T and attn@v modules of one attention."""

    qk: str
    av: str


def _ln_paths(gm, ln_node):
    """(paths to Linear consumers, other consumers) of a LayerNorm output."""
    paths, others = [], []

    def walk(node, path):
        for user in node.users:
            if isinstance(_module(gm, user), QLinear) and user.args[0] is node:
                paths.append(path + [user])
            elif _is(user, *_META_OPS):
                continue
            elif _keeps_last_dim(gm, user, node):
                walk(user, path + [user])
            else:
                others.append(user)

    walk(ln_node, [ln_node])
    return paths, others


def _score_matmul(gm, node):
    """The matmul producing attention scores, walking back from a softmax input."""
    found, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if _is(n, *_MATMUL_OPS):
            found.append(n)
        elif _is(n, *_SCORE_OPS) or _is_identity(gm, n):
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
    return found


def _value_matmuls(gm, node):
    """Matmuls consuming a softmax output as their left operand (through dropout/identity)."""
    out = []
    for user in node.users:
        if _is(user, *_MATMUL_OPS) and user.args[0] is node:
            out.append(user)
        elif _is_identity(gm, user):
            out.extend(_value_matmuls(gm, user))
    return out


def _unique(gm, name: str) -> str:
    base, i = name, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        name, i = f"{base}_{i}", i + 1


def trace(model: nn.Module, args: tuple, kwargs: dict | None = None) -> fx.GraphModule:
    """The ATen graph of ``model`` on example inputs (torch.export), batch and sequence kept symbolic."""
    try:
        return capture(model, args, kwargs)
    except LoweringError as exc:
        raise PatternError(f"{exc}; RepQ-ViT needs a model that torch.export can capture") from exc


def _find_attention(gm, model_name: str):
    """(qk matmul, av matmul) pairs around softmax(dim=-1) nodes, and scaled_dot_product_attention nodes."""
    sites, softmaxes = [], []
    for sm in gm.graph.nodes:
        if not _is(sm, *_SOFTMAX_OPS):
            continue
        softmaxes.append(sm.name)
        dim = sm.args[1]
        if dim not in (-1, (_ndim(sm) or 0) - 1):
            continue
        qk, av = _score_matmul(gm, sm.args[0]), _value_matmuls(gm, sm)
        if len(qk) == 1 and len(av) == 1:
            sites.append((qk[0], av[0]))
    sdpa = [n for n in gm.graph.nodes if _is(n, "scaled_dot_product_attention")]
    if not sites and not sdpa:
        raise PatternError(
            f"no softmax attention pattern in {model_name}: expected matmul(q, k^T) -> [scale/mask] -> "
            "softmax(dim=-1) -> matmul(attn, v) or scaled_dot_product_attention"
            + (f"; softmax nodes found but not in that pattern: {softmaxes}" if softmaxes else "; no softmax found"))
    return sites, sdpa


def _find_post_ln(gm, model_name: str):
    """(LayerNorm node, paths to its Linear consumers, has other consumers) for every LayerNorm -> Linear."""
    groups = []
    for node in gm.graph.nodes:
        if _is(node, "layer_norm") and len(node.args[1]) == 1:
            paths, others = _ln_paths(gm, node)
            if paths:
                groups.append((node, paths, bool(others)))
    if not groups:
        lns = [module_path(n) or n.name for n in gm.graph.nodes if _is(n, "layer_norm")]
        raise PatternError(
            f"no LayerNorm -> Linear pattern in {model_name}: post-LayerNorm activations must feed "
            f"Linear layers (directly or through channel-preserving selections); LayerNorms found: {lns}")
    return groups


def _layernorm_module(gm, ln_node) -> nn.LayerNorm:
    """An affine nn.LayerNorm equal to an aten.layer_norm node (weights copied; ones/zeros when absent)."""
    a = list(ln_node.args) + [None] * 5
    shape, w, b, eps = a[1], a[2], a[3], a[4] if a[4] is not None else 1e-5
    ln = nn.LayerNorm(shape, eps=eps)
    with torch.no_grad():
        if w is not None:
            ln.weight.copy_(_fetch_attr(gm, w.target) if w.op == "get_attr" else ln.weight)
        if b is not None:
            ln.bias.copy_(_fetch_attr(gm, b.target) if b.op == "get_attr" else ln.bias)
    return ln


def _insert_post_ln_quantizer(gm, cfg: RepQConfig, ln_node, paths, shared: bool) -> PostLNGroup:
    """Quantize a LayerNorm output feeding Linears (QAct node); the LayerNorm becomes an affine module to fold
    into, duplicated for the Linear branch when its output also feeds other consumers."""
    graph = gm.graph
    affine = _layernorm_module(gm, ln_node)
    act = QAct(UniformQuantizer(cfg.a_bits, axis=None if cfg.post_ln == "layer" else -1, percentiles=cfg.percentiles))
    scope = module_path(ln_node) or ln_node.name
    ln_name = _unique(gm, f"{scope}_rq" if shared else scope)
    act_name = _unique(gm, f"{scope}_act")
    gm.add_submodule(ln_name, affine)
    gm.add_submodule(act_name, act)
    with graph.inserting_after(ln_node):
        src = graph.call_module(ln_name, (ln_node.args[0],))
    with graph.inserting_after(src):
        act_node = graph.call_module(act_name, (src,))
    if shared:
        mapping = {ln_node: act_node}
        for path in paths:  # copy the selections between the LayerNorm and each Linear onto the new branch
            for n in path[1:-1]:
                if n not in mapping:
                    with graph.inserting_after(mapping[n.args[0]] if n.args[0] in mapping else act_node):
                        mapping[n] = graph.node_copy(n, lambda a: mapping.get(a, a))
            path[-1].replace_input_with(path[-2], mapping[path[-2]])
    else:
        ln_node.replace_all_uses_with(act_node, delete_user_cb=lambda u: u is not src)
        graph.erase_node(ln_node)
    linears = list(dict.fromkeys(path[-1].target for path in paths))
    for name in linears:
        lin = gm.get_submodule(name)
        lin.in_quant = None
        lin._act_source.append(act.quant)
    return PostLNGroup(ln_name, act_name, linears, shared)


def _replace_with_module(gm, node, name: str, module: nn.Module, args, kwargs=None):
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, tuple(args), kwargs or {})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _weight_module(gm, node):
    """nn.Linear / nn.Conv2d equal to an aten.linear / aten.conv2d node with parameter weights, else None."""
    a = list(node.args) + [None] * 8
    w, b = a[1], a[2]
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or (b is not None and not (isinstance(b, fx.Node)
                                                                                       and b.op == "get_attr")):
        return None
    wt = _fetch_attr(gm, w.target).detach()
    bt = _fetch_attr(gm, b.target).detach() if b is not None else None
    if _is(node, "linear"):
        mod = nn.Linear(wt.shape[1], wt.shape[0], bias=bt is not None)
    elif _is(node, "conv2d") and wt.dim() == 4:
        if isinstance(a[4], str):
            return None
        mod = nn.Conv2d(wt.shape[1] * (a[6] or 1), wt.shape[0], tuple(wt.shape[2:]), stride=a[3] or 1,
                        padding=a[4] or 0, dilation=a[5] or 1, groups=a[6] or 1, bias=bt is not None)
    else:
        return None
    with torch.no_grad():
        mod.weight.copy_(wt)
        if bt is not None:
            mod.bias.copy_(bt)
    return mod


def _find_patterns(find, gm, name: str, cfg: RepQConfig, none):
    """``find(gm, name)``, or ``none`` when the pattern is absent and ``cfg.require_patterns`` is False."""
    try:
        return find(gm, name)
    except PatternError:
        if cfg.require_patterns:
            raise
        return none


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold each inference batch_norm that is the only user of a conv2d with parameter weights into that
    conv's weight and bias (float64 arithmetic, stored as fp32), so the integer conv computes conv + BN.
    Returns the number folded; other batch_norm nodes stay and lower to the float ``batch_norm`` kind."""
    folded = 0
    for bn in list(gm.graph.nodes):
        if not _is(bn, "batch_norm") or bn.args[5]:
            continue
        conv = bn.args[0]
        stats = bn.args[1:5]
        if not (isinstance(conv, fx.Node) and _is(conv, "conv2d") and len(conv.users) == 1
                and all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr") for a in stats)
                and stats[2] is not None and stats[3] is not None):
            continue
        a = list(conv.args) + [None] * (7 - len(conv.args))
        w, b = a[1], a[2]
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or not (b is None or (isinstance(b, fx.Node)
                                                                                  and b.op == "get_attr")):
            continue
        gamma, beta, mean, var = (None if x is None else _fetch_attr(gm, x.target).detach().double() for x in stats)
        wt = _fetch_attr(gm, w.target).detach().double()
        scale = (gamma if gamma is not None else 1.0) / torch.sqrt(var + float(bn.args[7]))
        bias = (_fetch_attr(gm, b.target).detach().double() if b is not None else torch.zeros_like(mean))
        holder = nn.Module()
        holder.weight = nn.Parameter((wt * scale.reshape(-1, 1, 1, 1)).float(), requires_grad=False)
        holder.bias = nn.Parameter(((bias - mean) * scale + (beta if beta is not None else 0.0)).float(),
                                   requires_grad=False)
        base = _unique(gm, w.target.rsplit(".", 1)[0] + "_bn" if "." in w.target else f"{w.target}_bn")
        gm.add_submodule(base, holder)
        with gm.graph.inserting_before(conv):
            wn, bnode = gm.graph.get_attr(f"{base}.weight"), gm.graph.get_attr(f"{base}.bias")
        conv.args = (a[0], wn, bnode, *a[3:])
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded


def build(model: nn.Module, cfg: RepQConfig, args: tuple, kwargs: dict | None = None):
    """Fake-quant GraphModule of ``model`` (uncalibrated), its post-LN groups and attention sites.

    Raises PatternError naming the missing pattern when the model has no LayerNorm -> Linear or no
    softmax attention.
    """
    gm = trace(model, args, kwargs)
    name = type(model).__name__
    fold_batchnorm(gm)
    sites, sdpa = _find_patterns(_find_attention, gm, name, cfg, ([], []))
    for node in list(gm.graph.nodes):
        if not _is(node, "linear", "conv2d"):
            continue
        mod = _weight_module(gm, node)
        if mod is None:
            continue
        scope = node.args[1].target.rsplit(".", 1)[0] if node.args[1].target.endswith("weight") else node.name
        qmod = QLinear(mod, cfg, quant_input=True) if isinstance(mod, nn.Linear) else QConv2d(mod, cfg)
        _replace_with_module(gm, node, _unique(gm, scope + "_q"), qmod, (node.args[0],))
    groups = _find_patterns(_find_post_ln, gm, name, cfg, [])
    post_ln = [_insert_post_ln_quantizer(gm, cfg, *g) for g in groups]
    attention = []
    for qk, av in sites:
        scope = module_path(qk)
        names = [_unique(gm, f"{scope}.{suffix}" if scope else suffix) for suffix in ("matmul_qk", "matmul_av")]
        _replace_with_module(gm, qk, names[0], QMatMul(cfg), qk.args[:2])
        _replace_with_module(gm, av, names[1], attn_v(cfg), av.args[:2])
        attention.append(AttentionSite(*names))
    for node in sdpa:
        scope = module_path(node)
        sdpa_name = _unique(gm, f"{scope}.sdpa" if scope else "sdpa")
        _replace_with_module(gm, node, sdpa_name, QSDPA(cfg), node.args, node.kwargs)
        attention.append(AttentionSite(f"{sdpa_name}.matmul_qk", f"{sdpa_name}.matmul_av"))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, post_ln, attention


# --------------------------------------------------------------------------- calibration


def _as_call(calib):
    """(args, kwargs) of a calibration batch: a tensor, a tuple of tensors, or a dict of keyword tensors."""
    if torch.is_tensor(calib):
        return (calib,), {}
    if isinstance(calib, (tuple, list)) and calib and all(torch.is_tensor(c) for c in calib):
        return tuple(calib), {}
    if isinstance(calib, dict) and calib and all(isinstance(k, str) and torch.is_tensor(v) for k, v in calib.items()):
        return (), dict(calib)
    raise TypeError("calib must be a torch.Tensor, a tuple of tensors, or a dict of keyword tensors (what the model "
                    f"takes), got {type(calib).__name__}")


def _first(args, kwargs, n):
    return tuple(a[:n] for a in args), {k: v[:n] for k, v in kwargs.items()}


@dataclasses.dataclass
class RepQViT:
    """A calibrated fake-quant model (callable like the original) and what was found in it."""

    model: fx.GraphModule
    config: RepQConfig
    post_ln: list
    attention: list
    seconds: float
    source_config: dict | None = None
    example: tuple = ((), {})
    input_ranges: dict | None = None

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def quantizers(self):
        return [m for m in self.model.modules() if isinstance(m, (UniformQuantizer, LogQuantizer))]

    def lower(self):
        """The integer program of this model (pyqsim.program.Program)."""
        if self.config.post_ln == "channel" or self.config.softmax == "log-sqrt2":
            raise ValueError(f"post_ln={self.config.post_ln!r} / softmax={self.config.softmax!r} has no integer form: "
                             "per-channel activation scales do not factor out of a GEMM, float sqrt(2) weights are "
                             "not shifts")
        quant = {"method": "repq-vit", **{k: v for k, v in dataclasses.asdict(self.config).items()
                                         if k in ("w_bits", "a_bits", "post_ln", "softmax", "input_bits")}}
        return lower(self.model, *self.example, quant=quant, source=self.source_config or {},
                     input_ranges=self.input_ranges)

    def export(self, path):
        """Write the integer program to ``path``; returns it."""
        prog = self.lower()
        prog.save(path)
        return prog


def reparameterize(gm: fx.GraphModule, groups) -> None:
    """Fold per-channel post-LN quantizers into per-tensor ones (float64 arithmetic, stored as fp32)."""
    for g in groups:
        quant = gm.get_submodule(g.act).quant
        ln = gm.get_submodule(g.ln)
        s, z = quant.scale.double(), quant.zero_point.double()
        s_mean, z_mean, r1, r2 = reparam_factors(s, z, round_scale=lambda v: v.float().double())
        gamma, beta = fold_layernorm(ln.weight.detach().double(), ln.bias.detach().double(), s, r1, r2)
        with torch.no_grad():
            ln.weight.copy_(gamma.float())
            ln.bias.copy_(beta.float())
            for name in g.linears:
                lin = gm.get_submodule(name)
                w, b = fold_linear(lin.weight.double(), lin.bias.double(), s, r1, r2)
                lin.weight.copy_(w.float())
                lin.bias.copy_(b.float())
                lin.w_quant.calibrate(lin.weight)
        quant.set_params(s_mean.float(), z_mean.float(), axis=None)


@torch.no_grad()
def calibrate(model: nn.Module, calib, cfg: RepQConfig = RepQConfig()) -> RepQViT:
    """RepQ-ViT: capture the model, insert fake-quant nodes, calibrate every quantizer on ``calib`` in one pass,
    reparameterize. ``calib``: a tensor, a tuple of tensors or a dict of keyword tensors, batched on dim 0."""
    args, kwargs = _as_call(calib)
    lead = [len(t) for t in list(args) + list(kwargs.values()) if t.dim() > 0]
    if not lead or min(lead) == 0:
        raise ValueError("calib is empty: RepQ-ViT needs at least one calibration input")
    for t in list(args) + list(kwargs.values()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError("calib contains NaN or infinite values")
    t0 = time.perf_counter()
    ex_args, ex_kwargs = _first(args, kwargs, min(2, min(lead)))
    try:
        with torch.no_grad():
            model.eval()(*ex_args, **ex_kwargs)
    except Exception as exc:  # noqa: BLE001 - the model cannot run on the given inputs
        shapes = [tuple(t.shape) for t in list(args) + list(kwargs.values())]
        raise ValueError(f"calib: the model does not run on inputs of shapes {shapes} "
                         f"({type(exc).__name__}: {exc})") from exc
    gm, post_ln, attention = build(model, cfg, ex_args, ex_kwargs)
    quants = [(n, m) for n, m in gm.named_modules() if isinstance(m, (UniformQuantizer, LogQuantizer))]
    for name, q in quants:
        q.name, q.calibrating = name, True
    quants = [q for _, q in quants]
    gm(*args, **kwargs)
    for q in quants:
        q.calibrating = False
    if cfg.post_ln == "reparam":
        reparameterize(gm, post_ln)
    src = dataclasses.asdict(model.cfg) if dataclasses.is_dataclass(getattr(model, "cfg", None)) else {}
    src = {"model": type(model).__name__, **src}
    # integer inputs get no range from the calibration set: token ids are checked by their embedding node
    return RepQViT(gm, cfg, post_ln, attention, time.perf_counter() - t0, src, (ex_args, ex_kwargs))


def calibration_batch(x: torch.Tensor, n: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` images drawn without replacement with a fixed seed."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx]


def time_deit_small(n_images: int = 32, cfg: RepQConfig = RepQConfig(), threads: int | None = None) -> dict:
    """Calibrate a random-weight DeiT-S on ``n_images`` random 224x224 images; wall and CPU seconds.

    The 1-minute load average is reported too: on a shared machine it inflates the wall time.
    """
    from ..models.vit import deit_small

    if threads:
        torch.set_num_threads(threads)
    model = deit_small().eval()
    model.reset_parameters(0)
    x = torch.randn(n_images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    load, cpu0 = os.getloadavg()[0], time.process_time()
    res = calibrate(model, x, cfg)
    return {"model": "deit_small", "images": n_images, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
            "threads": torch.get_num_threads(), "calibration_seconds": round(res.seconds, 2),
            "cpu_seconds": round(time.process_time() - cpu0, 2), "load_average_before": load}



# --------------------------------------------------------------------------- integer form of the quantized layers

FRAC_BITS = 16
_LOG_P = 16  # the E * 2^16 scaling of spec §7


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy(), dtype=dtype)


def _weight_codes(codes: np.ndarray, zero_point: np.ndarray, bits: int):
    """(stored weight, zero points, w_format) of unsigned per-channel codes [N, ...]."""
    if bits <= 4:
        return ops.pack_int4(codes.reshape(len(codes), -1).astype(np.uint8), signed=False), zero_point, "uint4"
    if bits == 8:
        return (codes.astype(np.int16) - 128).astype(np.int8), zero_point - 128, "int8"
    return codes.astype(np.int8), zero_point, "int8"


def _weight_tensors(lw, base: str, layer, x_quant) -> tuple[dict, dict]:
    """(tensor slots, attributes) of an int_gemm/int_conv2d node for a QLinear/QConv2d with input quantizer
    ``x_quant``: weight codes, zero points, int32 bias at scale fl32(s_x * s_w) and that float32 out_scale."""
    wq = layer.w_quant
    s_w = _np(wq.scale, np.float32)
    codes = _np(wq.codes(layer.weight), np.float64).astype(np.int64)
    zw = _np(wq.zero_point, np.float64).astype(np.int32)
    s_x, z_x = quant_scale_zp(x_quant)
    step = (np.float64(np.float32(s_x)) * s_w.astype(np.float64)).astype(np.float32)  # fl32(s_x * s_w), as QLinear
    bias = np.rint(_np(layer.bias, np.float64) / step.astype(np.float64))
    if np.abs(bias).max(initial=0) >= 2**31:
        raise LoweringError(f"{base}: the int32 bias is out of range (the bias is too large for its scale)")
    stored, zw, fmt = _weight_codes(codes, zw, wq.bits)
    t = {"weight": lw.tensor(f"{base}.weight", stored), "w_zero_point": lw.tensor(f"{base}.w_zero_point", zw.astype(np.int32)),
         "bias": lw.tensor(f"{base}.bias", bias.astype(np.int32)), "out_scale": lw.tensor(f"{base}.out_scale", step)}
    return t, {"x_zero_point": z_x, "w_format": fmt, "x_bits": int(x_quant.bits), "w_bits": int(wq.bits)}


def export(res: RepQViT, path):
    """Write the integer program of a calibrated model to ``path`` (pyqsim.load runs it); returns the program."""
    return res.export(path)
