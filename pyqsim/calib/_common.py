"""Fake-quantizers in PyTorch whose arithmetic follows docs/spec.md §2 (uniform) and §3 (log2/log-sqrt2).

Both calibrate themselves from the first tensor they see while ``calibrating`` is set, with a
clipping search: percentile candidates for the clipping range (optionally also the min/max range
shrunk by given ratios), each scored by the squared error of the quantized tensor, the best kept
(per channel when per-channel).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..reference.quant import SQRT2, T_HALF, T_QUARTER, T_THREE_QUARTERS, uniform_qparams

PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
WEIGHT_SHRINK = tuple(round(1.0 - 0.01 * i, 2) for i in range(1, 71))  # min/max scaled by 0.99 .. 0.30
LOG2_Q_OVER_P = 92682 / 65536  # the fixed-point sqrt(2) of the shift-based log2 attention (spec §7)


def sorted_quantile(sorted_x: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile ``q`` along the last axis of an already sorted tensor (float64)."""
    n = sorted_x.shape[-1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    a, b = sorted_x[..., lo].double(), sorted_x[..., hi].double()
    return a + (pos - lo) * (b - a)


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """[C, n] view of x with channel ``axis`` first ([1, n] when per-tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class UniformQuantizer(nn.Module):
    """Asymmetric uniform quantizer with unsigned ``bits``-bit codes, per tensor or per channel (spec §2)."""

    def __init__(self, bits: int, axis: int | None = None, percentiles=PERCENTILES, shrink=()):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {bits}")
        self.bits, self.axis, self.percentiles, self.shrink = bits, axis, tuple(percentiles), tuple(shrink)
        self.enabled = True
        self.calibrating = False
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.initialized = False

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}"

    def _shape(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.axis is None or v.dim() == 0:
            return v
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return v.reshape(shape)

    def set_params(self, scale, zero_point, axis: int | None) -> None:
        """Install float32 scale(s) and integer zero point(s) (numpy or torch)."""
        self.axis = axis
        self.scale = torch.as_tensor(np.asarray(scale, np.float32)).clone()
        self.zero_point = torch.as_tensor(np.asarray(zero_point, np.float32)).clone()
        self.initialized = True

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float32): clamp(round_half_even(fl32(x / s)), -z, qmax - z) + z."""
        s, z = self._shape(x, self.scale), self._shape(x, self.zero_point)
        return torch.minimum(torch.maximum(torch.round(x / s), -z), self.qmax - z) + z

    def dequant(self, q: torch.Tensor) -> torch.Tensor:
        return (q - self._shape(q, self.zero_point)) * self._shape(q, self.scale)

    def calibrate(self, x: torch.Tensor) -> None:
        """Clipping search: percentile ranges scored by squared error (per channel when ``axis`` is set)."""
        xc = _channels_first(x.detach().float(), self.axis)
        srt = torch.sort(xc, dim=1).values
        best_err = torch.full((xc.shape[0],), float("inf"), dtype=torch.float64)
        best_s = np.ones(xc.shape[0], np.float32)
        best_z = np.zeros(xc.shape[0], np.float32)
        lo_max, hi_max = srt[:, 0].double().numpy(), srt[:, -1].double().numpy()
        candidates = [(sorted_quantile(srt, 1.0 - p).numpy(), sorted_quantile(srt, p).numpy()) for p in self.percentiles]
        candidates += [(r * lo_max, r * hi_max) for r in self.shrink]
        for lo, hi in candidates:
            s, z, _, _ = uniform_qparams(lo, hi, self.bits, signed=False)
            st, zt = torch.from_numpy(s)[:, None], torch.from_numpy(z.astype(np.float32))[:, None]
            q = torch.minimum(torch.maximum(torch.round(xc / st), -zt), self.qmax - zt) + zt
            err = ((q - zt) * st - xc).double().pow(2).sum(dim=1)
            better = (err < best_err).numpy()
            best_err = torch.where(torch.from_numpy(better), err, best_err)
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z)
        if self.axis is None:
            best_s, best_z = best_s[0], best_z[0]
        self.set_params(best_s, best_z, self.axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating and not self.initialized:
            self.calibrate(x)
        return self.dequant(self.codes(x))


class LogQuantizer(nn.Module):
    """log2 (``mode="log2"``) or log-sqrt2 (``"sqrt2"``) quantizer of post-softmax values (spec §3).

    Code ``2**bits - 1`` is exact zero. ``shift_form`` decodes odd log-sqrt2 codes with the fixed-point
    sqrt(2) = 92682/2**16 of the shift-based integer attention (spec §7) instead of sqrt(2).
    """

    def __init__(self, bits: int, mode: str = "sqrt2", shift_form: bool = False, percentiles=PERCENTILES):
        super().__init__()
        if mode not in ("log2", "sqrt2"):
            raise ValueError(f"mode must be 'log2' or 'sqrt2', got {mode!r}")
        self.bits, self.mode, self.shift_form, self.percentiles = bits, mode, shift_form, tuple(percentiles)
        self.k = 1 if mode == "log2" else 2
        self.enabled = True
        self.calibrating = False
        self.register_buffer("delta", torch.ones(()))
        self.initialized = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, shift_form={self.shift_form}"

    def codes(self, p: torch.Tensor, delta=None) -> torch.Tensor:
        """int64 codes: round(-k*log2(p/delta)) by exact frexp thresholds; 2**bits - 1 for zero/underflow."""
        d = float(self.delta if delta is None else delta)
        r = p.double() / d
        m, e = torch.frexp(r)
        e = e.long()
        if self.k == 1:
            c = -e + (m <= T_HALF).long()
        else:
            c = -2 * e + (m <= T_QUARTER).long() + (m <= T_THREE_QUARTERS).long()
        zero_code = 2 ** self.bits - 1
        c = c.clamp_min(0)
        return torch.where((c >= zero_code) | (r == 0), torch.full_like(c, zero_code), c)

    def dequant(self, c: torch.Tensor, delta=None) -> torch.Tensor:
        d = float(self.delta if delta is None else delta)
        e = -torch.div(-c, self.k, rounding_mode="floor")
        odd = (c % 2 == 1) if self.k == 2 else torch.zeros_like(c, dtype=torch.bool)
        odd_base = torch.tensor(d * (LOG2_Q_OVER_P if self.shift_form else SQRT2), dtype=torch.float64)
        base = torch.where(odd, odd_base, torch.tensor(d, dtype=torch.float64))
        v = torch.ldexp(base, (-e).double()).float()
        return torch.where(c == 2 ** self.bits - 1, torch.zeros_like(v), v)

    def calibrate(self, p: torch.Tensor) -> None:
        """Clipping search over delta = percentiles of p, scored by squared error."""
        flat = p.detach().float().reshape(-1)
        srt = torch.sort(flat).values
        best, best_err = float(srt[-1]), float("inf")
        for pct in self.percentiles:
            d = float(np.float32(sorted_quantile(srt, pct)))
            if not d > 0:
                continue
            err = float((self.dequant(self.codes(flat, d), d) - flat).double().pow(2).sum())
            if err < best_err:
                best, best_err = d, err
        self.delta = torch.tensor(best, dtype=torch.float32)
        self.initialized = True

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return p
        if self.calibrating and not self.initialized:
            self.calibrate(p)
        return self.dequant(self.codes(p))
