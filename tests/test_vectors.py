"""Golden vectors: a layer recomputed from its hex files alone equals the recorded output (``==``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from pyqsim import ops
from pyqsim.runtime import vectors as V
from pyqsim.runtime.verify import compare, verify_calls


def record_some_layers():
    rng = np.random.default_rng(7)
    m, s = ops.quantize_multiplier(np.array([0.003, 0.004, 0.002], np.float64))
    with ops.record() as calls:
        with ops.scope("fc1"):
            ops.int_gemm(rng.integers(0, 256, (5, 9), dtype=np.uint8), rng.integers(-127, 128, (3, 9), dtype=np.int8),
                         x_zero_point=128, w_zero_point=[0, 1, -2], bias=np.array([5, -7, 100], np.int32),
                         out_dtype="int8", multiplier=m, shift=s, out_zero_point=-3, backend="reference")
        with ops.scope("conv"):
            w = ops.pack_int4(rng.integers(-8, 8, (2, 3 * 3 * 3), dtype=np.int8))
            ops.int_conv2d(rng.integers(-128, 128, (1, 3, 5, 5), dtype=np.int8), w, padding=1, w_format="int4",
                           kernel_size=3, x_zero_point=-5, out_dtype="float32", out_scale=[0.5, 0.25], backend="reference")
        with ops.scope("attn"):
            codes = ops.quantize_log(rng.random((4, 6), dtype=np.float32), 1.0, 4, "sqrt2")
            ops.log2_attn_matmul(codes, rng.integers(0, 256, (6, 2), dtype=np.uint8), v_zero_point=120, bits=4,
                                 backend="reference")
        with ops.scope("skip"):
            m1, m2, sh = ops.quantize_multiplier_pair([0.01, 0.02], [0.03, 0.001])
            ops.split_conv2d(rng.integers(0, 256, (1, 2, 4, 4), dtype=np.uint8), rng.integers(-127, 128, (2, 2, 1, 1), dtype=np.int8),
                             rng.integers(-128, 128, (1, 3, 4, 4), dtype=np.int8), rng.integers(-127, 128, (2, 3, 1, 1), dtype=np.int8),
                             x1_zero_point=10, out_dtype="uint8", multiplier1=m1, multiplier2=m2, shift=sh, out_zero_point=7,
                             backend="reference")
        ops.requantize(rng.integers(-(2**20), 2**20, (2, 3, 4), dtype=np.int32), m, s, 0, "int4", axis=1, backend="reference")
    return calls


def test_every_layer_recomputes_from_hex_alone(tmp_path):
    calls = record_some_layers()
    manifest = V.write_vectors(calls, tmp_path, {"model": "unit"})
    assert [l["scope"] for l in manifest["layers"]] == ["fc1", "conv", "attn", "skip", ""]
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    for layer in on_disk["layers"]:
        got, expected = V.recompute_layer(layer, tmp_path)
        assert got.dtype == expected.dtype and np.array_equal(got, expected), layer["scope"]
        npz = np.load(tmp_path / layer["npz"])
        assert np.array_equal(npz["out"], expected)


def test_corrupted_hex_word_is_caught(tmp_path):
    calls = record_some_layers()
    manifest = V.write_vectors(calls[:1], tmp_path)
    layer = manifest["layers"][0]
    path = tmp_path / layer["arrays"]["in.x"]["hex"]
    lines = path.read_text().split()
    lines[3] = f"{(int(lines[3], 16) ^ 0x40):02x}"
    path.write_text("\n".join(lines) + "\n")
    got, expected = V.recompute_layer(layer, tmp_path)
    assert not np.array_equal(got, expected)


@given(st.sampled_from(["int8", "uint8", "int32", "int64", "float32"]), st.data())
def test_hex_round_trip(dtype, data):
    dt = np.dtype(dtype)
    elems = st.floats(width=32, allow_nan=False) if dt.kind == "f" else st.integers(np.iinfo(dt).min, np.iinfo(dt).max)
    a = data.draw(hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5), elements=elems))
    back = V.from_hex(V.to_hex(a), dtype, a.shape)
    assert back.dtype == a.dtype and np.array_equal(back.view(np.uint8), np.ascontiguousarray(a).view(np.uint8))


def test_hex_words_are_twos_complement():
    assert V.to_hex(np.array([-1, 127, -128], np.int8)) == "ff\n7f\n80\n"
    assert V.to_hex(np.array([-2], np.int32)) == "fffffffe\n"
    assert V.to_hex(np.array([1.0], np.float32)) == "3f800000\n"


def test_verify_never_compares_the_reference_with_itself():
    """Asked to check the reference against itself, verify_calls compares nothing (counts is empty), so a caller
    cannot mistake that for a passed check. Real comparisons: test_verify_cpu_backend_has_no_mismatch."""
    mismatches, counts = verify_calls(record_some_layers(), backends=["reference"], reference="reference")
    assert mismatches == [] and counts == {}


def test_compare_reports_index_and_values():
    diffs, n = compare(np.array([[1, 2], [3, 4]], np.int32), np.array([[1, 2], [3, 5]], np.int32))
    assert n == 1 and diffs == [((1, 1), 4, 5)]


@pytest.mark.needs_cpu_ext
def test_verify_cpu_backend_has_no_mismatch():
    mismatches, counts = verify_calls(record_some_layers(), backends=["cpu"])
    assert counts == {"cpu": 0} and mismatches == []
