"""Integer execution of an exported RepQ-ViT model (NumPy + pyqsim.ops; no PyTorch).

The parameter file's metadata holds the layer graph: a list of steps, each reading and writing named
registers. Every Linear, the patch-embedding convolution and both attention matmuls run as integer ops
(``ops.int_gemm``, ``ops.int_conv2d``, ``ops.log2_attn_matmul``) on the chosen backend; LayerNorm,
softmax, GELU and residual adds run in float32 NumPy between them (spec §9).
"""
from __future__ import annotations

import numpy as np

from .. import ops
from .paramfile import load_params

GRAPH = "repq-vit/1"


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (Numerical Recipes erfc Chebyshev fit, relative error < 1.2e-7)."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, erf form, result in float32."""
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / np.sqrt(2.0)))).astype(np.float32)


def layernorm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis in float32."""
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    d = x - mean
    var = (d * d).mean(axis=-1, keepdims=True, dtype=np.float32)
    return (d / np.sqrt(var + np.float32(eps)) * weight + bias).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _as_int8_operand(codes: np.ndarray, zero_point: int, bits: int):
    """Unsigned activation codes as an int8 GEMM weight operand (shifted by -128 at 8 bits)."""
    if bits == 8:
        return (codes.astype(np.int16) - 128).astype(np.int8), zero_point - 128
    return codes.view(np.int8), zero_point


class IntViT:
    """A loaded RepQ-ViT parameter file, runnable on any backend (the runtime program of kind "vit")."""

    def __init__(self, tensors: dict, meta: dict):
        model = meta.get("model")
        if not isinstance(model, dict) or model.get("kind") != "vit" or meta.get("graph") != GRAPH:
            raise ValueError(f"not a RepQ-ViT parameter file (model {model!r}, graph {meta.get('graph')!r})")
        cfg = meta.get("config")
        if not isinstance(cfg, dict):
            raise ValueError("RepQ-ViT parameter file lacks its config")
        for name in ("w_bits", "a_bits", "input_bits"):
            v = cfg.get(name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise ValueError(f"parameter file config {name} must be an integer in [2, 8], got {v!r}")
        self.t, self.meta, self.steps = tensors, meta, meta["steps"]

    @classmethod
    def load(cls, path) -> "IntViT":
        return cls(*load_params(path))

    def _scalar(self, name):
        return self.t[name][()]

    def _linear(self, step, x: np.ndarray, backend: str) -> np.ndarray:
        n, t = step["name"], self.t
        lead, k = x.shape[:-1], x.shape[-1]
        kw = dict(x_zero_point=int(self._scalar(f"{n}.x_zero_point")), w_zero_point=t[f"{n}.w_zero_point"],
                  bias=t[f"{n}.bias"], w_format=step["w_format"], backend=backend)
        if step["kind"] == "float32":
            y = ops.int_gemm(x.reshape(-1, k), t[f"{n}.weight"], out_dtype="float32", out_scale=t[f"{n}.out_scale"], **kw)
        else:
            y = ops.int_gemm(x.reshape(-1, k), t[f"{n}.weight"], out_dtype="uint8", multiplier=t[f"{n}.multiplier"],
                             shift=t[f"{n}.shift"], out_zero_point=int(self._scalar(f"{n}.out_zero_point")), **kw)
            y = np.minimum(y, 2 ** step["bits"] - 1)  # b-bit codes in the uint8 container
        return y.reshape(*lead, -1)

    def _attention(self, step, q, k, v, backend: str) -> np.ndarray:
        n, t, bits, heads = step["name"], self.t, step["bits"], step["heads"]
        b, _, c = q.shape
        d = c // heads
        zq, zk, zv = (int(self._scalar(f"{n}.{s}.zero_point")) for s in "qkv")
        qk_scale, delta = t[f"{n}.qk.out_scale"], float(self._scalar(f"{n}.p.delta"))
        av = dict(v_zero_point=zv, bits=bits, mode=step["mode"], frac_bits=step["frac_bits"], out_dtype="uint8",
                  multiplier=t[f"{n}.av.multiplier"], shift=t[f"{n}.av.shift"],
                  out_zero_point=int(self._scalar(f"{n}.av.out_zero_point")), backend=backend)
        out = np.empty_like(q)
        for i in range(b):
            for h in range(heads):
                cols = slice(h * d, (h + 1) * d)
                kw, zkw = _as_int8_operand(np.ascontiguousarray(k[i, :, cols]), zk, bits)
                with ops.scope(f"qk.h{h}"):
                    s = ops.int_gemm(np.ascontiguousarray(q[i, :, cols]), kw, x_zero_point=zq, w_zero_point=zkw,
                                     out_dtype="float32", out_scale=qk_scale, backend=backend)
                p = ops.quantize_log(softmax(s), delta, bits, step["mode"])
                with ops.scope(f"av.h{h}"):
                    o = ops.log2_attn_matmul(p, np.ascontiguousarray(v[i, :, cols]), **av)
                out[i, :, cols] = np.minimum(o, 2 ** bits - 1)
        return out

    def run(self, images: np.ndarray, backend: str = "auto") -> np.ndarray:
        """Float32 logits of float32 images [B, C, H, W]; integer ops on ``backend``."""
        t = self.t
        m = self.meta["model"]
        want = (m["in_chans"], m["img_size"], m["img_size"])
        if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != want:
            raise ValueError(f"images must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {np.shape(images)}")
        reg = {"image": np.ascontiguousarray(images, dtype=np.float32)}
        for step in self.steps:
            op, n, src = step["op"], step.get("name"), step["in"]
            x = reg[src] if isinstance(src, str) else [reg[s] for s in src]
            with ops.scope(n or op):
                if op == "quantize":
                    y = ops.quantize(x, t[f"{n}.scale"][()], int(self._scalar(f"{n}.zero_point")), "uint8",
                                     bits=step["bits"])
                elif op == "patch_embed":
                    y = ops.int_conv2d(x, t[f"{n}.weight"], stride=step["patch"],
                                       x_zero_point=int(self._scalar(f"{n}.x_zero_point")),
                                       w_zero_point=t[f"{n}.w_zero_point"], bias=t[f"{n}.bias"],
                                       w_format=step["w_format"], kernel_size=step["patch"], out_dtype="float32",
                                       out_scale=t[f"{n}.out_scale"], backend=backend)
                    y = y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 2, 1)
                    cls = np.broadcast_to(t["cls_token"], (y.shape[0], 1, y.shape[2]))
                    y = (np.concatenate([cls, y], axis=1) + t["pos_embed"]).astype(np.float32)
                elif op == "layernorm":
                    y = layernorm(x, t[f"{n}.weight"], t[f"{n}.bias"], step["eps"])
                elif op == "linear":
                    y = self._linear(step, x, backend)
                elif op == "attention":
                    y = self._attention(step, *x, backend)
                elif op == "gelu":
                    y = gelu(x)
                elif op == "add":
                    y = (x[0] + x[1]).astype(np.float32)
                elif op == "select_token":
                    y = np.ascontiguousarray(x[:, step["index"]])
                else:
                    raise ValueError(f"unknown step op {op!r}")
            reg[step["out"]] = y
        return reg["logits"]

    def example_inputs(self, n: int = 8) -> np.ndarray:
        """The example images stored at export (repeated if fewer than n), else seeded uniform noise."""
        if "examples.images" in self.t:
            ex = self.t["examples.images"]
            return np.ascontiguousarray(np.resize(ex, (n,) + ex.shape[1:]))
        m = self.meta["model"]
        shape = (n, m["in_chans"], m["img_size"], m["img_size"])
        return np.random.default_rng(0).random(shape, dtype=np.float32)

    def describe(self) -> dict:
        """Model, bit widths and the integer layers with their weight formats."""
        cfg = self.meta["config"]
        return {"kind": "vit", "graph": GRAPH, "model": self.meta["model"],
                "w_bits": cfg["w_bits"], "a_bits": cfg["a_bits"], "input_bits": cfg["input_bits"],
                "post_ln": cfg["post_ln"], "softmax": cfg["softmax"],
                "layers": [{k: s[k] for k in ("name", "op", "w_format", "kind", "mode") if k in s}
                           for s in self.steps if s["op"] in ("patch_embed", "linear", "attention")]}


def load_program(tensors: dict, meta: dict) -> IntViT:
    """Runtime registry entry point (pyqsim.runtime.load)."""
    return IntViT(tensors, meta)
