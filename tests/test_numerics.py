"""Numerics profiles (docs/spec.md §14) against the runtimes they follow, and the cpu backend against the reference.

Tolerance policy: none. Every comparison is integer ``==`` on codes (or on int32 accumulators): a profile is
correct only if it returns the runtime's exact bits on every drawn input. Hypothesis draws the data, the scales
(ties via power-of-two scales, saturation via large ones) and the zero points; the CI profile runs a few hundred
examples per test, ``PYQSIM_HYPOTHESIS_PROFILE=thorough`` 10^4.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from pyqsim import ops
from pyqsim.numerics import NAMES, PROFILES
from pyqsim.reference import profiles as P

EXAMPLES = max(settings().max_examples, 300)
RUNTIME = settings(max_examples=EXAMPLES)
NP_TYPES = {"int8": np.int8, "uint8": np.uint8}


def codes(dtype, shape):
    lo, hi = np.iinfo(NP_TYPES[dtype]).min, np.iinfo(NP_TYPES[dtype]).max
    const = st.sampled_from([lo, hi]).map(lambda v: np.full(shape, v, NP_TYPES[dtype]))
    return st.one_of(hnp.arrays(NP_TYPES[dtype], shape, elements=st.integers(lo, hi)), const)


def zero_point(dtype):
    lo, hi = np.iinfo(NP_TYPES[dtype]).min, np.iinfo(NP_TYPES[dtype]).max
    return st.one_of(st.sampled_from([lo, hi, 0 if lo < 0 else 128]), st.integers(lo, hi))


# float32 scales: powers of two make float rescales land on exact ties; large ones saturate
SCALES = st.one_of(st.sampled_from([2.0**-k for k in range(0, 12)] + [0.75, 1.5, 3.0]),
                   st.floats(2.0**-17, 4.0, width=32))
SMALL_SCALES = st.one_of(st.sampled_from([2.0**-k for k in range(4, 14)]), st.floats(2.0**-17, 0.0625, width=32))


# --------------------------------------------------------------------------- ONNX Runtime

def _ort_session(node, inputs, outputs, inits):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper
    g = helper.make_graph([node], "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _elem(dtype):
    from onnx import TensorProto
    return {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "int32": TensorProto.INT32,
            "float32": TensorProto.FLOAT}[dtype]


def _init(name, value):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.asarray(value), name)


@st.composite
def qmatmul_cases(draw):
    m, k, n = draw(st.integers(1, 9)), draw(st.integers(1, 40)), draw(st.integers(1, 9))
    xt = yt = draw(st.sampled_from(["uint8", "int8"]))  # ONNX Runtime's kernels: y has x's type,
    wt = draw(st.sampled_from(["uint8", "int8"])) if xt == "uint8" else "int8"  # int8 x takes int8 w only
    per_col = draw(st.booleans())
    sw = draw(hnp.arrays(np.float32, (n,), elements=SMALL_SCALES)) if per_col else np.float32(draw(SMALL_SCALES))
    zw = np.array(draw(zero_point(wt)), NP_TYPES[wt]) if not per_col else \
        np.array([draw(zero_point(wt)) for _ in range(n)], NP_TYPES[wt])
    return dict(x=draw(codes(xt, (m, k))), w=draw(codes(wt, (n, k))), xt=xt, wt=wt, yt=yt,
                zx=draw(zero_point(xt)), zw=zw, zy=draw(zero_point(yt)),
                sx=np.float32(draw(SCALES)), sw=sw, sy=np.float32(draw(SCALES)))


BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.needs_cpu_ext)]


def _as_int8_weight(w, zw):
    """pyqsim's GEMM/conv take int8 weights: a uint8 weight ``w`` with zero point ``zw`` is the int8 weight
    ``w - 128`` with zero point ``zw - 128`` (the same differences ``w - zw``)."""
    zw = np.asarray(zw).astype(np.int32)
    if w.dtype == np.uint8:
        return (w.astype(np.int16) - 128).astype(np.int8), zw - 128
    return w, zw


@pytest.mark.parametrize("backend", BACKENDS)
@RUNTIME
@given(c=qmatmul_cases())
@example(c=dict(x=np.full((1, 2), 255, np.uint8), w=np.full((1, 2), -128, np.int8), xt="uint8", wt="int8",
                yt="uint8", zx=0, zw=np.array(0, np.int8), zy=0, sx=np.float32(1.0), sw=np.float32(0.5),
                sy=np.float32(1.0)))
def test_qlinearmatmul_equals_onnxruntime(c, backend):
    from onnx import helper
    n = c["w"].shape[0]
    node = helper.make_node("QLinearMatMul", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"], ["y"])
    inits = [_init("sx", c["sx"]), _init("zx", NP_TYPES[c["xt"]](c["zx"])), _init("w", np.ascontiguousarray(c["w"].T)),
             _init("sw", c["sw"]), _init("zw", c["zw"]), _init("sy", c["sy"]), _init("zy", NP_TYPES[c["yt"]](c["zy"]))]
    sess = _ort_session(node, [helper.make_tensor_value_info("x", _elem(c["xt"]), list(c["x"].shape))],
                        [helper.make_tensor_value_info("y", _elem(c["yt"]), [c["x"].shape[0], n])], inits)
    want = sess.run(None, {"x": c["x"]})[0]
    m0, sh = ops.quantize_multiplier(ops.requant_scale(c["sx"], c["sw"], c["sy"], numerics="onnxruntime"),
                                     numerics="onnxruntime")
    w, zw = _as_int8_weight(c["w"], c["zw"])
    got = ops.int_gemm(c["x"], w, x_zero_point=c["zx"], w_zero_point=zw, out_dtype=c["yt"], multiplier=m0, shift=sh,
                       out_zero_point=c["zy"], numerics="onnxruntime", backend=backend)
    assert np.array_equal(got, want)


@st.composite
def qconv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, dil, pad = (draw(st.integers(1, 2)), draw(st.integers(1, 2))), (1, draw(st.integers(1, 2))), \
        (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = dil[0] * (kh - 1) + 1 + draw(st.integers(0, 4))
    w_ = dil[1] * (kw - 1) + 1 + draw(st.integers(0, 4))
    xt = yt = draw(st.sampled_from(["uint8", "int8"]))  # ONNX Runtime's kernels: y has x's type
    per_ch = draw(st.booleans())
    sw = draw(hnp.arrays(np.float32, (cout,), elements=SMALL_SCALES)) if per_ch else np.float32(draw(SMALL_SCALES))
    bias = draw(st.one_of(st.none(), hnp.arrays(np.int32, (cout,), elements=st.integers(-2**20, 2**20))))
    return dict(x=draw(codes(xt, (draw(st.integers(1, 2)), cin, h, w_))), w=draw(codes("int8", (cout, cin // groups, kh, kw))),
                xt=xt, yt=yt, zx=draw(zero_point(xt)), zy=draw(zero_point(yt)), sx=np.float32(draw(SCALES)), sw=sw,
                sy=np.float32(draw(SCALES)), bias=bias, groups=groups, stride=stride, padding=pad, dilation=dil)


def _conv_attrs(c):
    (ph, pw) = c["padding"]
    return dict(strides=list(c["stride"]), dilations=list(c["dilation"]), pads=[ph, pw, ph, pw], group=c["groups"],
                kernel_shape=list(c["w"].shape[2:]))


def _conv_out_shape(c):
    b, _, h, w_ = c["x"].shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c["w"].shape[2:], c["stride"], c["padding"], c["dilation"]
    return [b, c["w"].shape[0], (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w_ + 2 * pw - dw * (kw - 1) - 1) // sw + 1]


def _geometry(c):
    return dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])


@pytest.mark.parametrize("backend", BACKENDS)
@RUNTIME
@given(c=qconv_cases())
def test_qlinearconv_equals_onnxruntime(c, backend):
    from onnx import helper
    names = ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"] + (["b"] if c["bias"] is not None else [])
    node = helper.make_node("QLinearConv", names, ["y"], **_conv_attrs(c))
    cout = c["w"].shape[0]
    zw = np.zeros(cout if np.ndim(c["sw"]) else (), np.int8)
    inits = [_init("sx", c["sx"]), _init("zx", NP_TYPES[c["xt"]](c["zx"])), _init("w", c["w"]), _init("sw", c["sw"]),
             _init("zw", zw), _init("sy", c["sy"]), _init("zy", NP_TYPES[c["yt"]](c["zy"]))]
    if c["bias"] is not None:
        inits.append(_init("b", c["bias"]))
    sess = _ort_session(node, [helper.make_tensor_value_info("x", _elem(c["xt"]), list(c["x"].shape))],
                        [helper.make_tensor_value_info("y", _elem(c["yt"]), _conv_out_shape(c))], inits)
    want = sess.run(None, {"x": c["x"]})[0]
    m0, sh = ops.quantize_multiplier(ops.requant_scale(c["sx"], c["sw"], c["sy"], numerics="onnxruntime"),
                                     numerics="onnxruntime")
    got = ops.int_conv2d(c["x"], c["w"], x_zero_point=c["zx"], bias=c["bias"], out_dtype=c["yt"], multiplier=m0,
                         shift=sh, out_zero_point=c["zy"], numerics="onnxruntime", backend=backend, **_geometry(c))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@RUNTIME
@given(c=qmatmul_cases())
def test_matmulinteger_equals_onnxruntime(c, backend):
    from onnx import helper
    if np.ndim(c["zw"]):
        c["zw"] = c["zw"][:1].reshape(())  # MatMulInteger: per-tensor weight zero point here
    node = helper.make_node("MatMulInteger", ["x", "w", "zx", "zw"], ["y"])
    inits = [_init("w", np.ascontiguousarray(c["w"].T)), _init("zx", NP_TYPES[c["xt"]](c["zx"])), _init("zw", c["zw"])]
    sess = _ort_session(node, [helper.make_tensor_value_info("x", _elem(c["xt"]), list(c["x"].shape))],
                        [helper.make_tensor_value_info("y", _elem("int32"), [c["x"].shape[0], c["w"].shape[0]])], inits)
    want = sess.run(None, {"x": c["x"]})[0]
    w, zw = _as_int8_weight(c["w"], c["zw"])
    got = ops.int_gemm(c["x"], w, x_zero_point=c["zx"], w_zero_point=zw, numerics="onnxruntime", backend=backend)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@RUNTIME
@given(c=qconv_cases())
def test_convinteger_equals_onnxruntime(c, backend):
    from onnx import helper
    node = helper.make_node("ConvInteger", ["x", "w", "zx"], ["y"], **_conv_attrs(c))
    inits = [_init("w", c["w"]), _init("zx", NP_TYPES[c["xt"]](c["zx"]))]
    sess = _ort_session(node, [helper.make_tensor_value_info("x", _elem(c["xt"]), list(c["x"].shape))],
                        [helper.make_tensor_value_info("y", _elem("int32"), _conv_out_shape(c))], inits)
    want = sess.run(None, {"x": c["x"]})[0]
    got = ops.int_conv2d(c["x"], c["w"], x_zero_point=c["zx"], numerics="onnxruntime", backend=backend, **_geometry(c))
    assert np.array_equal(got, want)


@st.composite
def float_cases(draw):
    n = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(["uint8", "int8"]))
    per_axis = draw(st.booleans())
    scale = draw(hnp.arrays(np.float32, (n,), elements=SCALES)) if per_axis else np.float32(draw(SCALES))
    zp = np.array([draw(zero_point(dtype)) for _ in range(n)]) if per_axis else draw(zero_point(dtype))
    size = draw(st.integers(0, 40))
    x = draw(hnp.arrays(np.float32, (n, size), elements=st.floats(-1e4, 1e4, width=32)))
    # exact ties k + 1/2 of x / s, and values far beyond the code range
    ties = draw(hnp.arrays(np.float32, (n, 6), elements=st.integers(-300, 300).map(lambda k: k + 0.5)))
    x = np.concatenate([x, (ties * np.reshape(scale, (-1, 1))).astype(np.float32)], axis=1)
    return dict(x=x, dtype=dtype, scale=scale, zp=zp, axis=0 if per_axis else None)


@RUNTIME
@given(c=float_cases())
def test_quantizelinear_equals_onnxruntime(c):
    from onnx import helper
    zp = np.asarray(c["zp"]).astype(NP_TYPES[c["dtype"]])
    attrs = {"axis": 0} if c["axis"] is not None else {}
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    sess = _ort_session(node, [helper.make_tensor_value_info("x", _elem("float32"), list(c["x"].shape))],
                        [helper.make_tensor_value_info("y", _elem(c["dtype"]), list(c["x"].shape))],
                        [_init("s", c["scale"]), _init("z", zp)])
    want = sess.run(None, {"x": c["x"]})[0]
    got = ops.quantize(c["x"], c["scale"], c["zp"], c["dtype"], axis=c["axis"], numerics="onnxruntime")
    assert np.array_equal(got, want)
