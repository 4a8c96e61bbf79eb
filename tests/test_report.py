"""The demo report (pyqsim/report.py) and the per-layer errors it plots (pyqsim/app.py ``layer_errors``), on canned
results: the Markdown explains every metric and states the settings, the figures grow with the layer count, and
the integer layer error is the SQNR of the recorded integer output. SQNR is float64 arithmetic on both sides of
each comparison, computed by the same ``_sqnr_db``: compared with ``==``.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pyqsim import app, ops, report


def _result(n_unet_layers: int = 70) -> dict:
    vit = {"model": "digits ViT", "bits": "W4A4", "params": "vit.safetensors", "test_images": 360,
           "fp32_top1": 98.06, "fake_top1": 93.33, "int_top1": 93.33, "int_vs_fake_agreement": 100.0,
           "calib_seconds": 9.0, "int_seconds": 1.0,
           "check": {"backend": "cpu", "mismatches": 0, "elements": 14_570_640},
           "attn_code_hist": [1, 2, 4, 8, 16, 32, 64, 128, 256, 128, 64, 32, 16, 8, 4, 100],
           "layer_sqnr_db": {f"blocks.{i}.mlp.fc1": 10.0 + i for i in range(4)} | {"head": float("inf")},
           "layer_sqnr_db_integer": {"blocks.0.mlp.fc1": 10.0}}
    names = [f"up.{i // 10}.block.{i % 10}.conv1" for i in range(n_unet_layers)]
    unet = {"model": "digits UNet", "bits": "W4A8", "params": "unet.safetensors", "samples": 1000, "ddim_steps": 20,
            "fp32": {"fid": 5.17, "is": 9.4}, "fake": {"fid": 7.50, "is": 9.3}, "integer": {"fid": 7.49, "is": 9.3},
            "mean_abs_pixel_diff_int_vs_fake": 0.003, "calib_seconds": 30.0,
            "check": {"backend": "cpu", "mismatches": 0, "elements": 4_464_640},
            "layer_sqnr_db": {n: 20.0 for n in names}, "layer_sqnr_db_integer": {n: 19.5 for n in names},
            "_grids": {"FP32": np.zeros((64, 1, 8, 8), np.float32)}}
    return {"vit": vit, "unet": unet, "seconds": 100.0, "build": {"cpu": {"isa": "avx2"}},
            "settings_obj": app.DemoSettings()}


def test_markdown_explains_metrics_settings_and_good_results():
    r = _result()
    md = report.markdown(r)
    for heading in ("## What the columns mean", "## Settings", "## What a good result looks like", "## Figures"):
        assert heading in md
    for term in ("**top-1 %**", "**FID**", "**IS**", "**int-vs-fake**", "**kernel-vs-reference mismatches**",
                 "digits classifier", "`==`", "**Mismatches must be 0**"):
        assert term in md, term
    st = r["settings_obj"]
    assert f"{st.vit_calib} training images drawn with seed 0" in md
    assert f"{st.unet_weight_iters}/{st.unet_act_iters} weight/activation iterations" in md
    assert "one seed" in md
    assert f"(this run: {7.50 / 5.17:.2f}x)" in md  # the FID ratio of this run against FP32


def test_console_summary_names_the_settings():
    r = _result()
    text = report.summary(r["vit"], r["unet"], 100.0, r["build"], r["settings_obj"])
    assert "93.33" in text and "7.50" in text and "Demo settings (shorter than the README's results table" in text
    assert max(len(l) for l in text.splitlines()[-4:]) <= 110


def test_attention_caption_counts():
    hist = _result()["vit"]["attn_code_hist"]
    text = report.attn_caption(hist)
    total = sum(hist)
    assert f"{total:,} post-softmax" in text
    assert "The most frequent code is 8" in text
    assert f"{100 * hist[-1] / total:.1f} %" in text and "reserved code for exactly zero" in text


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.needs_torch  # matplotlib comes with the same extra
def test_layer_error_figure_grows_with_the_layer_count(tmp_path):
    pytest.importorskip("matplotlib")
    sizes = {}
    for n in (10, 70):
        out = tmp_path / str(n)
        out.mkdir()
        r = _result(n)
        assert report.figures(out, r["vit"], r["unet"]) == ["samples.png", "layer_error.png", "attn_codes.png"]
        sizes[n] = _png_size(out / "layer_error.png")
    (w10, h10), (w70, h70) = sizes[10], sizes[70]
    assert w10 == w70 and h70 - h10 >= 60 * 0.2 * 100 * 0.9  # about 0.2 inch (20 px at 100 dpi) per layer row


@pytest.mark.needs_torch
@pytest.mark.needs_cpu_ext
def test_integer_layer_error_is_the_sqnr_of_the_recorded_output():
    """A layer's integer error: its float32 output recorded under the module's name, against the FP32 module."""
    import torch

    torch.manual_seed(0)
    fp = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    fake = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x = torch.rand(4, 6)
    rng = np.random.default_rng(1)
    xq = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    w = rng.integers(-127, 128, (5, 6), dtype=np.int8)
    got = {}

    def run_integer():
        with ops.scope("0"):  # named like the first Linear; the second has no integer output
            got["y"] = ops.int_gemm(xq, w, x_zero_point=128, out_dtype="float32", out_scale=0.01, backend="cpu")
        with ops.scope("0"):  # a second call under the same name is not the layer's output
            ops.int_gemm(xq, w, x_zero_point=0, out_dtype="float32", out_scale=0.02, backend="cpu")

    errs = app.layer_errors(fp, fake, (x,), run_integer)
    with torch.no_grad():
        fp0 = fp[0](x).numpy()
        fake_out = {"0": fake[0](x).numpy(), "2": fake(x).numpy()}
        fp_out = {"0": fp0, "2": fp(x).numpy()}
    assert set(errs["fake"]) == {"0", "2"} and set(errs["integer"]) == {"0"}
    for n in ("0", "2"):
        assert errs["fake"][n] == app._sqnr_db(fp_out[n], fake_out[n])
    assert errs["integer"]["0"] == app._sqnr_db(fp0, got["y"])


def test_layer_errors_find_every_layer_of_the_calibrated_digits_vit():
    """RepQ-ViT inserts quantized copies ("<path>_q") and its program's nodes carry that path: every Linear/Conv2d
    of the FP32 model gets a fake-quant and an integer error."""
    import torch
    from pyqsim.calib.repqvit import RepQConfig, calibrate, calibration_batch
    from pyqsim.models.vit import digits_split, digits_vit

    x_tr, _, x_te, _ = digits_split()
    model = digits_vit()
    res = calibrate(model, calibration_batch(torch.from_numpy(x_tr), 16, 0), RepQConfig(4, 4))
    program = res.lower()
    errs = app.layer_errors(model, res.model, (torch.from_numpy(x_te[:8]),),
                            lambda: program.run(x_te[:8], backend="reference"))
    layers = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert set(errs["fake"]) == layers and set(errs["integer"]) == layers
    assert all(np.isfinite(v) and v > 0 for v in errs["integer"].values())
