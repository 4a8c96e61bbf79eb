"""RepQ-ViT post-training quantization (Li et al., ICCV 2023) for any PyTorch model with the
LayerNorm -> Linear and softmax-attention patterns, found by torch.fx tracing.

- weights: asymmetric uniform, per output channel; activations: asymmetric uniform, per tensor;
  every quantizer calibrated once on a small calibration batch by a percentile clipping search (MSE);
- post-LayerNorm activations: per-channel during calibration, then scale reparameterization into one
  per-tensor quantizer by folding r1 = s / mean(s) and r2 = z - round(mean(z)) into the LayerNorm affine
  and the following Linear layers, whose weights are then re-calibrated;
- post-softmax attention: log-sqrt2 during calibration, executed in the shift-based log2 form
  (spec §7) whose fake-quant twin decodes odd codes with the fixed-point sqrt(2);
- patch-embedding (conv) inputs at 8 bits.

Numerics follow docs/spec.md §2-§3 so the fake-quant graph and pyqsim.runtime.vit agree.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
import os
import time

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from .. import ops
from ..runtime.paramfile import save_params
from ..runtime.vit import GRAPH
from ._common import PERCENTILES, WEIGHT_SHRINK, LogQuantizer, UniformQuantizer

POST_LN_MODES = ("layer", "channel", "reparam")
SOFTMAX_MODES = ("log2", "log-sqrt2", "reparam")


class PatternError(ValueError):
    """The model lacks a pattern RepQ-ViT needs (named in the message)."""


@dataclasses.dataclass(frozen=True)
class RepQConfig:
    """Bit widths and the quantizer choices of the paper's ablation.

    post_ln: "layer" (per-tensor), "channel" (per-channel; not executable by an integer GEMM) or
    "reparam" (per-channel calibration folded into per-tensor). softmax: "log2", "log-sqrt2" (float
    sqrt(2)) or "reparam" (log-sqrt2 executed as shift-based log2).
    """

    w_bits: int = 4
    a_bits: int = 4
    post_ln: str = "reparam"
    softmax: str = "reparam"
    input_bits: int = 8
    percentiles: tuple = PERCENTILES
    weight_shrink: tuple = WEIGHT_SHRINK  # extra MSE candidates for weights; () = the paper code's search

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


class QMatMul(nn.Module):
    """q @ k^T with both operands quantized per tensor."""

    def __init__(self, cfg: RepQConfig):
        super().__init__()
        self.a_quant = UniformQuantizer(cfg.a_bits, percentiles=cfg.percentiles)
        self.b_quant = UniformQuantizer(cfg.a_bits, percentiles=cfg.percentiles)

    def forward(self, a, b):
        return self.a_quant(a) @ self.b_quant(b)


class QAttnV(nn.Module):
    """attn @ v with a log2 / log-sqrt2 attention quantizer and a per-tensor v quantizer."""

    def __init__(self, cfg: RepQConfig):
        super().__init__()
        mode = "log2" if cfg.softmax == "log2" else "sqrt2"
        self.p_quant = LogQuantizer(cfg.a_bits, mode, shift_form=cfg.softmax == "reparam", percentiles=cfg.percentiles)
        self.v_quant = UniformQuantizer(cfg.a_bits, percentiles=cfg.percentiles)

    def forward(self, attn, v):
        return self.p_quant(attn) @ self.v_quant(v)


@fx.wrap
def _additive_mask(mask, like):
    """Float additive form of a PyTorch attention mask (bool: True = masked)."""
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=like.dtype).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


class QSDPA(nn.Module):
    """F.scaled_dot_product_attention made explicit with quantized matmuls."""

    def __init__(self, cfg: RepQConfig):
        super().__init__()
        self.matmul_qk = QMatMul(cfg)
        self.matmul_av = QAttnV(cfg)

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


# --------------------------------------------------------------------------- torch.nn transformer modules made traceable


class ExplicitMHA(nn.Module):
    """nn.MultiheadAttention as q/k/v Linears, matmul -> softmax -> matmul, out_proj (traceable)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise PatternError("nn.MultiheadAttention with add_bias_kv/add_zero_attn has no plain softmax-attention pattern")
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim, self.batch_first = h, e // h, mha.batch_first
        if mha._qkv_same_embed_dim:
            ws = mha.in_proj_weight.detach().chunk(3)
        else:
            ws = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        bs = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), ws, bs):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            lin.weight.data.copy_(w)
            if b is not None:
                lin.bias.data.copy_(b)
            setattr(self, name, lin)
        self.out_proj = mha.out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n, e = query.shape
        m = key.shape[1]
        q = self.q_proj(query).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).reshape(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).reshape(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        s = (q @ k.transpose(-2, -1)) * (self.head_dim ** -0.5)
        if attn_mask is not None:
            s = s + _additive_mask(attn_mask, s)
        if key_padding_mask is not None:
            s = s + _additive_mask(key_padding_mask, s)[:, None, None, :]
        out = self.out_proj((s.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, e))
        return (out if self.batch_first else out.transpose(0, 1)), None


class ExplicitEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer without its fast-path control flow (traceable; eval semantics)."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.self_attn = ExplicitMHA(layer.self_attn)
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2, self.norm_first = layer.norm1, layer.norm2, layer.norm_first
        self.activation = layer.activation

    def _sa(self, x, mask, kpm):
        return self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False)[0]

    def _ff(self, x):
        return self.linear2(self.activation(self.linear1(x)))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask))
        return self.norm2(x + self._ff(x))


