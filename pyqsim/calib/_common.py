"""Fake-quantizers in PyTorch whose arithmetic follows docs/spec.md §2 (uniform) and §3 (log2/log-sqrt2).

Both calibrate themselves from the first tensor they see while ``calibrating`` is set, with a
clipping search: percentile candidates for the clipping range (optionally also the min/max range
shrunk by given ratios), each scored by the squared error of the quantized tensor (on at most
SCORE_MAX evenly strided elements), the best kept (per channel when per-channel).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..reference.quant import SQRT2, T_HALF, T_QUARTER, T_THREE_QUARTERS, uniform_qparams

PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)
SCORE_MAX = 1 << 20  # candidates are scored on at most this many evenly strided elements
WEIGHT_SHRINK = (0.9, 0.8, 0.7, 0.6, 0.5)  # min/max ranges shrunk, extra weight candidates
LOG2_Q_OVER_P = 92682 / 65536  # the fixed-point sqrt(2) of the shift-based log2 attention (spec §7)


def tail_quantiles(xc: torch.Tensor, pcts) -> dict:
    """{p: (q(1-p), q(p))} per row of [C, n], float64 numpy, linearly interpolated like torch.quantile.

    Reads only the tails (top-k), so the cost does not grow with a full sort.
    """
    n = xc.shape[1]
    k = min(n, int(math.ceil((1.0 - min(pcts)) * (n - 1))) + 2)
    top = torch.topk(xc, k, dim=1, largest=True, sorted=True).values.double()
    bot = torch.topk(xc, k, dim=1, largest=False, sorted=True).values.double()

    def at(rank: int):
        return bot[:, rank] if rank < k else top[:, n - 1 - rank]

    def quantile(q: float):
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        a, b = at(lo), at(min(lo + 1, n - 1))
        return (a + (pos - lo) * (b - a)).numpy()

    return {p: (quantile(1.0 - p), quantile(p)) for p in pcts}


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: non-finite values (NaN or inf) in the tensor it calibrates on")


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
        self.name = "quantizer"  # set to the module path by the calibration driver, for error messages
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
        """Clipping search: candidate ranges scored by squared error (per channel when ``axis`` is set).

        The chosen parameters follow spec §2.1.
        """
        _check_finite(x, self.name)
        xc = _channels_first(x.detach().float(), self.axis).contiguous()
        lo_max, hi_max = xc.min(dim=1).values.double().numpy(), xc.max(dim=1).values.double().numpy()
        candidates = list(tail_quantiles(xc, self.percentiles).values())
        candidates += [(r * lo_max, r * hi_max) for r in self.shrink]
        xc = xc[:, ::-(-xc.numel() // SCORE_MAX)].contiguous()
        best_err = torch.full((xc.shape[0],), float("inf"))
        best_s = np.ones(xc.shape[0], np.float32)
        best_z = np.zeros(xc.shape[0], np.int32)
        for lo, hi in candidates:
            s, z, _, _ = uniform_qparams(lo, hi, self.bits, signed=False)
            st, zt = torch.from_numpy(s)[:, None], torch.from_numpy(z.astype(np.float32))[:, None]
            err = (xc / st).round_().clamp_(-zt, self.qmax - zt).mul_(st).sub_(xc).square_().sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = np.where(better.numpy(), s, best_s)
            best_z = np.where(better.numpy(), z, best_z)
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
        self.name = "quantizer"
        self.enabled = True
        self.calibrating = False
        self.register_buffer("delta", torch.ones(()))
        self.initialized = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, shift_form={self.shift_form}"

    def _boundaries(self) -> torch.Tensor:
        """Ascending float64 B_j, j = Z..1: the largest doubles below 2^(-(j - 1/2)/k), so c >= j iff r <= B_j."""
        bounds = []
        for j in range(1, 2 ** self.bits):
            if self.k == 1:  # 2^-(j - 1/2) = 2^-(j-1) * 2^(-1/2)
                bounds.append(math.ldexp(T_HALF, -(j - 1)))
            elif j % 2:  # (j - 1/2)/2 = (j-1)/2 + 1/4
                bounds.append(math.ldexp(T_QUARTER, -((j - 1) // 2)))
            else:  # (j - 1/2)/2 = (j/2 - 1) + 3/4
                bounds.append(math.ldexp(T_THREE_QUARTERS, -(j // 2 - 1)))
        return torch.tensor(bounds[::-1], dtype=torch.float64)

    def codes(self, p: torch.Tensor, delta=None) -> torch.Tensor:
        """int64 codes of spec §3: round(-k*log2(fl64(p)/fl64(delta))) clamped at 0, 2**bits - 1 for zero/underflow.

        Counts the exact code boundaries at or above r (the frexp thresholds of the spec, scaled by powers of 2).
        """
        d = float(self.delta if delta is None else delta)
        r = p.double().div_(d)
        return (2 ** self.bits - 1) - torch.bucketize(r, self._boundaries())

    def _table(self, d: float) -> torch.Tensor:
        """float32 value of every code (spec §3 decoding; odd log-sqrt2 codes in shift form if set)."""
        c = torch.arange(2 ** self.bits, dtype=torch.int64)
        e = -torch.div(-c, self.k, rounding_mode="floor")
        odd = (c % 2 == 1) & (self.k == 2)
        base = torch.where(odd, torch.tensor(d * (LOG2_Q_OVER_P if self.shift_form else SQRT2), dtype=torch.float64),
                           torch.tensor(d, dtype=torch.float64))
        v = torch.ldexp(base, (-e).double()).float()
        v[-1] = 0.0
        return v

    def dequant(self, c: torch.Tensor, delta=None) -> torch.Tensor:
        return self._table(float(self.delta if delta is None else delta))[c]

    def calibrate(self, p: torch.Tensor) -> None:
        """Clipping search over delta = percentiles of p, scored by squared error (in float32)."""
        _check_finite(p, self.name)
        flat = p.detach().float().reshape(1, -1)
        pos = flat[flat > 0][::-(-flat.numel() // SCORE_MAX)]  # zeros take the zero code (no error)
        neg_log = pos.log2().mul_(-self.k)
        zero_code = 2 ** self.bits - 1
        best, best_err = float(flat.max()), float("inf")
        for _, q_hi in tail_quantiles(flat, self.percentiles).values():
            d = float(np.float32(q_hi[0]))
            if not d > 0:
                continue
            c = torch.round(neg_log + self.k * math.log2(d)).clamp_min_(0)
            v = torch.where(c >= zero_code, 0.0, d * torch.exp2(-c / self.k))
            err = float((v - pos).square_().sum())
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
