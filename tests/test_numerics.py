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

import importlib.util

from pyqsim import ops
from test_cpu_ops import ISAS
from pyqsim.numerics import NAMES, PROFILES

needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx and onnxruntime are not installed (pip install -e '.[test]')")

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


@needs_onnxruntime
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


@needs_onnxruntime
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


@needs_onnxruntime
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


@needs_onnxruntime
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


@needs_onnxruntime
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


# --------------------------------------------------------------------------- PyTorch (FBGEMM)

def _torch_fbgemm():
    torch = pytest.importorskip("torch")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this PyTorch build has no FBGEMM engine")
    torch.backends.quantized.engine = "fbgemm"
    warnings.filterwarnings("ignore", message=".*quantize.*deprecated.*")
    return torch


def _torch_weight(torch, w, sw):
    if np.ndim(sw):
        return torch._make_per_channel_quantized_tensor(torch.from_numpy(w), torch.from_numpy(sw.astype(np.float64)),
                                                        torch.zeros(len(sw), dtype=torch.long), 0)
    return torch._make_per_tensor_quantized_tensor(torch.from_numpy(w), float(sw), 0)


@st.composite
def linear_cases(draw, max_k=64):
    m, k, n = draw(st.integers(1, 9)), draw(st.integers(1, max_k)), draw(st.integers(1, 20))
    per_ch = draw(st.booleans())
    sw = draw(hnp.arrays(np.float32, (n,), elements=SMALL_SCALES)) if per_ch else np.float32(draw(SMALL_SCALES))
    return dict(x=draw(codes("uint8", (m, k))), w=draw(codes("int8", (n, k))), zx=draw(zero_point("uint8")),
                zy=draw(zero_point("uint8")), sx=np.float32(draw(SCALES)), sw=sw, sy=np.float32(draw(SCALES)))


def _torch_linear(torch, c):
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(c["x"]), float(c["sx"]), int(c["zx"]))
    packed = torch.ops.quantized.linear_prepack(_torch_weight(torch, c["w"], c["sw"]), None)
    return torch.ops.quantized.linear(qx, packed, float(c["sy"]), int(c["zy"])).int_repr().numpy()


def _pyqsim_linear(c, numerics, backend):
    m0, sh = ops.quantize_multiplier(ops.requant_scale(c["sx"], c["sw"], c["sy"], numerics=numerics), numerics=numerics)
    return ops.int_gemm(c["x"], c["w"], x_zero_point=c["zx"], out_dtype="uint8", multiplier=m0, shift=sh,
                        out_zero_point=c["zy"], numerics=numerics, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@RUNTIME
@given(c=linear_cases())
def test_quantized_linear_equals_pytorch_fbgemm(c, backend):
    torch = _torch_fbgemm()
    numerics = "fbgemm-avx2" if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS") == "AVX2" else "fbgemm"
    if numerics == "fbgemm-avx2" and backend == "cpu":
        pytest.skip("fbgemm-avx2 is a reference-only profile")
    assert np.array_equal(_pyqsim_linear(c, numerics, backend), _torch_linear(torch, c))


@pytest.mark.skipif(os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS") != "AVX2",
                    reason="runs in the subprocess of test_pair_saturation_equals_pytorch_on_avx2")
@RUNTIME
@given(c=linear_cases(max_k=200))
@example(c=dict(x=np.full((2, 64), 255, np.uint8), w=np.full((3, 64), 127, np.int8), zx=0, zy=0, sx=np.float32(1.0),
                sw=np.float32(1.0), sy=np.float32(2.0**14)))
def test_pair_saturation_avx2(c):
    torch = _torch_fbgemm()
    got = _pyqsim_linear(c, "fbgemm-avx2", "reference")
    assert np.array_equal(got, _torch_linear(torch, c))


@pytest.mark.needs_torch
def test_pair_saturation_equals_pytorch_on_avx2():
    """FBGEMM forced to its AVX2 kernels (vpmaddubsw) saturates int16 pairs; fbgemm-avx2 reproduces it."""
    _torch_fbgemm()
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_pair_saturation_avx2", f"{__file__}::test_quantized_linear_equals_pytorch_fbgemm"],
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 passed" in r.stdout.strip().splitlines()[-1], r.stdout[-800:]


@st.composite
def torch_conv_cases(draw):
    c = draw(qconv_cases())
    x = c["x"].astype(np.int16)
    c.update(x=(x + 128).astype(np.uint8) if c["xt"] == "int8" else c["x"], xt="uint8", yt="uint8",
             zx=draw(zero_point("uint8")), zy=draw(zero_point("uint8")), bias=None)
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@RUNTIME
@given(c=torch_conv_cases())
def test_quantized_conv2d_equals_pytorch_fbgemm(c, backend):
    torch = _torch_fbgemm()
    qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(c["x"]), float(c["sx"]), int(c["zx"]))
    packed = torch.ops.quantized.conv2d_prepack(_torch_weight(torch, c["w"], c["sw"]), None, list(c["stride"]),
                                                list(c["padding"]), list(c["dilation"]), c["groups"])
    want = torch.ops.quantized.conv2d(qx, packed, float(c["sy"]), int(c["zy"])).int_repr().numpy()
    m0, sh = ops.quantize_multiplier(ops.requant_scale(c["sx"], c["sw"], c["sy"], numerics="fbgemm"), numerics="fbgemm")
    got = ops.int_conv2d(c["x"], c["w"], x_zero_point=c["zx"], out_dtype="uint8", multiplier=m0, shift=sh,
                         out_zero_point=c["zy"], numerics="fbgemm", backend=backend, **_geometry(c))
    assert np.array_equal(got, want)


