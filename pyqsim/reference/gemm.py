"""Integer GEMM ``x @ w.T``, batched ``a @ b^T`` of activations and split-shortcut GEMM (spec §4, §6, §8)."""
from __future__ import annotations

import numpy as np

from .. import _checks as C
from ..numerics import profile
from .int4 import weight_codes
from .profiles import pair_saturated_acc
from .requant import apply_out_stage, clamp_to, rounding_shift


def gemm_acc(a: C.GemmArgs) -> np.ndarray:
    """Exact int64 accumulator ``bias + (x - zx) @ (w - zw).T`` of canonical arguments (or FBGEMM's
    pair-saturated one under a ``pair_saturation`` profile, spec §14.5)."""
    if profile(a.out.numerics).pair_saturation:
        return pair_saturated_acc(a.x, a.w, a.x_zero_point, a.w_zero_point, a.bias)
    xs = a.x.astype(np.int64) - a.x_zero_point
    ws = weight_codes(a.w, a.w_format, a.k) - a.w_zero_point.astype(np.int64)[:, None]
    return xs @ ws.T + a.bias.astype(np.int64)


def int_gemm_compute(a: C.GemmArgs) -> np.ndarray:
    return apply_out_stage(gemm_acc(a), a.out, axis=1)


def int_gemm(x, w, *, x_zero_point=0, w_zero_point=0, bias=None, w_format="int8", out_dtype="int32",
             multiplier=None, shift=None, out_zero_point=0, out_scale=None) -> np.ndarray:
    """Integer ``x @ w.T`` with zero points, int32 bias and one output stage (spec §4, §6)."""
    return int_gemm_compute(C.gemm_args(x, w, x_zero_point, w_zero_point, bias, w_format, out_dtype, multiplier,
                                        shift, out_zero_point, out_scale))


def int_bmm_compute(a: C.BmmArgs) -> np.ndarray:
    acc = (a.a.astype(np.int64) - a.a_zero_point) @ np.swapaxes(a.b.astype(np.int64) - a.b_zero_point, -1, -2)
    return apply_out_stage(acc, a.out, axis=-1)


def int_bmm(a, b, *, a_zero_point=0, b_zero_point=0, out_dtype="int32", multiplier=None, shift=None, out_zero_point=0,
            out_scale=None) -> np.ndarray:
    """Exact ``(a - za) @ (b - zb)^T`` per leading index (a [..., M, K], b [..., N, K]), one output stage (spec §4.3)."""
    return int_bmm_compute(C.bmm_args(a, b, a_zero_point, b_zero_point, out_dtype, multiplier, shift, out_zero_point,
                                      out_scale))


def split_out(acc1: np.ndarray, acc2: np.ndarray, out: C.SplitOutStage, axis: int) -> np.ndarray:
    """One output from two accumulators with one rounding (spec §8)."""
    shape = [1] * acc1.ndim
    shape[axis] = -1
    if out.dtype == "float32":
        y1 = acc1.astype(np.float32) * out.scale1.reshape(shape)
        y2 = acc2.astype(np.float32) * out.scale2.reshape(shape)
        return (y1 + y2).astype(np.float32)
    prod = acc1 * out.multiplier1.astype(np.int64).reshape(shape) + acc2 * out.multiplier2.astype(np.int64).reshape(shape)
    return clamp_to(rounding_shift(prod, out.shift.reshape(shape)) + out.zero_point, out.dtype)


def split_gemm_compute(a: C.SplitGemmArgs) -> np.ndarray:
    return split_out(gemm_acc(a.a), gemm_acc(a.b), a.out, axis=1)


def split_gemm(x1, w1, x2, w2, *, x1_zero_point=0, x2_zero_point=0, w1_zero_point=0, w2_zero_point=0, bias=None,
               w1_format="int8", w2_format="int8", out_dtype="int8", multiplier1=None, multiplier2=None, shift=None,
               out_zero_point=0, out_scale1=None, out_scale2=None) -> np.ndarray:
    """``concat(x1, x2) @ concat(w1, w2).T`` with per-branch quantization and one rounding (spec §8)."""
    return split_gemm_compute(C.split_gemm_args(x1, w1, x2, w2, x1_zero_point, x2_zero_point, w1_zero_point,
                                                w2_zero_point, bias, w1_format, w2_format, out_dtype, multiplier1,
                                                multiplier2, shift, out_zero_point, out_scale1, out_scale2))
