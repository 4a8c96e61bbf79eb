"""The command line's checks of its environment and of the options shared by every command, and the help and
output of ``calibrate`` and ``table`` (what a new user reads first).

Each error case ends with exit status 2 and one line ``pyqsim <command>: error: ...`` that names the setting and
the values it accepts, raised before any work starts (pyqsim/cli.py ``_check_environment`` and the argparse types
of pyqsim/_argtypes.py). Cases run in-process through ``pyqsim.cli.main``; a few also as ``python -m pyqsim``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pyqsim
from pyqsim import cli, ops


def _cuda_compiled() -> bool:
    return bool(pyqsim.build_info()["cuda"].get("compiled"))


def _gpu() -> bool:
    return "cuda" in ops.available_backends()


def _run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith(f"pyqsim {command}") and ": error:" in l]
    assert lines, err[-2000:]
    return lines[-1]


# ------------------------------------------------------------------- environment settings


@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("value", ["avx512", "AVX2", "sse9", " "])
def test_unknown_cpu_isa_is_an_error(value, monkeypatch, capsys):
    monkeypatch.setenv("PYQSIM_CPU_ISA", value)
    code, out, err = _run(["info"], capsys)
    assert code == 2 and out == ""
    line = _error_line(err, "info")
    assert "PYQSIM_CPU_ISA must be 'auto', 'scalar', 'avx2', 'avx512vnni' or 'amx'" in line and repr(value) in line


@pytest.mark.needs_cpu_ext
def test_unknown_cpu_isa_in_a_real_process():
    env = dict(os.environ, PYQSIM_CPU_ISA="avx512")
    p = subprocess.run([sys.executable, "-m", "pyqsim", "info"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr
    assert "PYQSIM_CPU_ISA must be 'auto', 'scalar', 'avx2', 'avx512vnni' or 'amx', got 'avx512'" in _error_line(p.stderr, "info")


@pytest.mark.needs_cpu_ext
@pytest.mark.parametrize("value", ["scalar", "auto", ""])
def test_accepted_cpu_isa_still_works(value, monkeypatch, capsys):
    monkeypatch.setenv("PYQSIM_CPU_ISA", value)
    code, out, err = _run(["info"], capsys)
    assert code == 0, err
    assert f"simd: {'scalar' if value == 'scalar' else pyqsim.build_info()['cpu']['isa']}" in out


def test_unknown_forced_backend_is_an_error_before_any_work(monkeypatch, capsys):
    monkeypatch.setenv("PYQSIM_BACKEND", "gpu")
    code, _, err = _run(["demo", "--quick"], capsys)  # would calibrate for a minute if the check came late
    assert code == 2
    assert "PYQSIM_BACKEND must be one of reference, cpu, cuda, got 'gpu'" in _error_line(err, "demo")


@pytest.mark.skipif("_cuda_compiled()", reason="pyqsim was built with the CUDA kernels")
def test_backend_cuda_without_cuda_build_says_so(capsys):
    code, _, err = _run(["demo", "--quick", "--backend", "cuda"], capsys)
    assert code == 2
    line = _error_line(err, "demo")
    assert "--backend cuda" in line and "built without the CUDA kernels" in line


@pytest.mark.needs_cuda_build
@pytest.mark.skipif("_gpu()", reason="a usable GPU is visible")
def test_backend_cuda_compiled_without_gpu_says_so(capsys):
    code, _, err = _run(["demo", "--quick", "--backend", "cuda"], capsys)
    assert code == 2
    line = _error_line(err, "demo")
    assert "the CUDA kernels are compiled, but no CUDA device (GPU) is visible" in line, line
    assert "not available in this build" not in line


# ------------------------------------------------------------------- calibrate: help, bit widths


def test_calibrate_help_states_the_bit_width_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "weight bit width, 2..8 (default: 4)" in text
    assert "activation bit width, 2..8 (default: 4 for repq-vit, 8 for qdiffusion)" in text


@pytest.mark.parametrize("bits", ["16", "9", "1"])
def test_calibrate_rejects_a_bits_outside_2_to_8_before_loading_torch(bits, tmp_path, capsys):
    code, _, err = _run(["calibrate", "qdiffusion", "--out", str(tmp_path / "x.pqs"), "--a-bits", bits], capsys)
    assert code == 2
    assert f"argument --a-bits: must be an integer in [2, 8], got {bits}" in _error_line(err, "calibrate")


@pytest.mark.parametrize("method, a_bits, expect", [("repq-vit", None, "W4A4"), ("qdiffusion", None, "W4A8"),
                                                    ("qdiffusion", "6", "W4A6"), ("repq-vit", "8", "W4A8")])
@pytest.mark.parametrize("as_json", [False, True])
def test_calibrate_reports_the_bit_widths_it_used(method, a_bits, expect, as_json, tmp_path, monkeypatch, capsys):
    """The printing and the JSON of ``calibrate`` (the calibration itself is replaced by a recorder)."""
    from pyqsim import app
    seen = {}

    def fake_calibrate(method, out, w_bits, a_bits, **kw):
        seen.update(w_bits=w_bits, a_bits=a_bits)
        return {"params": str(out), "method": method, "seconds": 0.5}

    monkeypatch.setattr(app, "calibrate", fake_calibrate)
    argv = ["calibrate", method, "--out", str(tmp_path / "x.pqs")] + (["--a-bits", a_bits] if a_bits else [])
    code, out, err = _run(argv + (["--json"] if as_json else []), capsys)
    assert code == 0, err
    assert f"W{seen['w_bits']}A{seen['a_bits']}" == expect
    if as_json:
        data = json.loads(out)
        assert (data["w_bits"], data["a_bits"]) == (seen["w_bits"], seen["a_bits"])
    else:
        assert f"({method}, {expect})" in out and "None" not in out


# ------------------------------------------------------------------- table: help, output once, Markdown file


def test_table_help_lists_the_tables(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["table", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith("usage: pyqsim table") and "repq-vit" in out and "qdiffusion" in out
    assert "[--seeds SEEDS]" in out and "[--samples SAMPLES]" in out  # each table's options
    assert "python -m" not in out


@pytest.mark.parametrize("name, options", [("repq-vit", ["--seeds", "--quick", "--out", "--backend", "--deit-s"]),
                                           ("qdiffusion", ["--samples", "--steps", "--quick", "--out", "--skip"])])
def test_table_help_shows_the_table_options(name, options, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["table", name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith(f"usage: pyqsim table {name}") and "python -m" not in out
    for o in options:
        assert o in out


@pytest.mark.parametrize("argv, match", [(["table", "repq-vit", "--seeds", "0"], "argument --seeds: must be"),
                                         (["table", "qdiffusion", "--samples", "-3"], "argument --samples: must be"),
                                         (["table", "qdiffusion", "--backend", "tpu"], "argument --backend")])
def test_table_rejects_bad_options(argv, match, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2 and match in _error_line(err, "table")


def _fake_vit_table(out_dir, log, **kw):
    row = {"bits": "W4A4", "label": "RepQ-ViT (both reparameterized)", "fake_top1": 91.25, "fake_top1_std": 0.5,
           "int_top1": 91.5, "agreement": 99.0, "calib_seconds": 1.0,
           "kernel_vs_reference": {"mismatches": 0, "elements": 1234, "backend": "cpu"}}
    log("a progress line")
    return {"fp32_top1": 98.06, "rows": [row], "outliers": {"channels": 4, "factor": 10.0, "fp32_top1": 98.06},
            "outlier_rows": [dict(row, fake_top1=77.75)]}


def _fake_unet_table(out_dir, log, **kw):
    row = {"method": "qdiffusion", "bits": "W4A8", "size_mb": 0.1, "gbitops": 0.2, "calib_seconds": 3.0,
           "fake": {"fid": 5.84, "is": 8.1},
           "integer": {"fid": 5.85, "is": 8.2, "mean_abs_pixel_diff_vs_fake": 0.003,
                       "check": {"mismatches": 0, "elements": 99}}}
    log("a progress line")
    return {"rows": [{"method": "fp", "bits": "W32A32", "size_mb": 1.0, "gbitops": 2.0,
                      "fake": {"fid": 5.17, "is": 8.3}}, row]}


@pytest.mark.parametrize("name, module, fake, row_text", [
    ("repq-vit", "repqvit_table", _fake_vit_table, "| W4A4 | RepQ-ViT (both reparameterized) | 91.25"),
    ("qdiffusion", "qdiffusion_table", _fake_unet_table, "| qdiffusion | W4A8 |")])
def test_table_prints_each_row_once_and_writes_markdown(name, module, fake, row_text, tmp_path, monkeypatch, capsys):
    """stdout holds the table once, progress goes to stderr, and ``table.md`` in ``--out`` is the same table.
    (``run_table`` is replaced by a canned result; the tables' numbers are tested in test_repqvit/test_qdiffusion.)"""
    import importlib
    mod = importlib.import_module(f"pyqsim.experiments.{module}")
    monkeypatch.setattr(mod, "run_table", lambda out_dir, **kw: fake(out_dir, **kw))
    out_dir = tmp_path / "t"
    out_dir.mkdir()
    code, out, err = _run(["table", name, "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert "a progress line" in err and "a progress line" not in out
    assert out.count(row_text) == 1
    assert (out_dir / "table.md").read_text().strip() == out.strip()