class ExplicitEncoder(nn.Module):
    """nn.TransformerEncoder without its nested-tensor fast path (traceable)."""

    def __init__(self, enc: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(_traceable(layer) for layer in enc.layers)
        self.norm = enc.norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        for layer in self.layers:
            src = layer(src, mask, src_key_padding_mask)
        return self.norm(src) if self.norm is not None else src


_EXPLICIT = ((nn.TransformerEncoder, ExplicitEncoder), (nn.TransformerEncoderLayer, ExplicitEncoderLayer),
             (nn.MultiheadAttention, ExplicitMHA))


def _traceable(module: nn.Module) -> nn.Module:
    """Replace torch.nn transformer modules (in place, recursively) by traceable equivalents."""
    for cls, explicit in _EXPLICIT:
        if isinstance(module, cls):
            return explicit(module)
    for name, child in module.named_children():
        new = _traceable(child)
        if new is not child:
            setattr(module, name, new)
    return module


# --------------------------------------------------------------------------- pattern detection

_MATMUL_FUNCS = (operator.matmul, torch.matmul, torch.bmm)
_MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
_SOFTMAX_FUNCS = (F.softmax, torch.softmax)
_SCORE_FUNCS = (operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div, torch.add, torch.sub)
_SCORE_METHODS = ("mul", "div", "add", "sub", "masked_fill", "float", "to", "type_as", "__mul__", "__truediv__")
_IDENTITY_METHODS = ("contiguous", "clone", "float", "to", "type_as")
_META_ATTRS = ("shape", "dtype", "device", "ndim")
_META_METHODS = ("size", "dim")


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_matmul(node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL_FUNCS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS)


def _ndim(node) -> int | None:
    tm = node.meta.get("tensor_meta")
    return len(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _is_identity(gm, node) -> bool:
    """Ops that pass values through unchanged in eval mode (dropout, identity, dtype/layout no-ops)."""
    mod = _module(gm, node)
    if mod is not None:
        return isinstance(mod, (nn.Dropout, nn.Identity))
    if node.op == "call_function":
        return node.target is F.dropout
    return node.op == "call_method" and node.target in _IDENTITY_METHODS


def _is_meta_use(node) -> bool:
    """Uses that read only shape/dtype (e.g. ``b, n, c = x.shape``)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _META_ATTRS
    return node.op == "call_method" and node.target in _META_METHODS


def _keeps_last_dim(gm, node, src) -> bool:
    """Channel-preserving selections between a LayerNorm and a Linear (e.g. the class token x[:, 0])."""
    if _is_identity(gm, node):
        return True
    if node.op == "call_function" and node.target is operator.getitem and node.args[0] is src:
        idx, nd = node.args[1], _ndim(src)
        idx = idx if isinstance(idx, tuple) else (idx,)
        return nd is not None and len(idx) < nd and Ellipsis not in idx and None not in idx
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
            mod = _module(gm, user)
            if isinstance(mod, nn.Linear) and user.args[0] is node:
                paths.append(path + [user])
            elif _is_meta_use(user):
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
        if _is_matmul(n):
            found.append(n)
        elif (n.op == "call_function" and n.target in _SCORE_FUNCS) or (
                n.op == "call_method" and n.target in _SCORE_METHODS) or _is_identity(gm, n):
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
    return found


def _value_matmuls(gm, node):
    """Matmuls consuming a softmax output as their left operand (through dropout/identity)."""
    out = []
    for user in node.users:
        if _is_matmul(user) and user.args[0] is node:
            out.append(user)
        elif _is_identity(gm, user):
            out.extend(_value_matmuls(gm, user))
    return out


def _softmax_dim(gm, node):
    mod = _module(gm, node)
    if isinstance(mod, nn.Softmax):
        return mod.dim
    if (node.op == "call_function" and node.target in _SOFTMAX_FUNCS) or (
            node.op == "call_method" and node.target == "softmax"):
        return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return False


def _scope(node, fallback: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        last = list(stack.values())[-1]
        return last[0] if isinstance(last, tuple) else str(last)
    return fallback


def _unique(gm, name: str) -> str:
    base, i = name, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        name, i = f"{base}_{i}", i + 1


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """torch.fx graph of a copy of ``model`` (torch.nn transformer modules made explicit), with shapes.

    The model is called with one tensor; optional forward arguments keep their defaults.
    """
    model = _traceable(copy.deepcopy(model).eval())
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    fixed = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        gm = fx.symbolic_trace(model, concrete_args=fixed or None)
    except Exception as exc:  # noqa: BLE001 - report any tracing failure with the needed patterns
        raise PatternError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); RepQ-ViT needs the "
            "LayerNorm -> Linear and matmul -> softmax -> matmul attention patterns to be traceable") from exc
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # noqa: BLE001 - the model cannot run on the given inputs
        err = ValueError if example.is_floating_point() else TypeError
        raise err(f"calib: the model does not run on inputs of shape {tuple(example.shape)} and dtype "
                  f"{example.dtype} ({type(exc).__name__}: {exc})") from exc
    return gm


def _find_attention(gm, model_name: str):
    """(qk matmul, av matmul) pairs around softmax(dim=-1) nodes, and F.scaled_dot_product_attention nodes."""
    sites, softmaxes = [], []
    for sm in gm.graph.nodes:
        dim = _softmax_dim(gm, sm)
        if dim is False:
            continue
        softmaxes.append(sm.name)
        if dim is None or dim not in (-1, (_ndim(sm) or 0) - 1):
            continue
        qk, av = _score_matmul(gm, sm.args[0]), _value_matmuls(gm, sm)
        if len(qk) == 1 and len(av) == 1:
            sites.append((qk[0], av[0]))
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    if not sites and not sdpa:
        raise PatternError(
            f"no softmax attention pattern in {model_name}: expected matmul(q, k^T) -> [scale/mask] -> "
            "softmax(dim=-1) -> matmul(attn, v), F.scaled_dot_product_attention or nn.MultiheadAttention"
            + (f"; softmax nodes found but not in that pattern: {softmaxes}" if softmaxes else "; no softmax found"))
    return sites, sdpa


def _find_post_ln(gm, model_name: str):
    """(LayerNorm node, paths to its Linear consumers, has other consumers) for every LayerNorm -> Linear."""
    groups = []
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
            paths, others = _ln_paths(gm, node)
            if paths:
                groups.append((node, paths, bool(others)))
    if not groups:
        lns = [n.target for n in gm.graph.nodes if isinstance(_module(gm, n), nn.LayerNorm)]
        raise PatternError(
            f"no LayerNorm -> Linear pattern in {model_name}: post-LayerNorm activations must feed "
            f"nn.Linear layers (directly or through channel-preserving selections); LayerNorm modules found: {lns}")
    return groups


def _insert_post_ln_quantizer(gm, cfg: RepQConfig, ln_node, paths, shared: bool) -> PostLNGroup:
    """Quantize a LayerNorm output feeding Linears (QAct node); the LayerNorm gets affine parameters to fold
    into, and is duplicated for the Linear branch when its output also feeds other consumers."""
    graph, ln = gm.graph, gm.get_submodule(ln_node.target)
    affine = nn.LayerNorm(ln.normalized_shape, eps=ln.eps)
    with torch.no_grad():
        if ln.weight is not None:
            affine.weight.copy_(ln.weight)
        if ln.bias is not None:
            affine.bias.copy_(ln.bias)
    act = QAct(UniformQuantizer(cfg.a_bits, axis=None if cfg.post_ln == "layer" else -1, percentiles=cfg.percentiles))
    act_name = _unique(gm, f"{ln_node.target}_act")
    gm.add_submodule(act_name, act)
    if shared:
        ln_name = _unique(gm, f"{ln_node.target}_rq")
        gm.add_submodule(ln_name, affine)
        with graph.inserting_after(ln_node):
            src = graph.call_module(ln_name, ln_node.args, ln_node.kwargs)
        with graph.inserting_after(src):
            act_node = graph.call_module(act_name, (src,))
        mapping = {ln_node: act_node}
        for path in paths:  # copy the selections between the LayerNorm and each Linear onto the new branch
            for n in path[1:-1]:
                if n not in mapping:
                    with graph.inserting_after(n):
                        mapping[n] = graph.node_copy(n, lambda a: mapping.get(a, a))
            path[-1].replace_input_with(path[-2], mapping[path[-2]])
    else:
        ln_name = ln_node.target
        _set_submodule(gm, ln_name, affine)
        with graph.inserting_after(ln_node):
            act_node = graph.call_module(act_name, (ln_node,))
        ln_node.replace_all_uses_with(act_node, delete_user_cb=lambda u: u is not act_node)
    linears = list(dict.fromkeys(path[-1].target for path in paths))
    for name in linears:
        gm.get_submodule(name)._act_source.append(act.quant)
    return PostLNGroup(ln_name, act_name, linears, shared)


def _replace_with_module(gm, node, name: str, module: nn.Module, args, kwargs=None):
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, tuple(args), kwargs or {})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def build(model: nn.Module, cfg: RepQConfig, example: torch.Tensor):
    """Fake-quant GraphModule of ``model`` (uncalibrated), its post-LN groups and attention sites.

    Raises PatternError naming the missing pattern when the model has no LayerNorm -> Linear or no
    softmax attention.
    """
    gm = trace(model, example)
    name = type(model).__name__
    sites, sdpa = _find_attention(gm, name)
    groups = _find_post_ln(gm, name)
    in_group = {p[-1] for _, paths, _ in groups for p in paths}
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if isinstance(mod, nn.Linear):
            _set_submodule(gm, node.target, QLinear(mod, cfg, quant_input=node not in in_group))
        elif isinstance(mod, nn.Conv2d):
            _set_submodule(gm, node.target, QConv2d(mod, cfg))
    post_ln = [_insert_post_ln_quantizer(gm, cfg, *g) for g in groups]
    attention = []
    for qk, av in sites:
        scope = _scope(qk, "")
        names = [_unique(gm, f"{scope}.{suffix}" if scope else suffix) for suffix in ("matmul_qk", "matmul_av")]
        _replace_with_module(gm, qk, names[0], QMatMul(cfg), qk.args[:2])
        _replace_with_module(gm, av, names[1], QAttnV(cfg), av.args[:2])
        attention.append(AttentionSite(*names))
    for node in sdpa:
        scope = _scope(node, "")
        sdpa_name = _unique(gm, f"{scope}.sdpa" if scope else "sdpa")
        _replace_with_module(gm, node, sdpa_name, QSDPA(cfg), node.args, node.kwargs)
        attention.append(AttentionSite(f"{sdpa_name}.matmul_qk", f"{sdpa_name}.matmul_av"))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, post_ln, attention


def _set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


# --------------------------------------------------------------------------- calibration


@dataclasses.dataclass
class RepQViT:
    """A calibrated fake-quant model and what was found in it."""

    model: fx.GraphModule
    config: RepQConfig
    post_ln: list
    attention: list
    seconds: float
    source_config: dict | None = None

    @torch.no_grad()
    def __call__(self, x):
        return self.model(x)

    def quantizers(self):
        return [m for m in self.model.modules() if isinstance(m, (UniformQuantizer, LogQuantizer))]


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
def calibrate(model: nn.Module, calib: torch.Tensor, cfg: RepQConfig = RepQConfig()) -> RepQViT:
    """RepQ-ViT: build the fake-quant graph, calibrate every quantizer on ``calib`` in one pass, reparameterize."""
    if not torch.is_tensor(calib):
        raise TypeError(f"calib must be a torch.Tensor of model inputs, got {type(calib).__name__}")
    if len(calib) == 0:
        raise ValueError("calib is empty: RepQ-ViT needs at least one calibration input")
    if calib.is_floating_point() and not bool(torch.isfinite(calib).all()):
        raise ValueError("calib contains NaN or infinite values")
    t0 = time.perf_counter()
    gm, post_ln, attention = build(model, cfg, calib[:1])
    quants = [(n, m) for n, m in gm.named_modules() if isinstance(m, (UniformQuantizer, LogQuantizer))]
    for name, q in quants:
        q.name, q.calibrating = name, True
    quants = [q for _, q in quants]
    gm(calib)
    for q in quants:
        q.calibrating = False
    if cfg.post_ln == "reparam":
        reparameterize(gm, post_ln)
    src = dataclasses.asdict(model.cfg) if dataclasses.is_dataclass(getattr(model, "cfg", None)) else None
    return RepQViT(gm, cfg, post_ln, attention, time.perf_counter() - t0, src)


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


# --------------------------------------------------------------------------- export for pyqsim.runtime.vit

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


def _export_weighted(tensors, name, layer, rows, x_quant, out=None):
    """Weights, zero points, int32 bias and output stage of rows ``rows`` of a QLinear/QConv2d.

    ``out`` is the consumer's quantizer for a requantized output (None: float32 output).
    Returns the w_format.
    """
    wq = layer.w_quant
    s_w = _np(wq.scale[rows], np.float32)
    codes = _np(wq.codes(layer.weight)[rows], np.float64).astype(np.int64)
    zw = _np(wq.zero_point[rows], np.float64).astype(np.int32)
    s_x = np.float32(x_quant.scale)
    step = (np.float64(s_x) * s_w.astype(np.float64)).astype(np.float32)  # fl32(s_x * s_w), as in QLinear
    bias = np.rint(_np(layer.bias[rows], np.float64) / step.astype(np.float64))
    if np.abs(bias).max(initial=0) >= 2**31:
        raise OverflowError(f"{name}: int32 bias out of range")
    stored, zw, fmt = _weight_codes(codes, zw, wq.bits)
    tensors.update({f"{name}.weight": stored, f"{name}.w_zero_point": zw.astype(np.int32), f"{name}.w_scale": s_w,
                    f"{name}.bias": bias.astype(np.int32),
                    f"{name}.x_zero_point": np.array(int(x_quant.zero_point), np.int32)})
    if out is None:
        tensors[f"{name}.out_scale"] = step
    else:
        m, sh = ops.quantize_multiplier(step.astype(np.float64) / np.float64(np.float32(out.scale)))
        tensors.update({f"{name}.multiplier": m, f"{name}.shift": sh,
                        f"{name}.out_zero_point": np.array(int(out.zero_point), np.int32)})
    return fmt


def _export_quant(tensors, name, q: UniformQuantizer):
    if q.scale.dim() != 0:
        raise ValueError(f"{name}: per-channel activation quantizers cannot be executed by an integer GEMM "
                         "(use post_ln='reparam' or 'layer')")
    tensors[f"{name}.scale"] = np.array(np.float32(q.scale), np.float32)
    tensors[f"{name}.zero_point"] = np.array(int(q.zero_point), np.int32)


def export_vit(res: RepQViT, path=None, examples=None) -> tuple[dict, dict]:
    """Integer parameters and layer graph of a calibrated pyqsim ViT (names as in pyqsim.models.vit.ViT).

    Written with pyqsim.runtime.paramfile.save_params when ``path`` is given; run with pyqsim.runtime.vit.
    ``examples``: optional (images, labels) stored for ``example_inputs``.
    """
    cfg, vit = res.config, res.source_config
    if vit is None:
        raise ValueError("export_vit needs a pyqsim.models.vit.ViT-structured model (its config was not found)")
    if cfg.post_ln == "channel" or cfg.softmax == "log-sqrt2":
        raise ValueError(f"post_ln={cfg.post_ln!r} / softmax={cfg.softmax!r} has no integer form: per-channel "
                         "activation scales do not factor out of a GEMM, float sqrt(2) weights are not shifts")
    gm, a, t = res.model, cfg.a_bits, {}
    mod = gm.get_submodule
    c, heads = vit["embed_dim"], vit["num_heads"]
    attn_scale = (c // heads) ** -0.5
    t["cls_token"] = _np(gm.cls_token, np.float32).reshape(1, 1, c)
    t["pos_embed"] = _np(gm.pos_embed, np.float32)
    pe = mod("patch_embed.proj")
    _export_quant(t, "patch_embed.in", pe.in_quant)
    steps = [{"op": "quantize", "name": "patch_embed.in", "in": "image", "out": "xq", "bits": cfg.input_bits},
             {"op": "patch_embed", "name": "patch_embed", "in": "xq", "out": "h", "patch": vit["patch_size"],
              "w_format": _export_weighted(t, "patch_embed", pe, slice(None), pe.in_quant)}]

    def norm_step(name, out):
        ln, act = mod(name), mod(f"{name}_act").quant
        t[f"{name}.weight"], t[f"{name}.bias"] = _np(ln.weight, np.float32), _np(ln.bias, np.float32)
        _export_quant(t, f"{name}.act", act)
        steps.append({"op": "layernorm", "name": name, "in": "h", "out": "ln", "eps": ln.eps})
        steps.append({"op": "quantize", "name": f"{name}.act", "in": "ln", "out": out, "bits": a})
        return act

    def linear_step(name, layer, x_quant, src, out, rows=slice(None), out_quant=None):
        fmt = _export_weighted(t, name, layer, rows, x_quant, out_quant)
        steps.append({"op": "linear", "name": name, "in": src, "out": out, "w_format": fmt, "bits": a,
                      "kind": "float32" if out_quant is None else "requant"})

    for i in range(vit["depth"]):
        p = f"blocks.{i}"
        act = norm_step(f"{p}.norm1", "a")
        qkv, qk, av = mod(f"{p}.attn.qkv"), mod(f"{p}.attn.matmul_qk"), mod(f"{p}.attn.matmul_av")
        for j, (s, q) in enumerate((("q", qk.a_quant), ("k", qk.b_quant), ("v", av.v_quant))):
            linear_step(f"{p}.attn.qkv.{s}", qkv, act, "a", s, slice(j * c, (j + 1) * c), q)
            _export_quant(t, f"{p}.attn.{s}", q)
        proj = mod(f"{p}.attn.proj")
        t[f"{p}.attn.qk.out_scale"] = np.array(np.float32(qk.a_quant.scale) * np.float32(qk.b_quant.scale)
                                               * np.float32(attn_scale), np.float32)
        delta = np.float32(av.p_quant.delta)
        t[f"{p}.attn.p.delta"] = np.array(delta, np.float32)
        real = np.float64(delta) * np.float64(np.float32(av.v_quant.scale)) / np.float64(np.float32(proj.in_quant.scale))
        m, sh = ops.quantize_multiplier(np.array([real * 2.0 ** -(FRAC_BITS + _LOG_P)]))
        t[f"{p}.attn.av.multiplier"], t[f"{p}.attn.av.shift"] = m.reshape(()), sh.reshape(())
        t[f"{p}.attn.av.out_zero_point"] = np.array(int(proj.in_quant.zero_point), np.int32)
        steps.append({"op": "attention", "name": f"{p}.attn", "in": ["q", "k", "v"], "out": "o", "heads": heads,
                      "bits": a, "mode": av.p_quant.mode, "frac_bits": FRAC_BITS})
        linear_step(f"{p}.attn.proj", proj, proj.in_quant, "o", "y")
        steps.append({"op": "add", "in": ["h", "y"], "out": "h"})
        act = norm_step(f"{p}.norm2", "a")
        linear_step(f"{p}.mlp.fc1", mod(f"{p}.mlp.fc1"), act, "a", "y")
        fc2 = mod(f"{p}.mlp.fc2")
        _export_quant(t, f"{p}.mlp.fc2.in", fc2.in_quant)
        steps += [{"op": "gelu", "in": "y", "out": "g"},
                  {"op": "quantize", "name": f"{p}.mlp.fc2.in", "in": "g", "out": "a", "bits": a}]
        linear_step(f"{p}.mlp.fc2", fc2, fc2.in_quant, "a", "y")
        steps.append({"op": "add", "in": ["h", "y"], "out": "h"})
    act = norm_step("norm", "a")
    steps.append({"op": "select_token", "in": "a", "out": "cls", "index": 0})
    linear_step("head", mod("head"), act, "cls", "logits")
    if examples is not None:
        t["examples.images"] = np.ascontiguousarray(examples[0], dtype=np.float32)
        t["examples.labels"] = np.asarray(examples[1], dtype=np.int64)
    meta = {"graph": GRAPH, "model": {"kind": "vit", **vit}, "config": dataclasses.asdict(cfg), "steps": steps}
    if path is not None:
        save_params(path, t, meta)
    return t, meta
