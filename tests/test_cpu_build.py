"""The compiled extension: that it is the installed build, what it reports, and how it validates.

``pyqsim._C`` checks every argument before touching memory and raises TypeError/ValueError naming it
(spec §11); these tests call it directly, below the op layer, with deliberately bad arguments.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from pyqsim import ops

pytestmark = pytest.mark.needs_cpu_ext


@pytest.fixture
def C():
    from pyqsim import _C
    return _C


def test_extension_is_the_compiled_build(C):
    import importlib.machinery

    import pyqsim
    path = pathlib.Path(C.__file__)
    assert any(str(path).endswith(sfx) for sfx in importlib.machinery.EXTENSION_SUFFIXES), path
    assert path.parent.name == "pyqsim"
    assert path.stat().st_size > 0
    # the shared object belongs to the same pyqsim that is imported (installed or editable)
    assert path.parent.resolve() == pathlib.Path(pyqsim.__file__).parent.resolve() or "site-packages" in str(path)
    info = C.build_info()
    assert info["version"] == pyqsim.__version__
    assert info["isa"] in info["simd_compiled"]
    assert info["isa"] in ("scalar", "avx2", "avx512vnni", "amx")
    assert info["threads"] >= 1


def test_build_info_reports_isa_threads_and_cuda(C):
    info = ops.build_info()
    cpu = info["cpu"]
    assert cpu["compiled"] is True
    assert cpu["extension"] == C.__file__
    for key in ("simd_compiled", "simd_level", "cpu_has_avx2", "isa", "threads", "cuda_compiled", "cuda"):
        assert key in cpu
    assert set(cpu["cuda"]) >= {"compiled", "runtime_version", "devices"}
    assert isinstance(cpu["cuda_compiled"], bool)
    from pyqsim.backends import cpu as cpu_backend
    assert cpu["isa"] == cpu_backend.isas()[-1]  # auto picks the best ISA this build and CPU can run


def test_isa_switch_by_setter_and_environment(C, monkeypatch):
    monkeypatch.delenv("PYQSIM_CPU_ISA", raising=False)
    C.set_cpu_isa(None)
    try:
        C.set_cpu_isa("scalar")
        assert C.get_cpu_isa() == "scalar"
        C.set_cpu_isa("auto")
        assert C.get_cpu_isa() in ("scalar", "avx2", "avx512vnni", "amx")
        C.set_cpu_isa(None)
        monkeypatch.setenv("PYQSIM_CPU_ISA", "scalar")  # read at call time
        assert C.get_cpu_isa() == "scalar"
        assert C.build_info()["isa"] == "scalar"
        monkeypatch.setenv("PYQSIM_CPU_ISA", "sse9")
        with pytest.raises(ValueError, match="PYQSIM_CPU_ISA"):
            ops.int_gemm(np.zeros((1, 1), np.int8), np.zeros((1, 1), np.int8), backend="cpu")
        assert C.build_info()["isa_error"]
        with pytest.raises(ValueError, match="override"):
            C.set_cpu_isa("neon")
    finally:
        C.set_cpu_isa(None)


def test_isa_env_in_fresh_process():
    env = dict(os.environ, PYQSIM_CPU_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", "from pyqsim import _C; print(_C.get_cpu_isa())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def test_avx2_request_without_support_is_an_error(C):
    info = C.build_info()
    if info["cpu_has_avx2"] and "avx2" in info["simd_compiled"]:
        pytest.skip("this CPU and build support AVX2")
    with pytest.raises(RuntimeError, match="AVX2"):
        C.set_cpu_isa("avx2")


def test_thread_count_control(C):
    old = C.get_num_threads()
    try:
        C.set_num_threads(3)
        assert C.get_num_threads() == 3
        assert ops.build_info()["cpu"]["threads"] == 3
        with pytest.raises(ValueError):
            C.set_num_threads(0)
    finally:
        C.set_num_threads(old)


def test_gil_is_released_concurrent_calls(C):
    """Two Python threads calling kernels at once give the same results as sequential calls."""
    import threading
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 200), dtype=np.uint8)
    w = rng.integers(-128, 128, (100, 200), dtype=np.int8)
    ref = ops.int_gemm(x, w, x_zero_point=128, backend="cpu")
    res = [None] * 4

    def work(i):
        res[i] = ops.int_gemm(x, w, x_zero_point=128, backend="cpu")

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(np.array_equal(r, ref) for r in res)


# ------------------------------------------------------------------------------------------ validation in _C

Z3 = np.zeros(3, np.int32)
F3 = np.ones(3, np.float32)


def gemm(C, **kw):
    args = dict(x=np.zeros((2, 4), np.uint8), w=np.zeros((3, 4), np.int8), w_format="int8", x_zero_point=0,
                w_zero_point=Z3, bias=None, out_dtype="int32", multiplier=None, shift=None, out_zero_point=0,
                out_scale=None)
    args.update(kw)
    return C.int_gemm(**args)


BAD = [
    (dict(x=[[1, 2, 3, 4]]), TypeError, "x must be a NumPy array"),
    (dict(x=np.zeros((2, 4), np.int16)), TypeError, "x must have dtype int8 or uint8"),
    (dict(x=np.zeros((2, 8), np.uint8)[:, ::2]), ValueError, "x must be C-contiguous"),
    (dict(x=np.zeros(4, np.uint8)), ValueError, "x must be 2-D"),
    (dict(x=np.zeros((2, 4), np.dtype(">i4"))), TypeError, "x must have dtype"),
    (dict(w=np.zeros((3, 5), np.int8)), ValueError, "K=4"),
    (dict(w=np.zeros((3, 4), np.uint8)), TypeError, "w must have dtype int8"),
    (dict(w=np.zeros((3, 4), np.uint8), w_format="int4"), ValueError, "ceil\\(K/2\\)"),
    (dict(w=np.full((3, 2), 0xF0, np.uint8), w_format="int4", x=np.zeros((2, 3), np.uint8)), ValueError,
     "padding nibble"),
    (dict(w_format="int2"), ValueError, "w_format"),
    (dict(x_zero_point=256), ValueError, "x_zero_point"),
    (dict(w_zero_point=np.zeros(2, np.int32)), ValueError, "w_zero_point"),
    (dict(w_zero_point=np.zeros(3, np.int64)), TypeError, "w_zero_point"),
    (dict(w_zero_point=np.array([0, 0, 128], np.int32)), ValueError, "w_zero_point"),
    (dict(bias=np.zeros(3, np.int64)), TypeError, "bias"),
    (dict(bias=np.zeros(2, np.int32)), ValueError, "bias"),
    (dict(bias=np.full(3, 2**31 - 1, np.int32)), ValueError, "2\\^31-1"),
    (dict(out_dtype="int16"), ValueError, "out_dtype"),
    (dict(out_dtype="int8"), ValueError, "multiplier and shift are required"),
    (dict(out_dtype="int8", multiplier=np.full(3, -1, np.int32), shift=np.full(3, 31, np.int32)), ValueError,
     "multiplier"),
    (dict(out_dtype="int8", multiplier=Z3, shift=np.full(3, 95, np.int32)), ValueError, "shift"),
    (dict(out_dtype="int8", multiplier=Z3, shift=np.full(3, 0, np.int32)), ValueError, "shift"),
    (dict(out_dtype="int4", multiplier=Z3, shift=np.full(3, 9, np.int32), out_zero_point=8), ValueError,
     "out_zero_point"),
    (dict(out_dtype="float32"), ValueError, "out_scale"),
    (dict(out_dtype="float32", out_scale=np.array([1, 0, 1], np.float32)), ValueError, "out_scale"),
    (dict(out_dtype="float32", out_scale=np.array([1, np.nan, 1], np.float32)), ValueError, "out_scale"),
    (dict(out_dtype="float32", out_scale=np.ones(3, np.float64)), TypeError, "out_scale"),
    (dict(x=np.zeros((1, 70000), np.uint8), w=np.zeros((3, 70000), np.int8)), ValueError, "K=70000"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_gemm_binding_rejects(C, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        gemm(C, **kw)


def test_buffer_protocol_inputs(C):
    x = memoryview(bytearray(8)).cast("B", (2, 4))
    y = gemm(C, x=x)
    assert y.shape == (2, 3) and y.dtype == np.int32


def test_unaligned_int32_is_rejected(C):
    raw = np.zeros(4 * 3 + 1, np.uint8)
    zw = raw[1:].view(np.int32)
    assert zw.ctypes.data % 4 != 0
    with pytest.raises(ValueError, match="aligned"):
        gemm(C, w_zero_point=zw)


def conv(C, **kw):
    args = dict(x=np.zeros((1, 4, 5, 5), np.uint8), w=np.zeros((6, 2, 3, 3), np.int8), w_format="int8",
                kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=2, x_zero_point=0,
                w_zero_point=np.zeros(6, np.int32), bias=None, out_dtype="int32", multiplier=None, shift=None,
                out_zero_point=0, out_scale=None)
    args.update(kw)
    return C.int_conv2d(**args)


BAD_CONV = [
    (dict(groups=3), ValueError, "groups=3"),
    (dict(groups=0), ValueError, "groups"),
    (dict(w=np.zeros((6, 4, 3, 3), np.int8)), ValueError, "w must have shape"),
    (dict(kernel_size=(2, 3)), ValueError, "w must have shape"),
    (dict(w=np.zeros((5, 2, 3, 3), np.int8)), ValueError, "groups must divide"),
    (dict(x=np.zeros((1, 4, 2, 2), np.uint8)), ValueError, "output size"),
    (dict(stride=(0, 1)), ValueError, "stride"),
    (dict(padding=(-1, 0)), ValueError, "padding"),
    (dict(dilation=(1, 0)), ValueError, "dilation"),
    (dict(x=np.zeros((1, 4, 5, 5), np.float32)), TypeError, "x must have dtype"),
    (dict(x=np.zeros((4, 5, 5), np.uint8)), ValueError, "x must be 4-D"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD_CONV, ids=[m for _, _, m in BAD_CONV])
def test_conv_binding_rejects(C, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        conv(C, **kw)


def test_log2_binding_rejects(C):
    codes = np.zeros((2, 3), np.uint8)
    v = np.zeros((3, 4), np.int8)
    base = dict(codes=codes, v=v, v_zero_point=0, bits=4, k=2, frac_bits=16, out_dtype="int64", multiplier=None,
                shift=None, out_zero_point=0, out_scale=None)
    for kw, exc, msg in [
        (dict(codes=np.full((2, 3), 16, np.uint8)), ValueError, "codes must be in \\[0, 15\\]"),
        (dict(bits=9), ValueError, "bits"),
        (dict(k=3), ValueError, "mode"),
        (dict(frac_bits=25), ValueError, "frac_bits"),
        (dict(v=np.zeros((4, 4), np.int8)), ValueError, "L=3"),
        (dict(codes=codes.astype(np.int8)), TypeError, "codes must have dtype uint8"),
        (dict(out_dtype="int32"), ValueError, "out_dtype"),
        (dict(v_zero_point=-129), ValueError, "v_zero_point"),
    ]:
        with pytest.raises(exc, match=msg):
            C.log2_attn_matmul(**dict(base, **kw))


def test_packed_weight_object(C):
    from pyqsim.backends import cpu
    w = np.arange(-60, 60, dtype=np.int8).reshape(8, 15)
    pw = cpu.pack_weight(w)
    assert (pw.kind, pw.w_format, pw.n, pw.k) == ("gemm", "int8", 8, 15)
    assert pw.nbytes > 0 and "PackedWeight" in repr(pw)
    x = np.arange(30, dtype=np.uint8).reshape(2, 15)
    zw = np.zeros(8, np.int32)
    y = C.int_gemm(x, pw, "int8", 3, zw, None, "int32", None, None, 0, None)
    assert np.array_equal(y, ops.int_gemm(x, w, x_zero_point=3, backend="reference"))
    with pytest.raises(ValueError, match="K=15"):
        C.int_gemm(np.zeros((2, 16), np.uint8), pw, "int8", 0, zw, None, "int32", None, None, 0, None)
    with pytest.raises(ValueError, match="packed as int8"):
        C.int_gemm(x, pw, "int4", 0, zw, None, "int32", None, None, 0, None)
    with pytest.raises(ValueError, match="k is required"):
        cpu.pack_weight(np.zeros((2, 3), np.uint8), "int4")


def test_peak_microbenchmark_runs(C):
    info = C.build_info()
    if not (info["cpu_has_avx2"] and "avx2" in info["simd_compiled"]):
        pytest.skip("no AVX2")
    peaks = C._peak_int8_gops(20000)
    assert len(peaks) == 3 + info["cpu_has_avx512vnni"] + info["cpu_has_amx"] and all(p > 0 for p in peaks)


def test_cuda_probe_reports(C):
    """The CUDA probe TU (csrc/cuda/), when compiled in: runtime version and a device count or an error."""
    info = C.build_info()["cuda"]
    if not info["compiled"]:
        pytest.skip("built with PYQSIM_CUDA=OFF (or AUTO without a working nvcc or a visible GPU)")
    assert info["compiled"] is True
    assert info["runtime_version"] >= 12000
    msg = C.cuda_selftest()
    if info["devices"] == 0:
        assert msg  # explains why it cannot run
    else:
        assert msg == ""