@RUNTIME
@given(c=float_cases())
def test_quantize_equals_pytorch(c):
    torch = _torch_fbgemm()
    qtype = torch.quint8 if c["dtype"] == "uint8" else torch.qint8
    x = torch.from_numpy(c["x"])
    if c["axis"] is None:
        want = torch.quantize_per_tensor(x, float(c["scale"]), int(c["zp"]), qtype)
    else:
        want = torch.quantize_per_channel(x, torch.from_numpy(c["scale"].astype(np.float64)),
                                          torch.from_numpy(np.asarray(c["zp"], np.int64)), 0, qtype)
    got = ops.quantize(c["x"], c["scale"], c["zp"], c["dtype"], axis=c["axis"], numerics="fbgemm")
    assert np.array_equal(got, want.int_repr().numpy())


# --------------------------------------------------------------------------- TFLite (published kernel formulas)
# No fully integer TFLite model is run here for these two profiles: LiteRT's x86 builtin kernels round the last
# shift half up and its XNNPACK delegate rescales in float (spec §14.2), so neither executes the reference
# kernels. The oracle below restates gemmlowp/TFLite's integer definitions in Python integers.

def _oracle_tflite(acc: int, m: int, s: int, single: bool) -> int:
    shift = 31 - s  # TFLite's exponent
    if single:
        total = 31 - shift
        return (acc * m + (1 << (total - 1))) >> total
    x = acc * (1 << max(shift, 0))
    x = (x + 2**31) % 2**32 - 2**31  # int32 arithmetic
    if x == m == -(2**31):
        high = 2**31 - 1
    else:
        ab = x * m
        nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
        q = ab + nudge
        high = abs(q) // 2**31 * (1 if q >= 0 else -1)  # truncating division
    e = max(-shift, 0)
    mask = (1 << e) - 1
    rem, threshold = high & mask, (mask >> 1) + (1 if high < 0 else 0)
    return (high >> e) + (1 if rem > threshold else 0)


def _oracle_multiplier(r: float, single: bool):
    import math
    q, e = math.frexp(r)
    qf = round(q * 2**31) if q * 2**31 % 1 != 0.5 else math.floor(q * 2**31) + 1  # half away from zero, q > 0
    if qf == 2**31:
        qf, e = qf // 2, e + 1
    if e < -31:
        return 0, 31
    if single and e > 30:
        return 2**31 - 1, 1
    return qf, 31 - e


@RUNTIME
@given(acc=hnp.arrays(np.int32, st.integers(1, 30), elements=st.integers(-(2**31), 2**31 - 1)),
       real=st.one_of(st.floats(2.0**-40, 2.0**29), st.sampled_from([2.0**-k for k in range(-20, 40)])),
       numerics=st.sampled_from(["tflite", "tflite-single"]), zy=zero_point("int8"))
