"""Program cost: stored size and bit-operations per forward, per node and total (no PyTorch).

Counted from one run of the program on its example inputs, per sample: each integer node contributes its
multiply-accumulates times the bits of its two operands' codes (the convention of the Q-Diffusion and RepQ-ViT
tables); a product the calibration left in float counts at 32 x 32 bits. The size is each stored weight's
elements times the bits its codes use, in megabytes (10^6 bytes); float constants count at 32 bits.
"""
from __future__ import annotations

import numpy as np

from ..program.schema import decode_literal, is_ref

PRODUCTS = ("int_gemm", "int_conv2d", "split_gemm", "split_conv2d", "int_bmm", "log2_attn_matmul",
            "matmul", "linear", "conv2d", "sdpa")


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _node_macs(kind: str, args: list, out, attrs: dict) -> tuple[int, int, int, int]:
    """(MACs, operand-1 bits, operand-2 bits, stored weight elements) of one node on its actual inputs."""
    xb, wb = attrs.get("x_bits", 8), attrs.get("w_bits", 8)
    if kind == "int_gemm":
        k = args[0].shape[-1]
        return _prod(out.shape) * k, xb, wb, out.shape[-1] * k
    if kind in ("int_conv2d", "split_conv2d"):
        kh, kw = attrs.get("kernel_size", [1, 1])
        c = sum(a.shape[1] for a in args) // attrs.get("groups", 1)
        return _prod(out.shape) * c * kh * kw, xb, wb, out.shape[1] * c * kh * kw
    if kind == "split_gemm":
        k = args[0].shape[-1] + args[1].shape[-1]
        return _prod(out.shape) * k, xb, wb, out.shape[-1] * k
    if kind == "int_bmm":
        return _prod(out.shape) * args[0].shape[-1], attrs.get("a_bits", 8), attrs.get("b_bits", 8), 0
    if kind == "log2_attn_matmul":
        return _prod(out.shape) * args[0].shape[-1], attrs["bits"], attrs.get("v_bits", 8), 0
    if kind in ("matmul", "linear"):
        return _prod(out.shape) * args[0].shape[-1], 32, 32, 0
    if kind == "conv2d":
        return _prod(out.shape) * _prod(args[1].shape[1:]), 32, 32, 0
    if kind == "sdpa":
        q, k, v = args[:3]
        return _prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1]), 32, 32, 0
    return 0, 0, 0, 0


def program_cost(program, n: int = 1) -> dict:
    """Per-node and total MACs, bit-operations and weight size of ``program`` per sample."""
    ex = program.example_inputs()
    ex = {k: v[:n] for k, v in ex.items()}
    batch = min((len(v) for v in ex.values() if v.ndim), default=1)
    _, env = program.execute((), ex, backend="auto", keep=True)
    layers = []
    for node in program.nodes:
        kind = node["kind"]
        if kind not in PRODUCTS:
            continue
        args = [env[a["@"]] for a in node.get("args", []) if is_ref(a)]
        attrs = {k: decode_literal(v) for k, v in node.get("attrs", {}).items()}
        macs, b1, b2, params = _node_macs(kind, args, env[node["name"]], attrs)
        macs //= max(batch, 1)
        layers.append({"node": node["name"], "layer": node.get("scope") or node["name"], "op": kind, "macs": int(macs),
                       "w_bits": int(b2), "a_bits": int(b1), "bitops": int(macs) * int(b1) * int(b2),
                       "weight_params": params, "size_mb": params * b2 / 8e6})
    float_params = sum(program.tensors[v].size for node in program.nodes if node["kind"] == "constant"
                       for v in node.get("tensors", {}).values() if program.tensors[v].dtype.kind == "f")
    total = {"macs": int(sum(l["macs"] for l in layers)), "bitops": int(sum(l["bitops"] for l in layers)),
             "weight_params": int(sum(l["weight_params"] for l in layers)),
             "size_mb": float(sum(l["size_mb"] for l in layers)), "float_params": int(float_params),
             "float_size_mb": float_params * 32 / 8e6}
    total["gbitops"] = total["bitops"] / 1e9
    total["gmacs"] = total["macs"] / 1e9
    return {"layers": layers, "total": total}

