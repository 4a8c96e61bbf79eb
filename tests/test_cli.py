"""The pyqsim command line on a real exported model: run, verify, vectors (re-checked from hex alone), cost, info.

Integer outputs are compared with ``==``; nothing here has a tolerance.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from pyqsim.cli import main

pytestmark = pytest.mark.needs_torch


@pytest.fixture(scope="module")
def vit_params(tmp_path_factory):
    from pyqsim import app
    path = tmp_path_factory.mktemp("cli") / "vit.safetensors"
    app.calibrate("repq-vit", path, w_bits=4, a_bits=4, calib_n=8, progress=False)
    return str(path)


def run_json(capsys, argv):
    rc = main(argv + ["--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_info_json(capsys):
    rc, info = run_json(capsys, ["info"])
    assert rc == 0 and info["backends"]["reference"] is True and "version" in info


def test_run_prints_predictions(capsys, vit_params, tmp_path):
    out = tmp_path / "logits.npy"
    rc, res = run_json(capsys, ["run", vit_params, "--n", "5", "--backend", "reference", "--out", str(out)])
    assert rc == 0 and len(res["predictions"]) == 5
    assert np.load(out).shape == (5, 10)


@pytest.mark.needs_cpu_ext  # without it "auto" is the reference: the comparison would be with itself
def test_run_backends_agree_bitwise(capsys, vit_params, tmp_path):
    outs = []
    for b in ("reference", "auto"):
        p = tmp_path / f"{b}.npy"
        assert main(["run", vit_params, "--n", "6", "--backend", b, "--out", str(p)]) == 0
        outs.append(np.load(p))
    capsys.readouterr()
    assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))


@pytest.mark.needs_cpu_ext  # without it only the reference exists: verify compares nothing (next test)
def test_verify_passes(capsys, vit_params):
    rc, res = run_json(capsys, ["verify", vit_params, "--n", "3"])
    assert rc == 0 and res["ok"] and res["ops_checked"] > 0 and "cpu" in res["backends"]


def test_verify_with_only_the_reference_says_so(capsys, vit_params):
    from pyqsim.cli import EXIT_NOTHING_COMPARED
    rc, res = run_json(capsys, ["verify", vit_params, "--n", "1", "--backends", "reference"])
    assert rc == EXIT_NOTHING_COMPARED == 3 and not res["ok"] and res["backends"] == []
    assert main(["verify", vit_params, "--n", "1", "--backends", "reference"]) == 3
    assert "NOT VERIFIED" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    assert "3 when only the reference backend is available" in " ".join(capsys.readouterr().out.split())


def test_vectors_recompute_from_hex_alone(capsys, vit_params, tmp_path):
    from pyqsim.runtime.vectors import recompute_layer
    rc, res = run_json(capsys, ["vectors", vit_params, "--out", str(tmp_path / "vec")])
    assert rc == 0 and res["layers"] > 0
    manifest = json.loads((tmp_path / "vec" / "manifest.json").read_text())
    ops_seen = {l["op"] for l in manifest["layers"]}
    assert {"int_gemm", "int_conv2d", "log2_attn_matmul"} <= ops_seen
    for layer in manifest["layers"]:
        got, expected = recompute_layer(layer, tmp_path / "vec")
        assert np.array_equal(got, expected), layer["scope"]


def test_cost_totals(capsys, vit_params):
    rc, res = run_json(capsys, ["cost", vit_params])
    t = res["total"]
    assert rc == 0 and t["macs"] > 0 and t["bitops"] == sum(l["bitops"] for l in res["layers"])
    assert all(l["w_bits"] in (4, 8) for l in res["layers"] if l["op"] != "log2_attn_matmul")


def test_missing_file_is_a_clear_error(capsys):
    assert main(["verify", "no-such-file.safetensors"]) == 2
    assert "not found" in capsys.readouterr().err


def test_corrupted_file_is_a_clear_error(capsys, vit_params, tmp_path):
    bad = tmp_path / "bad.safetensors"
    blob = bytearray(open(vit_params, "rb").read())
    blob[-3] ^= 0xFF
    bad.write_bytes(bytes(blob))
    assert main(["run", str(bad)]) == 2
    assert "checksum" in capsys.readouterr().err


def test_help_on_every_subcommand(capsys):
    for cmd in ("demo", "calibrate", "run", "verify", "vectors", "cost", "info"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
    assert "--json" in capsys.readouterr().out


@pytest.mark.parametrize("bits", range(2, 9))
def test_cost_counts_the_bits_the_codes_use(bits, tmp_path, capsys):
    """W/A b for b in 2..8: every integer layer's weights count b bits (stored in int8 or packed uint4 alike),
    inputs b bits (the patch embedding reads the 8-bit image codes), size = parameters x b / 8e6 MB."""
    import torch
    from pyqsim.calib.repqvit import RepQConfig, calibrate, calibration_batch
    from pyqsim.models.vit import digits_split, digits_vit

    res = calibrate(digits_vit(), calibration_batch(torch.from_numpy(digits_split()[0]), 8, 0),
                    RepQConfig(bits, bits))
    path = tmp_path / "vit.safetensors"
    res.export(path)
    rc, cost = run_json(capsys, ["cost", str(path)])
    assert rc == 0
    weighted = [l for l in cost["layers"] if l["weight_params"]]
    assert weighted and all(l["w_bits"] == bits for l in weighted)
    assert all(l["a_bits"] == (8 if l["op"] == "int_conv2d" else bits) for l in weighted)
    assert all(l["size_mb"] == pytest.approx(l["weight_params"] * bits / 8e6, rel=1e-12) for l in weighted)
    assert all(l["bitops"] == l["macs"] * l["w_bits"] * l["a_bits"] for l in cost["layers"])
