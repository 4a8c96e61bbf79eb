"""The demo's report: console summary, report.md (metrics, settings, what a good result looks like) and figures."""
from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import numpy as np

SQNR_CAP_DB = 80.0  # an exact layer (infinite SQNR) is drawn at this height


def _table_defaults() -> dict:
    """Settings of the paper-table runs that the README's results table comes from (``pyqsim table``)."""
    from .calib.qdiffusion import QDiffConfig
    from .experiments import qdiffusion_table, repqvit_table

    vit = inspect.signature(repqvit_table.run_table).parameters
    unet = inspect.signature(qdiffusion_table.run_table).parameters
    cfg = QDiffConfig()
    return {"vit_seeds": vit["seeds"].default, "vit_calib": vit["calib_images"].default,
            "unet_cali_n": unet["cali_n"].default, "unet_cali_st": unet["cali_st"].default,
            "unet_weight_iters": cfg.weight_iters, "unet_act_iters": cfg.act_iters,
            "unet_samples": unet["n_samples"].default, "unet_steps": unet["steps"].default}


def summary(vit: dict, unet: dict, total_s: float, info: dict, st) -> str:
    """What ``pyqsim demo`` prints: the results table and the settings note."""
    return summary_table(vit, unet, total_s, info) + "\n\n" + textwrap.fill(settings_note(st), 110)


def summary_table(vit: dict, unet: dict, total_s: float, info: dict) -> str:
    """The results table (console and report.md)."""
    vc, uc = vit["check"], unet["check"]
    lines = [
        f"pyqsim demo: backend {vc['backend']} ({info.get('cpu', {}).get('isa', 'reference')}), total {total_s:.1f} s",
        "",
        "model              bits   metric   FP32    fake-quant  integer   int-vs-fake          kernel-vs-reference mismatches",
        f"digits ViT         W4A4   top-1 %  {vit['fp32_top1']:6.2f}  {vit['fake_top1']:9.2f}  {vit['int_top1']:8.2f}  "
        f"{vit['int_vs_fake_agreement']:5.1f}% agree          {vc['mismatches']} / {vc['elements']:,} elements",
        f"digits UNet        W4A8   FID      {unet['fp32']['fid']:6.2f}  {unet['fake']['fid']:9.2f}  {unet['integer']['fid']:8.2f}  "
        f"|dx| {unet['mean_abs_pixel_diff_int_vs_fake']:.4f}          {uc['mismatches']} / {uc['elements']:,} elements",
        f"                          IS       {unet['fp32']['is']:6.2f}  {unet['fake']['is']:9.2f}  {unet['integer']['is']:8.2f}",
        "",
        f"calibration: RepQ-ViT {vit['calib_seconds']:.1f} s, Q-Diffusion {unet['calib_seconds']:.1f} s; "
        f"FID/IS over {unet['samples']} samples, {unet['ddim_steps']} DDIM steps",
    ]
    return "\n".join(lines)


def settings_note(st) -> str:
    """One paragraph: the demo's settings against those of the README's results table."""
    t = _table_defaults()
    return (f"Demo settings (shorter than the README's results table, one seed): ViT calibrated on {st.vit_calib} "
            f"training images drawn with seed 0 (table: mean over {t['vit_seeds']} draws, seeds 0-{t['vit_seeds'] - 1}); "
            f"UNet calibrated on {st.unet_cali_n} x {st.unet_cali_st} (trajectories x steps) inputs with "
            f"{st.unet_weight_iters}/{st.unet_act_iters} weight/activation iterations (table: "
            f"{t['unet_cali_n']} x {t['unet_cali_st']}, {t['unet_weight_iters']}/{t['unet_act_iters']}), "
            f"{st.unet_samples} samples from seed 0 with {st.unet_steps} DDIM steps (table: {t['unet_samples']}, "
            f"{t['unet_steps']}). Expect numbers near, not equal to, the table's.")


