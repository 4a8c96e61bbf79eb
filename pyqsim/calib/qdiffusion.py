"""Q-Diffusion post-training quantization of diffusion UNets (fake-quant in PyTorch) and integer export.

* timestep-aware calibration data from the FP sampler (:func:`generate_calibration_data`);
* per-output-channel weight quantization refined by BRECQ block reconstruction with AdaRound;
* per-tensor activation quantizers initialized from calibration statistics, then LSQ-learned on block outputs;
* split shortcut quantization at concatenation points (Conv2d/Linear with a ``qsplit`` attribute, see
  :mod:`pyqsim.models.unet`, or found at run time by :func:`discover_splits`);
* attention q, k, v at the activation bits and the softmax output at ``softmax_bits`` (uniform, unsigned,
  zero point 0 when <= 8 bits; kept float above 8 bits);
* the "linear quant" baseline (min-max, nearest rounding, no split, no reconstruction).

Arithmetic follows docs/spec.md §2 (round half even, clamp, zero points inside the code range) so that
the exported codes run unchanged on the integer ops (lowered by :func:`lower_program` to a program).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..models.ddim import DDIMSampler, torch_eps_fn
from ..models.unet import AttnCore
from .lower import quant_scale_zp as q_scale_zp

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch
BLOCK_CLASS_NAMES = {"ResBlock", "AttnBlock", "ResnetBlock2D", "Attention"}  # reconstruction units


@dataclass
class QDiffConfig:
    """Quantization recipe. ``method`` is "qdiffusion" or "linear" (the min-max baseline)."""

    w_bits: int = 4
    a_bits: int = 8
    softmax_bits: int | None = None  # None: a_bits; > 8 keeps the softmax output in float
    method: str = "qdiffusion"
    split: bool | None = None  # None: True for qdiffusion, False for linear
    first_last_bits: int | None = 8  # weights of the first and last layer (None: w_bits)
    weight_iters: int = 500
    act_iters: int = 200
    batch_size: int = 32
    weight_lr: float = 3e-2
    act_lr: float = 3e-3  # on log(step size)
    reg_weight: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    init_samples: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("qdiffusion", "linear"):
            raise ValueError(f"method must be 'qdiffusion' or 'linear', got {self.method!r}")
        if self.split is None:
            self.split = self.method == "qdiffusion"
        if self.softmax_bits is None:
            self.softmax_bits = self.a_bits

    @property
    def label(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


def _lp_err(xq: torch.Tensor, x: torch.Tensor, dims) -> torch.Tensor:
    return (xq - x).abs().pow(2.4).mean(dim=dims)


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer, unsigned codes [0, 2^b - 1], learned log step size."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.qmax = 2 ** bits - 1
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.enabled = False
        self.observing = False
        self.samples: list[torch.Tensor] = []

    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale)

    def _fq(self, x, s, z):
        return (torch.clamp(round_ste(x / s) + z, 0, self.qmax) - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            flat = x.detach().reshape(-1)
            if flat.numel() > 65536:
                flat = flat[::flat.numel() // 65536 + 1]
            self.samples.append(flat)
        if not self.enabled:
            return x
        return self._fq(x, self.scale(), self.zero_point)

    def _params(self, lo: float, hi: float):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = np.float32((hi - lo) / self.qmax) if hi > lo else np.float32(1.0)
        z = float(np.clip(np.rint(-lo / float(s)), 0, self.qmax))
        return float(s), z

    @torch.no_grad()
    def init_from_samples(self, method: str) -> None:
        """Set the step size from observed samples: min-max, or the best of 50 shrunk ranges (lp-2.4 error)."""
        x = torch.cat(self.samples).float()
        self.samples, self.observing = [], False
        lo, hi = float(x.min()), float(x.max())
        best = self._params(lo, hi)
        if method == "mse":
            best_err = math.inf
            for r in np.linspace(1.0, 0.2, 50):
                s, z = self._params(lo * r, hi * r)
                err = float(_lp_err(self._fq(x, torch.tensor(s), torch.tensor(z)), x, 0))
                if err < best_err:
                    best, best_err = (s, z), err
        self.log_scale.copy_(torch.log(torch.tensor(best[0], dtype=torch.float32)))
        self.zero_point.fill_(best[1])

    def export(self) -> list:
        """[scale (float32 value), zero point] exactly as used by the fake-quant forward."""
        return [float(self.scale().detach().float()), int(self.zero_point)]


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric weight quantizer (signed codes) with optional AdaRound rounding."""

    def __init__(self, bits: int, out_channels: int):
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.register_buffer("scale", torch.ones(out_channels))
        self.register_buffer("zero_point", torch.zeros(out_channels))
        self.alpha: nn.Parameter | None = None
        self.soft = False

    def _view(self, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (w.dim() - 1)))

    def _qparams(self, lo: torch.Tensor, hi: torch.Tensor):
        lo, hi = lo.clamp(max=0).double(), hi.clamp(min=0).double()
        levels = self.qmax - self.qmin
        s = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(hi)).float()
        z = torch.clamp(torch.round(-lo / s.double()), 0, levels).float() + self.qmin
        return s, z

    def _nearest(self, w, s, z):
        s, z = self._view(s, w), self._view(z, w)
        return (torch.clamp(torch.round(w / s) + z, self.qmin, self.qmax) - z) * s

    @torch.no_grad()
    def init(self, w: torch.Tensor, method: str) -> None:
        """Per-channel range: min-max, or the per-channel best of 50 shrunk ranges (lp-2.4 error)."""
        flat = w.reshape(w.shape[0], -1)
        lo, hi = flat.min(1).values, flat.max(1).values
        s, z = self._qparams(lo, hi)
        if method == "mse":
            best_err = torch.full_like(s, math.inf)
            for r in np.linspace(1.0, 0.2, 50):
                sc, zc = self._qparams(lo * r, hi * r)
                err = _lp_err(self._nearest(flat, sc, zc), flat, 1)
                better = err < best_err
                s, z, best_err = torch.where(better, sc, s), torch.where(better, zc, z), torch.minimum(err, best_err)
        self.scale.copy_(s)
        self.zero_point.copy_(z)
        self.alpha = None

    def init_adaround(self, w: torch.Tensor) -> None:
        """Start AdaRound from the nearest-rounding solution (h(alpha) = fractional part)."""
        rest = (w / self._view(self.scale, w)).detach()
        rest = rest - torch.floor(rest)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def reg(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) of the current rounding: nearest, soft AdaRound or hard AdaRound."""
        s, z = self._view(self.scale, w), self._view(self.zero_point, w)
        if self.alpha is None:
            q = torch.round(w / s)
        else:
            up = self.h() if self.soft else (self.alpha >= 0).float()
            q = torch.floor(w / s) + up
        return torch.clamp(q + z, self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s, z = self._view(self.scale, w), self._view(self.zero_point, w)
        return (self.codes(w) - z) * s


class QuantLayer(nn.Module):
    """A Conv2d/Linear with input activation quantizer(s) and per-channel weight quantizer(s).

    With ``split`` = k > 0 the input channels [0, k) and [k, C) (and the matching weight columns)
    have their own quantizers (split shortcut)."""

    is_quant_layer = True

    def __init__(self, module: nn.Module, w_bits: int, a_bits: int, split: int = 0):
        super().__init__()
        self.module = module
        for p in module.parameters():
            p.requires_grad_(False)
        self.kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        self.split = int(split)
        self.w_bits, self.a_bits = w_bits, a_bits
        n = 2 if self.split else 1
        out = module.weight.shape[0]
        self.wq = nn.ModuleList([WeightQuantizer(w_bits, out) for _ in range(n)])
        self.aq = nn.ModuleList([ActQuantizer(a_bits) for _ in range(n)])
        self.w_enabled = w_bits < 32
        self.frozen: tuple | None = None  # (weight, bias) fixed after calibration

    def freeze(self) -> None:
        """Cache the final fake-quant weight and bias (calibration of this layer is done)."""
        with torch.no_grad():
            self.frozen = (self.quant_weight().detach(), self.quant_bias())
        if self.frozen[1] is not None:
            self.frozen = (self.frozen[0], self.frozen[1].detach())

    def halves(self, t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        if not self.split:
            return [t]
        return [t.narrow(dim, 0, self.split), t.narrow(dim, self.split, t.shape[dim] - self.split)]

    def weights(self) -> list[torch.Tensor]:
        return self.halves(self.module.weight, 1)

    def quant_weight(self) -> torch.Tensor:
        if not self.w_enabled:
            return self.module.weight
        return torch.cat([q(w) for q, w in zip(self.wq, self.weights())], dim=1)

    def bias_scale(self) -> torch.Tensor | None:
        """s_x1 * s_w1[n], the integer bias grid, when weights and activations are quantized."""
        if not (self.w_enabled and self.aq[0].enabled):
            return None
        return self.aq[0].scale() * self.wq[0].scale

    def quant_bias(self) -> torch.Tensor | None:
        b, sb = self.module.bias, self.bias_scale()
        if b is None or sb is None:
            return b
        return round_ste(b / sb) * sb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if self.kind == "conv" else -1
        xs = [q(t) for q, t in zip(self.aq, self.halves(x, dim))]
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=dim)
        w, b = self.frozen or (self.quant_weight(), self.quant_bias())
        if self.kind == "linear":
            return F.linear(x, w, b)
        m = self.module
        return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)

    # ---------------------------------------------------------------- integer form (pyqsim.calib.lower)

    def leaf_forward(self, x):
        return self.forward(x)

    def leaf_fake(self, x):
        m = self.module
        if self.kind == "linear":
            return x.new_empty((*x.shape[:-1], m.weight.shape[0]))
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
        h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return x.new_empty((x.shape[0], m.weight.shape[0], h, w))

    def lower(self, lw, node):
        """int_gemm / int_conv2d (split_gemm / split_conv2d when split) with float32 output; float when A32."""
        from .lower import Val

        base, m = lw.scope, self.module
        x = lw.env[node.args[0]]
        dim = 1 if self.kind == "conv" else -1
        conv_attrs = {}
        if self.kind == "conv":
            conv_attrs = dict(stride=list(m.stride), padding=list(m.padding), dilation=list(m.dilation),
                              kernel_size=list(m.kernel_size))
        if not self.aq[0].enabled:  # activations unquantized: float layer on the dequantized weight
            w, b = self.frozen or (self.quant_weight(), self.quant_bias())
            args = [lw.float_ref(x), lw.const(w.detach(), f"{base}.weight"),
                    lw.const(b.detach(), f"{base}.bias") if b is not None else None]
            if self.kind == "linear":
                return lw.emit("linear", args, base=base, dtype="float32")
            return lw.emit("conv2d", args, {k: conv_attrs[k] for k in ("stride", "padding", "dilation")} |
                           {"groups": int(m.groups)}, base=base, dtype="float32")
        xf = lw.float_ref(x)
        if self.split:
            halves = [lw.emit("slice", [xf, dim, 0, self.split], base=f"{base}.x1", dtype="float32"),
                      lw.emit("slice", [xf, dim, self.split, None], base=f"{base}.x2", dtype="float32")]
        else:
            halves = [xf]
        codes = [lw.quantize(Val(h), q, f"{base}.in{i}") for i, (h, q) in enumerate(zip(halves, self.aq))]
        fmt = "int8" if self.w_bits > 4 else "int4"
        t, zps = {}, []
        for i, (q, w) in enumerate(zip(self.wq, self.weights())):
            c = _np(q.codes(w), np.int8)
            stored = c if fmt == "int8" else ops.pack_int4(c.reshape(len(c), -1))
            sx, zx = q_scale_zp(self.aq[i])
            sfx = "" if not self.split else str(i + 1)
            t[f"w{sfx}"] = lw.tensor(f"{base}.w{i}", stored)
            t[f"w{sfx}_zero_point"] = lw.tensor(f"{base}.w{i}_zp", _np(q.zero_point, np.int32))
            t[f"out_scale{sfx}"] = lw.tensor(f"{base}.out_scale{i}", np.float32(sx) * _np(q.scale, np.float32))
            zps.append(zx)
        if m.bias is not None:
            t["bias"] = lw.tensor(f"{base}.bias", _np(torch.round(m.bias / self.bias_scale()), np.int32))
        bits = {"x_bits": self.a_bits, "w_bits": self.w_bits, "w_format": fmt}
        if self.split:
            kind = "split_conv2d" if self.kind == "conv" else "split_gemm"
            attrs = dict(bits, x1_zero_point=zps[0], x2_zero_point=zps[1], **conv_attrs)
            return lw.emit(kind, [c.ref for c in codes], attrs, t, base=base)
        t["weight"], t["w_zero_point"], t["out_scale"] = t.pop("w"), t.pop("w_zero_point"), t.pop("out_scale")
        attrs = dict(bits, x_zero_point=zps[0])
        if self.kind == "conv":
            return lw.emit("int_conv2d", [codes[0].ref], dict(attrs, groups=int(m.groups), **conv_attrs), t, base=base)
        return lw.emit("int_gemm", [codes[0].ref], attrs, t, base=base)


class QuantAttnCore(AttnCore):
    """Attention core with quantized q, k, v (activation bits) and softmax output (``softmax_bits``)."""

    def __init__(self, a_bits: int, softmax_bits: int):
        super().__init__()
        self.a_bits, self.softmax_bits = a_bits, softmax_bits
        self.aq = nn.ModuleDict({n: ActQuantizer(a_bits) for n in "qkv"})
        self.sq = ActQuantizer(min(softmax_bits, 8))
        self.softmax_quantized = softmax_bits <= 8

    def forward(self, q, k, v):
        q, k, v = self.aq["q"](q), self.aq["k"](k), self.aq["v"](v)
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * (q.shape[1] ** -0.5), dim=2)
        if self.softmax_quantized:
            w = self.sq(w)
        return torch.bmm(v, w.transpose(1, 2))

    def act_quantizers(self) -> list[ActQuantizer]:
        return list(self.aq.values()) + ([self.sq] if self.softmax_quantized else [])

    def leaf_forward(self, q, k, v):
        return self.forward(q, k, v)

    def leaf_fake(self, q, k, v):
        return v.new_empty((v.shape[0], v.shape[1], q.shape[2]))

    def lower(self, lw, node):
        """q, k, v [B, C, N] -> int_bmm scores, float softmax, int_bmm with the quantized softmax (float if > 8 bits)."""
        from .lower import Val

        base = lw.scope
        q, k, v = (lw.env[a] for a in node.args[:3])
        if not self.aq["q"].enabled:  # activations unquantized: the attention products stay float
            c = lw.values[node.args[0]].shape[1]
            qt = lw.emit("transpose", [lw.float_ref(q), 1, 2], base=f"{base}.qt", dtype="float32")
            s = lw.emit("matmul", [qt, lw.float_ref(k)], base=f"{base}.qk", dtype="float32")
            s = lw.emit("binary", [s, float(np.float32(c ** -0.5))], {"op": "mul"}, dtype="float32")
            p = lw.emit("softmax", [s, -1], base=f"{base}.softmax", dtype="float32")
            return lw.emit("matmul", [lw.float_ref(v), lw.emit("transpose", [p, 1, 2], dtype="float32")],
                           base=f"{base}.av", dtype="float32")
        qc, kc, vc = (lw.quantize(x, self.aq[n], f"{base}.{n}") for x, n in zip((q, k, v), "qkv"))
        (sq, zq), (sk, zk), (sv, zv) = (q_scale_zp(self.aq[n]) for n in "qkv")
        qt = lw.emit("transpose", [qc.ref, 1, 2], base=f"{base}.qt")
        kt = lw.emit("transpose", [kc.ref, 1, 2], base=f"{base}.kt")
        s = lw.emit("int_bmm", [qt, kt], {"a_zero_point": zq, "b_zero_point": zk, "a_bits": self.a_bits,
                                          "b_bits": self.a_bits},
                    {"out_scale": lw.tensor(f"{base}.qk_scale", np.array(np.float32(sq) * np.float32(sk)))},
                    base=f"{base}.qk")
        c = lw.values[node.args[0]].shape[1]
        s = lw.emit("binary", [s, float(np.float32(c ** -0.5))], {"op": "mul"}, base=f"{base}.scaled", dtype="float32")
        p = lw.emit("softmax", [s, -1], base=f"{base}.softmax", dtype="float32")
        if not self.softmax_quantized:
            vf = lw.float_ref(vc)
            return lw.emit("matmul", [vf, lw.emit("transpose", [p, 1, 2])], base=f"{base}.av", dtype="float32")
        pc = lw.quantize(Val(p), self.sq, f"{base}.p")
        sp, zp = q_scale_zp(self.sq)
        return lw.emit("int_bmm", [vc.ref, pc.ref], {"a_zero_point": zv, "b_zero_point": zp, "a_bits": self.a_bits,
                                                     "b_bits": self.sq.bits},
                       {"out_scale": lw.tensor(f"{base}.av_scale", np.array(np.float32(sv) * np.float32(sp)))},
                       base=f"{base}.av")


# --------------------------------------------------------------------------- model preparation


def eps_tensor(out):
    """The noise prediction in a model's output: a tensor, the first element of a tuple, or ``.sample``."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample") and torch.is_tensor(out.sample):
        return out.sample
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"an eps model must return a tensor, a tuple starting with one, or an object with a tensor "
                    f".sample (diffusers); got {type(out).__name__}")


