"""Model cost from a parameter file: stored size and bit-operations per forward, per layer and total.

Counted from one recorded forward pass: each integer op contributes its multiply-accumulates times the
weight bits times the activation bits (the convention of the Q-Diffusion and RepQ-ViT tables); the size is
the weight parameters times the weight bits, in megabytes (10^6 bytes; the papers' "Mb" column). Only arrays
stored in the parameter file count as weights: an op whose second operand is an activation (q @ k^T, attention
times V) counts activation bits twice and no size.
"""
from __future__ import annotations

import numpy as np

from .. import ops


def _weight_bits(fmt: str) -> int:
    return 8 if fmt == "int8" else 4


def op_macs(op: str, args) -> int:
    """Multiply-accumulates of one canonical op call."""
    if op == "int_gemm":
        return args.x.shape[0] * args.w.shape[0] * args.k
    if op == "int_conv2d":
        b, c = args.x.shape[:2]
        kk = c // args.groups * args.kernel_size[0] * args.kernel_size[1]
        return b * args.w.shape[0] * args.out_hw[0] * args.out_hw[1] * kk
    if op == "split_gemm":
        return op_macs("int_gemm", args.a) + op_macs("int_gemm", args.b)
    if op == "split_conv2d":
        return op_macs("int_conv2d", args.a) + op_macs("int_conv2d", args.b)
    if op == "log2_attn_matmul":
        return args.codes.shape[0] * args.codes.shape[1] * args.v.shape[1]
    return 0


def _weights(op: str, args) -> list:
    if op in ("int_gemm", "int_conv2d"):
        return [args]
    if op in ("split_gemm", "split_conv2d"):
        return [args.a, args.b]
    return []


def program_cost(program, a_bits: int, n: int = 1) -> dict:
    """Per-layer and total MACs, bit-operations and weight size of ``program`` for a batch of one."""
    stored = {id(v) for v in getattr(program, "t", {}).values()}
    with ops.record() as calls:
        program.run(program.example_inputs(n), backend="reference")
    layers, seen = [], set()
    for scope_name, op, args, _ in calls:
        macs = op_macs(op, args) // n
        if macs == 0:
            continue
        ws = [w for w in _weights(op, args) if id(w.w) in stored or not stored]
        w_bits = _weight_bits(ws[0].w_format) if ws else a_bits
        params = 0
        for w in ws:
            key = id(w.w)
            if key not in seen:  # weights shared across heads or calls count once
                seen.add(key)
                rows = w.w.shape[0]
                kk = w.k if hasattr(w, "k") else w.x.shape[1] // w.groups * w.kernel_size[0] * w.kernel_size[1]
                params += rows * kk
        layers.append({"layer": scope_name, "op": op, "macs": macs, "w_bits": w_bits, "a_bits": a_bits,
                       "bitops": macs * w_bits * a_bits, "weight_params": params, "size_mb": params * w_bits / 8e6})
    total = {
        "macs": int(sum(l["macs"] for l in layers)),
        "bitops": int(sum(l["bitops"] for l in layers)),
        "weight_params": int(sum(l["weight_params"] for l in layers)),
        "size_mb": float(sum(l["size_mb"] for l in layers)),
    }
    total["gbitops"] = total["bitops"] / 1e9
    return {"layers": layers, "total": total}