def _good(vit: dict, unet: dict) -> list[str]:
    """What a good result looks like, with this run's values beside each expectation."""
    vc, uc = vit["check"], unet["check"]
    ratio = unet["fake"]["fid"] / unet["fp32"]["fid"] if unet["fp32"]["fid"] > 0 else float("inf")
    return [
        f"- **Mismatches must be 0** (this run: ViT {vc['mismatches']}, UNet {uc['mismatches']}). Any other count "
        "is a kernel bug: the integer kernels are specified to equal the reference bit for bit (docs/spec.md).",
        f"- **Integer equals fake-quant up to float rounding.** ViT top-1 agreement near 100 % (this run: "
        f"{vit['int_vs_fake_agreement']:.1f} %) and integer top-1 within a few test images of fake-quant "
        f"({vit['int_top1']:.2f} vs {vit['fake_top1']:.2f} %); UNet integer FID within a few hundredths to tenths of "
        f"fake-quant FID ({unet['integer']['fid']:.2f} vs {unet['fake']['fid']:.2f}) and mean pixel difference "
        f"of order 1e-3 to 1e-2 on the [-1, 1] pixel scale (this run: {unet['mean_abs_pixel_diff_int_vs_fake']:.4f}).",
        f"- **Quantization costs little.** RepQ-ViT W4A4 loses a few points of top-1 against FP32 (this run: "
        f"{vit['fp32_top1'] - vit['fake_top1']:.2f} points); Q-Diffusion W4A8 keeps FID within about 1.3x of FP32 "
        f"(this run: {ratio:.2f}x). With the demo's single seed and shorter calibration, a run somewhat above 1.3x "
        "is seed noise, not a failure (docs/qdiffusion.md: the FP32 FID alone varies from 4.0 to 5.2 over seeds).",
    ]


def markdown(result: dict) -> str:
    """report.md: the numbers, what each metric means, the settings and what a good result looks like."""
    vit, unet, st = result["vit"], result["unet"], result["settings_obj"]
    table = summary_table(vit, unet, result["seconds"], result["build"])
    vc = vit["check"]
    md = [
        "# pyqsim demo report", "",
        "Two small quantized networks, calibrated here, exported to integer parameter files and run on the integer "
        f"kernels (backend `{vc['backend']}`), then checked against pyqsim's NumPy reference.", "",
        "```", table, "```", "",
        "## What the columns mean", "",
        f"- **top-1 %** (ViT): share of the {vit['test_images']} held-out scikit-learn 8x8 digits test images whose "
        "predicted class is right.",
        "- **FID** (UNet, lower is better): Fréchet distance between generated samples and all 1,797 real 8x8 digits, "
        "in the 64-d penultimate-layer features of pyqsim's bundled digits classifier (not Inception; nothing is "
        "downloaded). Comparable only with other FIDs computed this way: half of the real digits against all of them "
        "scores 0.59.",
        "- **IS** (UNet, higher is better): Inception-Score-like figure exp(E KL(p(y|x) || p(y))) from the same "
        "classifier's 10 class probabilities; at most 10, the real digits score 9.97.",
        "- **FP32**: the float model. **fake-quant**: the PyTorch model with quantize-dequantize in float (what "
        "papers report). **integer**: the exported parameter file run by pyqsim's integer runtime, as integer "
        "hardware would compute it.",
        "- **int-vs-fake**: how far the integer run is from fake-quant. ViT: share of test images where both predict "
        "the same class. UNet: mean absolute pixel difference |dx| between integer and fake-quant samples from the "
        "same starting noise (pixels in [-1, 1]). They differ only where the integer arithmetic rounds differently "
        "from PyTorch's float arithmetic.",
        "- **kernel-vs-reference mismatches**: every integer op call of the run (GEMM, convolution, attention "
        "matmul, requantization) is run again on `backend=\"reference\"` (the NumPy golden model of docs/spec.md) with "
        f"the same inputs, and the outputs are compared element by element with `==` (ViT: the whole test set; "
        f"UNet: {st.check_samples} images sampled end to end). The count is of elements that differ.", "",
        "## Settings", "",
        settings_note(st), "",
        "Full settings: `report.json` (`settings`). The README's numbers come from `pyqsim table repq-vit` and "
        "`pyqsim table qdiffusion` (docs/repqvit.md, docs/qdiffusion.md).", "",
        "## What a good result looks like", "",
        *_good(vit, unet), "",
        "## Figures", "",
        "![samples](samples.png)", "",
        "`samples.png`: 64 UNet samples each from the FP32, fake-quant and integer models, same starting noise.", "",
        "![layer error](layer_error.png)", "",
        "`layer_error.png`: per layer (Linear / Conv2d), the signal-to-quantization-noise ratio of its output against "
        "the FP32 model's, in dB (higher is better; 20 dB = error a tenth of the signal's amplitude), for the "
        "fake-quant model (blue) and for the integer run (orange). All three models get the same input, so a "
        "layer's error includes what earlier layers passed on. Where the two bars match, the integer arithmetic "
        "adds no error of its own. A layer without an orange bar has no float32 integer output recorded under its "
        "name (the ViT's qkv layers, for one, hand integer codes to the attention). Bars are capped at "
        f"{SQNR_CAP_DB:.0f} dB.", "",
        "![attention codes](attn_codes.png)", "",
        "`attn_codes.png`: " + attn_caption(vit["attn_code_hist"]), "",
        f"Parameter files: `{vit['params']}`, `{unet['params']}` (run them with `pyqsim run`, check them with "
        "`pyqsim verify`, export vectors with `pyqsim vectors`).",
    ]
    return "\n".join(md) + "\n"