class EpsModel(nn.Module):
    """``eps = model(x, t)`` as a plain tensor function (unwraps diffusers/transformers output objects)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def wrap(model: nn.Module) -> nn.Module:
        return model if isinstance(model, EpsModel) else EpsModel(model)

    def forward(self, x, t):
        return eps_tensor(self.model(x, t))

    def lower(self):
        """The integer program of this calibrated model (after :func:`calibrate`)."""
        return lower_program(self)

    def export(self, path):
        """Write the integer program to ``path``; returns it."""
        prog = lower_program(self)
        prog.save(path)
        return prog



def discover_splits(model: nn.Module, *example_inputs) -> int:
    """Mark concatenation points found at run time: a module whose input is ``torch.cat([a, b], 1)``
    gets ``qsplit = a.shape[1]`` on each direct Conv2d child reading all the channels (the diffusers
    up-block pattern). Returns the number of layers marked."""
    cats, marked = {}, 0
    real_cat = torch.cat

    def cat(tensors, dim=0, **kw):
        out = real_cat(tensors, dim, **kw)
        if dim == 1 and len(tensors) == 2:
            cats[id(out)] = (out, tensors[0].shape[1])  # the reference keeps the id from being reused
        return out

    def pre(mod, args):
        nonlocal marked
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in cats:
            for child in mod.children():
                if isinstance(child, nn.Conv2d) and child.in_channels == args[0].shape[1]:
                    child.qsplit = cats[id(args[0])][1]
                    marked += 1

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    torch.cat = cat
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        torch.cat = real_cat
        for h in hooks:
            h.remove()
    return marked


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _first_last_layers(model: nn.Module, example_inputs) -> set[str]:
    """Names of the Conv2d/Linear layers reading the model input image or producing the model output."""
    seen, hooks = {}, []

    def hook(name):
        def fn(mod, args, out):
            seen.setdefault(name, (args[0], out))  # keep the tensors alive: ids of freed tensors are reused
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            out = model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n for n, (i, o) in seen.items() if i is example_inputs[0] or o is out}


def quantize_model(model: nn.Module, cfg: QDiffConfig, example_inputs: tuple) -> nn.Module:
    """A deep copy of ``model`` with every Conv2d/Linear wrapped in :class:`QuantLayer` and every
    :class:`AttnCore` replaced by :class:`QuantAttnCore` (quantizers not yet calibrated)."""
    qmodel = copy.deepcopy(model).eval()
    edge = _first_last_layers(qmodel, example_inputs) if cfg.first_last_bits else set()
    for name, m in list(qmodel.named_modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w_bits = cfg.first_last_bits if name in edge else cfg.w_bits
            split = getattr(m, "qsplit", 0) if cfg.split else 0
            _set_module(qmodel, name, QuantLayer(m, w_bits, cfg.a_bits, split))
        elif type(m) is AttnCore:
            _set_module(qmodel, name, QuantAttnCore(cfg.a_bits, cfg.softmax_bits))
    qmodel.qconfig = cfg
    return qmodel


# --------------------------------------------------------------------------- calibration data


def generate_calibration_data(model, sampler: DDIMSampler, cali_n: int, cali_st: int, shape: tuple,
                              seed: int = 0) -> dict:
    """Timestep-aware calibration set: run the FP sampler on ``cali_n`` trajectories and keep the model
    inputs (x_t, t) at ``cali_st`` steps spread uniformly (every c-th step) over the whole trajectory,
    first and last step included. ``model`` is a torch eps model or a NumPy eps function."""
    for name, v in (("cali_n", cali_n), ("cali_st", cali_st)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    eps_fn = torch_eps_fn(EpsModel.wrap(model)) if isinstance(model, nn.Module) else model
    n_steps = len(sampler.timesteps)
    keep = np.unique(np.round(np.linspace(0, n_steps - 1, min(cali_st, n_steps))).astype(np.int64))
    xs, ts = [], []

    def record(i, t, x):
        if i in keep:
            xs.append(x.copy())
            ts.append(np.full(len(x), t, np.int64))

    sampler.sample(eps_fn, (cali_n, *shape), seed=seed, callback=record)
    return {"x": np.concatenate(xs), "t": np.concatenate(ts), "steps": keep}


# --------------------------------------------------------------------------- block reconstruction


class _Stop(Exception):
    pass


def _units(qmodel: nn.Module, example_inputs) -> list[tuple[str, nn.Module]]:
    """Reconstruction units in execution order: blocks (ResBlock/AttnBlock-like) and the layers outside them."""
    cands, inside = {}, set()
    for name, m in qmodel.named_modules():
        if any(name.startswith(b + ".") for b in inside):
            continue
        if type(m).__name__ in BLOCK_CLASS_NAMES or getattr(m, "qdiff_block", False):
            cands[name] = m
            inside.add(name)
        elif isinstance(m, QuantLayer):
            cands[name] = m
    order, hooks = [], []

    def hook(name):
        def fn(mod, args):
            if name not in order:
                order.append(name)
        return fn

    for name, m in cands.items():
        hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            qmodel(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return [(n, cands[n]) for n in order]


def _capture(model, unit, xs, ts, batch: int = 256):
    """Inputs (args) and output of ``unit`` for all calibration samples; stops each forward at the unit."""
    args_all, outs = [], []

    def hook(mod, args, out):
        args_all.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        outs.append(out.detach())
        raise _Stop

    h = unit.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for s in range(0, len(xs), batch):
                try:
                    model(xs[s:s + batch], ts[s:s + batch])
                except _Stop:
                    pass
    finally:
        h.remove()
    args = tuple(torch.cat([a[i] for a in args_all]) if isinstance(args_all[0][i], torch.Tensor) else args_all[0][i]
                 for i in range(len(args_all[0])))
    return args, torch.cat(outs)


def _rec_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels, averaged over the rest."""
    return (pred - tgt).pow(2).sum(1).mean()


