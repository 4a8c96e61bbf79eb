"""Integer conv2d (NCHW) and split-shortcut conv2d by exact im2col (spec §5, §8)."""
from __future__ import annotations

import numpy as np

from .. import _checks as C
from .gemm import split_out
from .int4 import weight_codes
from .requant import apply_out_stage


def im2col(a: C.ConvArgs) -> np.ndarray:
    """int64 patches [B, OH, OW, C, KH, KW] minus the zero point; padding contributes 0."""
    b, c, h, w = a.x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a.kernel_size, a.stride, a.padding, a.dilation
    oh, ow = a.out_hw
    xs = np.zeros((b, c, h + 2 * ph, w + 2 * pw), np.int64)
    xs[:, :, ph:ph + h, pw:pw + w] = a.x.astype(np.int64) - a.x_zero_point
    cols = np.empty((b, oh, ow, c, kh, kw), np.int64)
    for i in range(kh):
        for j in range(kw):
            win = xs[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            cols[:, :, :, :, i, j] = win.transpose(0, 2, 3, 1)
    return cols


def conv_acc(a: C.ConvArgs) -> np.ndarray:
    """Exact int64 accumulator [B, O, OH, OW]."""
    b = a.x.shape[0]
    o = a.w.shape[0]
    g = a.groups
    cg = a.x.shape[1] // g
    og = o // g
    kk = cg * a.kernel_size[0] * a.kernel_size[1]
    wf = a.w.reshape(o, kk) if a.w_format == "int8" else a.w
    oh, ow = a.out_hw
    if kk == 0 or b == 0 or o == 0:  # empty reduction or output: no tap is visited
        acc = np.broadcast_to(a.bias.astype(np.int64), (b, oh, ow, o))
        return np.ascontiguousarray(acc.transpose(0, 3, 1, 2))
    ws = weight_codes(wf, a.w_format, kk) - a.w_zero_point.astype(np.int64)[:, None]
    cols = im2col(a)
    acc = np.empty((b, oh, ow, o), np.int64)
    for gi in range(g):
        cg_cols = cols[:, :, :, gi * cg:(gi + 1) * cg].reshape(b, oh, ow, kk)
        acc[..., gi * og:(gi + 1) * og] = cg_cols @ ws[gi * og:(gi + 1) * og].T
    acc += a.bias.astype(np.int64)
    return np.ascontiguousarray(acc.transpose(0, 3, 1, 2))


def int_conv2d_compute(a: C.ConvArgs) -> np.ndarray:
    return apply_out_stage(conv_acc(a), a.out, axis=1)


def int_conv2d(x, w, *, stride=1, padding=0, dilation=1, groups=1, x_zero_point=0, w_zero_point=0, bias=None,
               w_format="int8", kernel_size=None, out_dtype="int32", multiplier=None, shift=None, out_zero_point=0,
               out_scale=None) -> np.ndarray:
    """Integer NCHW conv2d, padding filled with the activation zero point, one output stage (spec §5, §6)."""
    return int_conv2d_compute(C.conv_args(x, w, stride, padding, dilation, groups, x_zero_point, w_zero_point, bias,
                                          w_format, kernel_size, out_dtype, multiplier, shift, out_zero_point, out_scale))


def split_conv2d_compute(a: C.SplitConvArgs) -> np.ndarray:
    return split_out(conv_acc(a.a), conv_acc(a.b), a.out, axis=1)


def split_conv2d(x1, w1, x2, w2, *, stride=1, padding=0, dilation=1, x1_zero_point=0, x2_zero_point=0,
                 w1_zero_point=0, w2_zero_point=0, bias=None, w1_format="int8", w2_format="int8", kernel_size=None,
                 out_dtype="int8", multiplier1=None, multiplier2=None, shift=None, out_zero_point=0,
                 out_scale1=None, out_scale2=None) -> np.ndarray:
    """conv2d of ``concat(x1, x2)`` (channels) with per-branch quantization and one rounding (spec §8)."""
    return split_conv2d_compute(C.split_conv_args(x1, w1, x2, w2, stride, padding, dilation, x1_zero_point,
                                                  x2_zero_point, w1_zero_point, w2_zero_point, bias, w1_format,
                                                  w2_format, kernel_size, out_dtype, multiplier1, multiplier2, shift,
                                                  out_zero_point, out_scale1, out_scale2))