@example(acc=np.array([-3, -1, 1, 3, -(2**31), 2**31 - 1], np.int32), real=0.5, numerics="tflite", zy=0)
@example(acc=np.array([-3, -1, 1, 3, -(2**31), 2**31 - 1], np.int32), real=2.0**-33, numerics="tflite", zy=0)
@example(acc=np.array([-5, 5, 2**30], np.int32), real=2.0**29, numerics="tflite-single", zy=127)
@example(acc=np.array([4], np.int32), real=536870881.0, numerics="tflite", zy=-128)  # v + zy wraps past -2^31
def test_tflite_profiles_equal_kernel_formulas(acc, real, numerics, zy):
    single = numerics == "tflite-single"
    m, s = ops.quantize_multiplier(real, numerics=numerics)
    assert (int(m), int(s)) == _oracle_multiplier(real, single)
    # spec §14.2/§14.3: y = clamp(wrap32(v + zy)); the int32 cast of v and the int32 addition of the zero point
    # both wrap, i.e. one wrap of v + zy modulo 2^32
    want = [min(max((_oracle_tflite(int(a), int(m), int(s), single) + zy + 2**31) % 2**32 - 2**31, -128), 127)
            for a in acc]
    for backend in ops.available_backends():
        got = ops.requantize(acc, m, s, zy, "int8", numerics=numerics, backend=backend)
        assert got.tolist() == want, backend


# --------------------------------------------------------------------------- cpu kernels == reference, every ISA

@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("numerics", ["tflite", "tflite-single", "onnxruntime", "fbgemm"])
@RUNTIME
@given(acc=hnp.arrays(np.int32, st.tuples(st.integers(0, 3), st.integers(1, 20), st.integers(0, 5)),
                      elements=st.integers(-(2**31), 2**31 - 1)),
       reals=hnp.arrays(np.float64, 20, elements=st.one_of(st.floats(2.0**-31, 2.0**29),
                                                         st.sampled_from([0.5, 0.25, 1.0, 3.0, 2.0**-31]))),
       out=st.sampled_from(["int8", "uint8", "int4", "uint4"]), data=st.data())
def test_cpu_profiles_equal_reference(acc, reals, out, data, numerics, isa):
    from pyqsim import _C
    _C.set_cpu_isa(isa)
    try:
        _check_cpu_profile(acc, reals, out, data, numerics)
    finally:
        _C.set_cpu_isa(None)


def _check_cpu_profile(acc, reals, out, data, numerics):
    m, s = ops.quantize_multiplier(reals[:acc.shape[1]], numerics=numerics)
    zy = data.draw(st.integers(*{"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}[out]))
    want = ops.requantize(acc, m, s, zy, out, axis=1, numerics=numerics, backend="reference")
    assert np.array_equal(ops.requantize(acc, m, s, zy, out, axis=1, numerics=numerics, backend="cpu"), want)


# --------------------------------------------------------------------------- parameters and errors

def test_profiles_listed_once_with_sources():
    assert set(NAMES) >= {"pyqsim", "tflite", "tflite-single", "onnxruntime", "fbgemm"}
    assert all(p.source and p.section.startswith("§") for p in PROFILES.values())


@pytest.mark.parametrize("numerics", NAMES)
def test_quantize_multiplier_feeds_requantize(numerics):
    acc = np.arange(-300, 300, 7, dtype=np.int32)
    m, s = ops.quantize_multiplier(np.float32(0.037), numerics=numerics)
    assert (s is None) == (PROFILES[numerics].params == "float")
    y = ops.requantize(acc, m, s, 3, "int8", numerics=numerics)
    exact = np.clip(np.rint(acc * float(np.float32(0.037))) + 3, -128, 127)
    assert np.abs(y.astype(int) - exact).max() <= 1


def test_numerics_errors():
    acc = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="numerics must be one of"):
        ops.requantize(acc, 1 << 30, 31, numerics="tensorrt")
    with pytest.raises(ValueError, match="shift must be None"):
        ops.requantize(acc, np.float32(0.5), 31, numerics="onnxruntime")
    with pytest.raises(ValueError, match=r"shift values must be in \[1, 62\]"):
        ops.requantize(acc, 1 << 30, 63, numerics="tflite")
    with pytest.raises(ValueError, match="outside"):
        ops.quantize_multiplier(2.0**31, numerics="tflite")
    x = np.zeros((2, 3), np.int8)
    with pytest.raises(ValueError, match="split-shortcut"):
        ops.split_gemm(x, x, x, x, multiplier1=1, multiplier2=1, shift=31, numerics="fbgemm")
    with pytest.raises(ValueError, match="x must be uint8"):
        ops.int_gemm(x, x, numerics="fbgemm-avx2")


@pytest.mark.needs_cpu_ext
def test_backend_without_profile_is_a_clear_error():
    x = np.zeros((2, 3), np.uint8)
    with pytest.raises(RuntimeError, match="does not implement numerics='fbgemm-avx2'"):
        ops.int_gemm(x, x.view(np.int8), numerics="fbgemm-avx2", backend="cpu")