def _select(args, idx):
    return tuple(a[idx] if isinstance(a, torch.Tensor) else a for a in args)


def _parts(unit: nn.Module):
    layers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
    acts = [q for m in layers for q in m.aq] + [q for m in unit.modules() if isinstance(m, QuantAttnCore)
                                                for q in m.act_quantizers()]
    return layers, acts


def _reconstruct_weights(unit, layers, args, tgt, cfg: QDiffConfig, gen) -> float:
    wqs = [q for m in layers if m.w_enabled for q in m.wq]
    for m in layers:
        if m.w_enabled:
            for q, w in zip(m.wq, m.weights()):
                q.init_adaround(w)
    opt = torch.optim.Adam([q.alpha for q in wqs], lr=cfg.weight_lr)
    warm = int(cfg.warmup * cfg.weight_iters)
    rec = 0.0
    for it in range(cfg.weight_iters):
        idx = torch.randint(0, len(tgt), (cfg.batch_size,), generator=gen)
        rec = _rec_loss(unit(*_select(args, idx)), tgt[idx])
        loss = rec
        if it >= warm:
            frac = (it - warm) / max(cfg.weight_iters - warm, 1)
            beta = cfg.b_end + (cfg.b_start - cfg.b_end) * (1 - frac)
            loss = loss + cfg.reg_weight * sum(q.reg(beta) for q in wqs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for q in wqs:
        q.soft = False
        q.alpha.requires_grad_(False)
    return float(rec.detach())


def _learn_act_scales(unit, acts, args, tgt, cfg: QDiffConfig, gen) -> None:
    params = [q.log_scale for q in acts]
    opt = torch.optim.Adam(params, lr=cfg.act_lr)
    for _ in range(cfg.act_iters):
        idx = torch.randint(0, len(tgt), (cfg.batch_size,), generator=gen)
        loss = _rec_loss(unit(*_select(args, idx)), tgt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def _unit_error(unit, args, tgt, batch: int = 256) -> float:
    return float(sum(_rec_loss(unit(*_select(args, slice(s, s + batch))), tgt[s:s + batch]) * len(tgt[s:s + batch])
                     for s in range(0, len(tgt), batch)) / len(tgt))


def _check_cali(cali) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, t) tensors of a calibration set, or ValueError naming what is wrong with ``cali``."""
    if not isinstance(cali, dict) or "x" not in cali or "t" not in cali:
        raise ValueError("cali must be a dict with 'x' (inputs) and 't' (timesteps), as generate_calibration_data returns")
    xs, ts = torch.as_tensor(np.asarray(cali["x"])), torch.as_tensor(np.asarray(cali["t"]))
    if len(xs) == 0:
        raise ValueError("cali holds no samples: the calibration set must not be empty")
    if len(xs) != len(ts):
        raise ValueError(f"cali['x'] has {len(xs)} samples but cali['t'] has {len(ts)}")
    if not xs.is_floating_point() or not torch.isfinite(xs).all():
        raise ValueError("cali['x'] must be finite floats (no NaN or inf)")
    return xs, ts


def calibrate(model: nn.Module, cali: dict, cfg: QDiffConfig, log=None) -> nn.Module:
    """Quantize ``model`` with ``cfg`` on calibration data ``cali`` ({"x", "t"} from
    :func:`generate_calibration_data`). Units are processed in execution order; each sees inputs from the
    partly quantized model and is fitted to the FP model's output (BRECQ's asymmetric reconstruction)."""
    t0 = time.time()
    xs, ts = _check_cali(cali)
    gen = torch.Generator().manual_seed(cfg.seed)
    fp = copy.deepcopy(EpsModel.wrap(model)).eval()
    for p in fp.parameters():
        p.requires_grad_(False)
    qmodel = quantize_model(fp, cfg, (xs[:2], ts[:2]))
    fp_modules = dict(fp.named_modules())
    init = "mse" if cfg.method == "qdiffusion" else "minmax"
    report = []
    for name, unit in _units(qmodel, (xs[:2], ts[:2])):
        layers, acts = _parts(unit)
        for m in layers:
            if m.w_enabled:
                for q, w in zip(m.wq, m.weights()):
                    q.init(w, init)
        args, _ = _capture(qmodel, unit, xs, ts)
        _, tgt = _capture(fp, fp_modules[name], xs, ts)
        for tensor in (*[a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()], tgt):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"non-finite activations at unit {name!r} on the calibration data "
                                 "(NaN/inf in the model's parameters or inputs)")
        entry = {"unit": name, "nearest": _unit_error(unit, args, tgt)}
        if cfg.method == "qdiffusion" and cfg.weight_iters > 0 and any(m.w_enabled for m in layers):
            _reconstruct_weights(unit, layers, args, tgt, cfg, gen)
            entry["adaround"] = _unit_error(unit, args, tgt)
        if cfg.a_bits < 32 and acts:
            sub = torch.randperm(len(tgt), generator=gen)[:cfg.init_samples]
            for q in acts:
                q.observing = True
            with torch.no_grad():
                unit(*_select(args, sub))
            for q in acts:
                q.init_from_samples(init)
                q.enabled = True
            if cfg.method == "qdiffusion" and cfg.act_iters > 0:
                _learn_act_scales(unit, acts, args, tgt, cfg, gen)
            entry["with_acts"] = _unit_error(unit, args, tgt)
        for m in layers:
            m.freeze()
        report.append(entry)
        if log:
            log(entry)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    qmodel.calib_report = {"units": report, "seconds": time.time() - t0, "config": asdict(cfg),
                           "n_samples": int(len(xs))}
    qmodel.example = (xs[:2].float(), ts[:2])
    qmodel.t_range = [0, max(int(ts.max()), 999)]
    return qmodel


# --------------------------------------------------------------------------- export


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype))


def lower_program(qmodel: nn.Module, example=None):
    """The integer program of a calibrated model (pyqsim.program.Program), by torch.export and generic lowering."""
    from .lower import capture_with_leaves, lower

    cfg: QDiffConfig = qmodel.qconfig
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer) and not m.w_enabled:
            raise ValueError(f"{name}: export needs quantized weights (w_bits <= 8)")
    x, t = example if example is not None else qmodel.example
    gm = capture_with_leaves(qmodel, (x, t), (QuantLayer, QuantAttnCore))
    quant = {"method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "softmax_bits": cfg.softmax_bits,
             "split": bool(cfg.split), "first_last_bits": cfg.first_last_bits}
    src = {"model": type(getattr(qmodel, "model", qmodel)).__name__}
    rng = getattr(qmodel, "t_range", None)
    return lower(gm, (x, t), quant=quant, source=src, input_ranges={"t": rng} if rng else None)


def export_params(qmodel: nn.Module, path) -> dict:
    """Write a calibrated model's integer program to ``path``; returns its describe() summary."""
    prog = lower_program(qmodel)
    prog.save(path)
    return prog.describe()


def calibrate_digits(out_path, w_bits: int = 4, a_bits: int = 8, method: str = "qdiffusion", cali_n: int = 64,
                     cali_st: int = 10, steps: int = 20, skip: str = "quadratic", quick: bool = False,
                     seed: int = 0) -> dict:
    """Calibrate the bundled digits UNet and export it to ``out_path`` (the CLI's ``calibrate qdiffusion``).
    ``quick`` shortens the reconstruction (100/50 iterations, 32 trajectories)."""
    from ..models.unet import load_digits_unet

    t0 = time.time()
    model = load_digits_unet()
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    cali = generate_calibration_data(model, DDIMSampler(steps=steps, skip=skip), 32 if quick else cali_n, cali_st,
                                     shape, seed=seed + 1)
    extra = {"weight_iters": 100, "act_iters": 50} if quick else {}
    qmodel = calibrate(model, cali, QDiffConfig(w_bits=w_bits, a_bits=a_bits, method=method, seed=seed, **extra))
    export_params(qmodel, out_path)
    return {"params": str(out_path), "seconds": time.time() - t0, "calib_seconds": qmodel.calib_report["seconds"],
            "cali_samples": int(len(cali["x"]))}
