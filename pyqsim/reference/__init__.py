"""The golden model: docs/spec.md as plain NumPy (int64 where needed).

Every op of :mod:`pyqsim.ops` has a same-named function here. :mod:`pyqsim.reference._numba` is a faster
engine over the same canonical arguments, tested to return identical results; select it for the
``reference`` backend with ``PYQSIM_REFERENCE_ENGINE=numba``.
"""
from .conv import int_conv2d, split_conv2d
from .floatops import add, gelu, group_norm, layer_norm, silu, softmax
from .gemm import int_bmm, int_gemm, split_gemm
from .int4 import pack_int4, unpack_int4
from .log2attn import log2_attn_matmul
from .quant import dequantize, dequantize_log, quantize, quantize_log, uniform_qparams
from .requant import quantize_multiplier, quantize_multiplier_pair, requantize

__all__ = [
    "quantize", "dequantize", "quantize_log", "dequantize_log", "uniform_qparams",
    "pack_int4", "unpack_int4", "quantize_multiplier", "quantize_multiplier_pair", "requantize",
    "int_gemm", "int_bmm", "int_conv2d", "split_gemm", "split_conv2d", "log2_attn_matmul",
    "softmax", "layer_norm", "group_norm", "gelu", "silu", "add",
]