def attn_caption(hist) -> str:
    """The attention-code histogram in words."""
    hist = np.asarray(hist, dtype=np.int64)
    total, zero, n = int(hist.sum()), int(hist[-1]), len(hist)
    top = int(np.argmax(hist[:-1])) if n > 1 else 0
    half = n // 2
    small = int(hist[half:-1].sum())
    pct = lambda v: 100 * v / max(total, 1)  # noqa: E731
    return (f"how often each of the {n} codes occurs among the {total:,} post-softmax attention probabilities of "
            "the ViT's integer run on the test set (log scale). Code c stands for the probability delta x 2^(-c/2) "
            "(log-sqrt2 quantization, RepQ-ViT): small codes are large probabilities, and every two codes the "
            f"probability halves. The most frequent code is {top}; {pct(small):.1f} % of the probabilities have a "
            f"code of {half} or more (at most delta x 2^-{half // 2}). The last, gray bar (code {n - 1}) is the "
            f"reserved code for exactly zero, taken by probabilities below the smallest power: {zero:,} "
            f"({pct(zero):.1f} %).")


def figures(out: Path, vit: dict, unet: dict) -> list[str]:
    """samples.png, layer_error.png and attn_codes.png in ``out``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .experiments.qdiffusion_table import save_grid

    save_grid(out / "samples.png", unet.pop("_grids"))
    _layer_error_figure(plt, out / "layer_error.png", (vit, unet))
    fig, ax = plt.subplots(figsize=(8, 4.6))
    hist = vit["attn_code_hist"]
    ax.bar(range(len(hist)), hist, color=["tab:orange"] * (len(hist) - 1) + ["tab:gray"])
    ax.set_xticks(range(len(hist)))
    ax.set_xlabel("log-sqrt2 code c: probability delta * 2^(-c/2); gray: reserved code for exactly 0")
    ax.set_ylabel("count (log scale)")
    ax.set_yscale("log")
    ax.set_title("digits ViT W4A4: post-softmax attention codes (integer run, test set)")
    fig.text(0.01, 0.01, "How often each code occurs. Small codes are large probabilities (every two codes the "
             "probability halves);\nthe gray bar counts the probabilities too small for the smallest code, "
             "stored as exactly zero.", fontsize=8.5, va="bottom")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out / "attn_codes.png", dpi=110)
    plt.close(fig)
    return ["samples.png", "layer_error.png", "attn_codes.png"]


def _layer_error_figure(plt, path: Path, results) -> None:
    """Horizontal bars, one row per layer, fake-quant and integer SQNR side by side; height grows with the count."""
    counts = [max(len(r["layer_sqnr_db"]), 1) for r in results]
    row_in = 0.2
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.6 * len(results) + row_in * sum(counts)),
                             gridspec_kw={"height_ratios": [c + 6 for c in counts]})
    for ax, res in zip(np.atleast_1d(axes), results):
        names = list(res["layer_sqnr_db"])
        integer = res.get("layer_sqnr_db_integer", {})
        y = np.arange(len(names))
        fake = [min(res["layer_sqnr_db"][n], SQNR_CAP_DB) for n in names]
        ints = [min(integer[n], SQNR_CAP_DB) if n in integer else np.nan for n in names]
        ax.barh(y - 0.2, fake, height=0.4, color="tab:blue", label="fake-quant vs FP32")
        ax.barh(y + 0.2, ints, height=0.4, color="tab:orange", label="integer run vs FP32")
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=7.5)
        ax.invert_yaxis()
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_xlabel("SQNR of the layer output vs FP32 (dB, higher is better)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{res['model']} {res['bits']}: per-layer output error ({len(names)} layers, network order)",
                     fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
