"""Smoke run of the benchmark script (marker ``bench``: excluded from the default test run).

Run with ``python -m pytest -m bench``. Performance targets are reported by the script, never asserted.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.needs_cpu_ext]

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_gemm_quick_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gemm", ROOT / "benchmarks" / "bench_gemm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    report = mod.main(["--quick", "--skip-numpy", "--reps", "1", "--only", "deit,decode,conv", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["rows"] and all(r["results"]["pyqsim"]["gops"] > 0 for r in data["rows"])
    assert report["threads"] >= 1


def test_bench_attention_quick_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench.json"
    mod.main(["--quick", "--reps", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["attention"]["rows"]["log2"]["gops"] > 0 and data["attention"]["log2_over_int_gemm"] > 0
    assert data["packed"]["shapes"] and all(s["fraction_of_sign_peak"] > 0 for s in data["packed"]["shapes"])


def test_bench_float_quick_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_float", ROOT / "benchmarks" / "bench_float.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench_float.json"
    report = mod.main(["--quick", "--reps", "1", "--skip-reference", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {r["op"] for r in data["rows"]} >= {"softmax", "layer_norm", "group_norm", "gelu", "silu", "quantize"}
    assert all(r["results"]["pyqsim"]["best"] > 0 for r in data["rows"]) and report["threads"] == 1
