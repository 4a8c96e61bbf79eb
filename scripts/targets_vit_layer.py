"""Measure one W8A8 layer of the bundled digits ViT under every numerics profile (docs/targets.md).

The layer is ``blocks[0].mlp.fc1`` (64 -> 128) on the test split's tokens. Activations: uint8, asymmetric per
tensor from their min/max; weights: int8, symmetric per output channel (restricted range); bias int32 at
``s_x * s_w``; output: uint8, asymmetric per tensor from the float output's min/max. Each profile quantizes the
float input itself and requantizes with its own parameters; "exact" is the correctly rounded (half even) code of
the exact rational ``acc * s_x * s_w / s_y`` with the same float32 scales and pyqsim's input codes.

Run: python scripts/targets_vit_layer.py
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

from pyqsim import ops
from pyqsim.models.vit import digits_split, digits_vit
from pyqsim.numerics import NAMES
from pyqsim.reference import uniform_qparams


def layer_input(model) -> tuple[np.ndarray, torch.nn.Linear]:
    fc1 = model.blocks[0].mlp.fc1
    seen = []
    hook = fc1.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    _, _, x_test, _ = digits_split()
    with torch.no_grad():
        model(torch.from_numpy(x_test))
    hook.remove()
    x = seen[0].reshape(-1, fc1.in_features).numpy().astype(np.float32)
    return x, fc1


def exact_codes(acc: np.ndarray, sx, sw: np.ndarray, sy, zy: int) -> np.ndarray:
    """round_half_even(acc * sx * sw[n] / sy) + zy, clamped to uint8, in exact rational arithmetic."""
    r = [Fraction(float(sx)) * Fraction(float(s)) / Fraction(float(sy)) for s in sw]
    out = np.empty(acc.shape, np.int64)
    for (i, j), a in np.ndenumerate(acc):
        v = int(a) * r[j]
        out[i, j] = round(v)  # Python's round of a Fraction: ties to even
    return np.clip(out + zy, 0, 255)


def main() -> None:
    model = digits_vit()
    x, fc1 = layer_input(model)
    w = fc1.weight.detach().numpy().astype(np.float32)
    b = fc1.bias.detach().numpy().astype(np.float32)
    y_float = x @ w.T + b

    sx, zx, _, _ = uniform_qparams(x.min(), x.max(), 8, signed=False)
    sw, _, _, _ = uniform_qparams(np.abs(w).max(axis=1) * -1, np.abs(w).max(axis=1), 8, symmetric=True)
    sy, zy, _, _ = uniform_qparams(y_float.min(), y_float.max(), 8, signed=False)
    sx, zx, sy, zy = np.float32(sx), int(zx), np.float32(sy), int(zy)
    wq = ops.quantize(w, sw, 0, "int8", axis=0, narrow=True)
    bias = np.rint(b.astype(np.float64) / (np.float64(sx) * sw.astype(np.float64))).astype(np.int32)

    xq_ref = ops.quantize(x, sx, zx, "uint8")
    acc = ops.int_gemm(xq_ref, wq, x_zero_point=zx, bias=bias).astype(np.int64)
    exact = exact_codes(acc, sx, sw, sy, zy)
    print(f"layer blocks[0].mlp.fc1: x {x.shape} uint8, w {w.shape} int8 per channel, {exact.size} outputs")

    def run(xq, numerics):
        m, s = ops.quantize_multiplier(ops.requant_scale(sx, sw, sy, numerics=numerics), numerics=numerics)
        return ops.int_gemm(xq, wq, x_zero_point=zx, bias=bias, out_dtype="uint8", multiplier=m, shift=s,
                            out_zero_point=zy, numerics=numerics).astype(np.int64)

    base = run(xq_ref, "pyqsim")
    rows = []
    for p in NAMES:
        xq = ops.quantize(x, sx, zx, "uint8", numerics=p)
        d_exact = run(xq_ref, p) - exact
        d_pyqsim = run(xq, p) - base
        rows.append((p, int(np.count_nonzero(xq != xq_ref)), int(np.count_nonzero(d_exact)), int(np.abs(d_exact).max()),
                     int(np.count_nonzero(d_pyqsim)), int(np.abs(d_pyqsim).max())))
    print("| profile | input codes != pyqsim's | outputs != exact (same input) | max abs | outputs != pyqsim "
          "(own input) | max abs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
