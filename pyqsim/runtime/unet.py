"""Integer execution of a Q-Diffusion UNet parameter file (NumPy + pyqsim.ops; no PyTorch).

Every conv, linear and attention matmul runs on the integer ops (split-shortcut layers on
``split_conv2d``); GroupNorm, SiLU, softmax, residual adds and the DDIM update run in float32 NumPy
(spec §9). Files with unquantized activations (A32) keep integer weight codes but cannot use the
8-bit kernels: their weights are dequantized once (spec §2) and the layers run in float32.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .. import ops
from ..models.ddim import DDIMSampler
from .paramfile import load_params

GRAPH = "qdiffusion-unet"  # meta["model"]["graph"] of the files this runner reads


def group_norm(x: np.ndarray, groups: int, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    b, c = x.shape[:2]
    g = x.reshape(b, groups, -1)
    mean = g.mean(axis=2, keepdims=True, dtype=np.float32)
    var = ((g - mean) ** 2).mean(axis=2, keepdims=True, dtype=np.float32)
    y = ((g - mean) / np.sqrt(var + np.float32(eps))).reshape(x.shape)
    return (y * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (x / (np.float32(1) + np.exp(-x))).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def timestep_embedding(t: np.ndarray, dim: int) -> np.ndarray:
    half = dim // 2
    freq = np.exp(np.arange(half) * (-math.log(10000.0) / (half - 1))).astype(np.float32)
    arg = t.astype(np.float32)[:, None] * freq[None, :]
    emb = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)


def conv2d_f32(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, padding: int) -> np.ndarray:
    """Float32 NCHW convolution (im2col + matmul), groups = 1."""
    o, c, kh, kw = w.shape
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    bsz, _, oh, ow = win.shape[:4]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(bsz * oh * ow, c * kh * kw)
    y = (cols @ w.reshape(o, -1).T).reshape(bsz, oh, ow, o).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y + b.reshape(1, -1, 1, 1) if b is not None else y, dtype=np.float32)


def _to_int8(codes: np.ndarray, zp: int) -> tuple[np.ndarray, int]:
    """uint8 codes as int8 with the same real values (codes and zero point shifted by -128)."""
    return (codes.astype(np.int16) - 128).astype(np.int8), zp - 128


class IntUNet:
    """Runs ``eps = model(x, t)`` from an exported parameter file with the integer ops of ``backend``."""

    def __init__(self, tensors: dict, meta: dict, backend: str = "auto"):
        model = meta.get("model")
        if not isinstance(model, dict) or model.get("graph") != GRAPH:
            raise ValueError(f"not a Q-Diffusion UNet parameter file (model {model!r})")
        if not meta["config"]["resamp_with_conv"]:
            raise ValueError("the integer runner needs resamp_with_conv=True")
        self.t, self.meta, self.backend = tensors, meta, backend
        self.cfg = meta["config"]
        self.layers, self.attn = meta["layers"], meta["attn"]
        self.integer = meta["quant"]["a_bits"] <= 8
        self.op_counts: Counter = Counter()
        self._float_w = {} if self.integer else {n: self._dequant_weight(n) for n in self.layers}

    @classmethod
    def load(cls, path, backend: str = "auto") -> "IntUNet":
        tensors, meta = load_params(path)
        return cls(tensors, meta, backend)

    # ------------------------------------------------------------------ layers

    def _codes(self, name: str, i: int) -> np.ndarray:
        """Unpacked weight codes of part ``i`` as int8 in the layer's weight shape."""
        L, w = self.layers[name], self.t[f"{name}.w{i}"]
        shape = L["w_shapes"][i]
        if L["w_format"] == "int8":
            return w
        return ops.unpack_int4(w, int(np.prod(shape[1:])), signed=True).reshape(shape)

    def _dequant_weight(self, name: str) -> np.ndarray:
        parts = []
        for i in range(len(self.layers[name]["w_shapes"])):
            q = self._codes(name, i)
            parts.append(ops.dequantize(q, self.t[f"{name}.w{i}_scale"], self.t[f"{name}.w{i}_zp"], axis=0))
        return np.concatenate(parts, axis=1)

    def _op(self, name: str, *args, **kw):
        self.op_counts[name] += 1
        return getattr(ops, name)(*args, backend=self.backend, **kw)

    def layer(self, name: str, x: np.ndarray) -> np.ndarray:
        """One Conv2d/Linear: quantize the input (each half separately when split), integer op, float32 out."""
        with ops.scope(name):
            return self._layer(name, x)

    def _layer(self, name: str, x: np.ndarray) -> np.ndarray:
        L = self.layers[name]
        conv = L["kind"] == "conv"
        pad = L.get("pad")
        if not self.integer:
            if pad:
                x = np.pad(x, ((0, 0), (0, 0), (pad[2], pad[3]), (pad[0], pad[1])))
            b = self.t.get(f"{name}.bias")
            w = self._float_w[name]
            if conv:
                return conv2d_f32(x, w, b, L["stride"], L["padding"])
            return (x @ w.T + (b if b is not None else 0)).astype(np.float32)
        halves = [x] if not L["split"] else [x[:, :L["split"]], x[:, L["split"]:]]
        codes = []
        for h, (s, z) in zip(halves, L["x"]):
            q = self._op("quantize", np.ascontiguousarray(h), s, z, "uint8")
            if pad:
                q = np.pad(q, ((0, 0), (0, 0), (pad[2], pad[3]), (pad[0], pad[1])), constant_values=z)
            codes.append(q)
        ws = [self.t[f"{name}.w{i}"] for i in range(len(codes))]
        zws = [self.t[f"{name}.w{i}_zp"] for i in range(len(codes))]
        out_scales = [np.float32(s) * self.t[f"{name}.w{i}_scale"] for i, (s, _) in enumerate(L["x"])]
        fmt = L["w_format"]
        kw = dict(kernel_size=L["w_shapes"][0][2:]) if conv and fmt != "int8" else {}
        bias = self.t.get(f"{name}.bias")
        if len(codes) == 2:
            op = "split_conv2d" if conv else "split_gemm"
            geo = dict(stride=L["stride"], padding=L["padding"], **kw) if conv else {}
            return self._op(op, codes[0], ws[0], codes[1], ws[1], x1_zero_point=L["x"][0][1],
                            x2_zero_point=L["x"][1][1], w1_zero_point=zws[0], w2_zero_point=zws[1], bias=bias,
                            w1_format=fmt, w2_format=fmt, out_dtype="float32", out_scale1=out_scales[0],
                            out_scale2=out_scales[1], **geo)
        if conv:
            return self._op("int_conv2d", codes[0], ws[0], stride=L["stride"], padding=L["padding"],
                            x_zero_point=L["x"][0][1], w_zero_point=zws[0], bias=bias, w_format=fmt,
                            out_dtype="float32", out_scale=out_scales[0], **kw)
        return self._op("int_gemm", codes[0], ws[0], x_zero_point=L["x"][0][1], w_zero_point=zws[0], bias=bias,
                        w_format=fmt, out_dtype="float32", out_scale=out_scales[0])

    def norm(self, name: str, x: np.ndarray) -> np.ndarray:
        return group_norm(x, self.cfg["num_groups"], self.t[f"{name}.weight"], self.t[f"{name}.bias"])

    # ------------------------------------------------------------------ blocks

    def resblock(self, name: str, x: np.ndarray, temb: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
        if skip is not None:
            x = np.concatenate([x, skip], axis=1)
        h = self.layer(f"{name}.conv1", silu(self.norm(f"{name}.norm1", x)))
        h = h + self.layer(f"{name}.temb_proj", silu(temb))[:, :, None, None]
        h = self.layer(f"{name}.conv2", silu(self.norm(f"{name}.norm2", h)))
        if f"{name}.nin_shortcut" in self.layers:
            x = self.layer(f"{name}.nin_shortcut", x)
        return (x + h).astype(np.float32)

    def bmm(self, a: np.ndarray, za: int, b: np.ndarray, zb: int, out_scale: np.float32) -> np.ndarray:
        """Float32 ``out[i] = s * (a[i] - za) @ (b[i] - zb).T`` for uint8 a [B, M, K] and int8 b [B, N, K], all
        images in one integer op: a 1x1 ``int_conv2d`` with groups = B (a batched int GEMM)."""
        bsz, m, k = a.shape
        n = b.shape[1]
        x = np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(1, bsz * k, m, 1)
        out = self._op("int_conv2d", x, np.ascontiguousarray(b).reshape(bsz * n, k, 1, 1), groups=bsz,
                       x_zero_point=za, w_zero_point=zb, out_dtype="float32", out_scale=out_scale)
        return out.reshape(bsz, n, m).transpose(0, 2, 1)

    def attention(self, name: str, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """softmax(q^T k / sqrt(C)) applied to v for [B, C, N] inputs."""
        A = self.attn[name]
        scale = np.float32(q.shape[1] ** -0.5)
        if not self.integer:
            p = softmax(np.matmul(q.transpose(0, 2, 1), k) * scale)
            return np.matmul(v, p.transpose(0, 2, 1)).astype(np.float32)
        qc = self._op("quantize", np.ascontiguousarray(q.transpose(0, 2, 1)), *A["q"], "uint8")
        kc, zk = _to_int8(self._op("quantize", np.ascontiguousarray(k.transpose(0, 2, 1)), *A["k"], "uint8"), A["k"][1])
        p = softmax(self.bmm(qc, A["q"][1], kc, zk, np.float32(A["q"][0]) * np.float32(A["k"][0])) * scale)
        if A["p"] is None:  # softmax kept in float (> 8 bits): v dequantized, float matmul
            vf = self._op("dequantize", self._op("quantize", v, *A["v"], "uint8"), *A["v"])
            return np.matmul(vf, p.transpose(0, 2, 1)).astype(np.float32)
        pc = self._op("quantize", p, A["p"][0], 0, "uint8")
        vc, zv = _to_int8(self._op("quantize", np.ascontiguousarray(v), *A["v"], "uint8"), A["v"][1])
        out = self.bmm(pc, 0, vc, zv, np.float32(A["p"][0]) * np.float32(A["v"][0]))
        return np.ascontiguousarray(out.transpose(0, 2, 1))

    def attnblock(self, name: str, x: np.ndarray) -> np.ndarray:
        b, c, hh, ww = x.shape
        h = self.norm(f"{name}.norm", x)
        q, k, v = (self.layer(f"{name}.{n}", h).reshape(b, c, hh * ww) for n in "qkv")
        with ops.scope(f"{name}.core"):
            out = self.attention(f"{name}.core", q, k, v).reshape(b, c, hh, ww)
        return (x + self.layer(f"{name}.proj_out", out)).astype(np.float32)

    # ------------------------------------------------------------------ model

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        x = np.asarray(x, np.float32)
        temb = timestep_embedding(np.asarray(t), cfg["ch"])
        temb = self.layer("temb_dense.1", silu(self.layer("temb_dense.0", temb)))
        hs = [self.layer("conv_in", x)]
        levels = len(cfg["ch_mult"])
        for i in range(levels):
            for j in range(cfg["num_res_blocks"]):
                h = self.resblock(f"down.{i}.block.{j}", hs[-1], temb)
                if f"down.{i}.attn.{j}.core" in self.attn:
                    h = self.attnblock(f"down.{i}.attn.{j}", h)
                hs.append(h)
            if i != levels - 1:
                hs.append(self.layer(f"down.{i}.downsample.conv", hs[-1]))
        h = self.resblock("mid.block_1", hs[-1], temb)
        h = self.resblock("mid.block_2", self.attnblock("mid.attn_1", h), temb)
        for i in reversed(range(levels)):
            for j in range(cfg["num_res_blocks"] + 1):
                h = self.resblock(f"up.{i}.block.{j}", h, temb, hs.pop())
                if f"up.{i}.attn.{j}.core" in self.attn:
                    h = self.attnblock(f"up.{i}.attn.{j}", h)
            if i != 0:
                h = np.repeat(np.repeat(h, 2, axis=2), 2, axis=3)
                h = self.layer(f"up.{i}.upsample.conv", h)
        return self.layer("conv_out", silu(self.norm("norm_out", h)))

    def run(self, inputs: tuple, backend: str | None = None) -> np.ndarray:
        """eps for ``inputs = (x [B,C,H,W] float32, t [B] int)`` on ``backend`` (default: the one given at load)."""
        if backend is not None:
            self.backend = backend
        return self(*inputs)

    def example_inputs(self, n: int, seed: int = 0) -> tuple:
        """(x_t ~ N(0, I), t uniform in [0, 1000)) for ``n`` samples."""
        rng = np.random.default_rng(seed)
        c, r = self.cfg["in_channels"], self.cfg["resolution"]
        return rng.standard_normal((n, c, r, r), dtype=np.float32), rng.integers(0, 1000, n)

    def cost(self) -> dict:
        """Size (MB, all parameters at the weight bits) and Gbit-ops per forward from the file's layer table."""
        from ..eval.cost import summarize
        q = self.meta["quant"]
        return summarize(self.meta["cost_layers"], self.meta["n_params"], q["w_bits"], q["a_bits"], q["softmax_bits"])

    def describe(self) -> str:
        q = self.meta["quant"]
        n_split = sum(1 for L in self.layers.values() if L["split"])
        return (f"Q-Diffusion UNet ({q['method']}) W{q['w_bits']}A{q['a_bits']}, softmax {q['softmax_bits']} bits, "
                f"{len(self.layers)} conv/linear layers ({n_split} split-shortcut), {len(self.attn)} attention cores; "
                f"{'integer' if self.integer else 'float (A32: dequantized integer weights)'} execution")

    def sample(self, n: int, sampler: DDIMSampler, seed: int = 0, batch_size: int = 1000) -> np.ndarray:
        """DDIM samples [n, C, H, W] with this integer model (float32 NumPy update)."""
        cfg = self.cfg

        def eps(x, t):
            return np.concatenate([self(x[s:s + batch_size], t[s:s + batch_size]) for s in range(0, len(x), batch_size)])

        return sampler.sample(eps, (n, cfg["in_channels"], cfg["resolution"], cfg["resolution"]), seed=seed)


def load_program(tensors: dict, meta: dict) -> IntUNet:
    """Entry point of the runtime loader registry (``pyqsim.runtime.load``)."""
    return IntUNet(tensors, meta)
