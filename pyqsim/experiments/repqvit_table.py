"""RepQ-ViT ablation table on the bundled digits ViT: full precision; post-LayerNorm activations layer-wise,
channel-wise or reparameterized; post-softmax attention log2, log-sqrt2 or reparameterized (log-sqrt2 run as
shift-based log2); at W4A4 and W6A6. Per row: fake-quant and integer top-1 (mean over calibration seeds),
integer-vs-fake top-1 agreement, kernel-vs-reference mismatches over a whole test-set run, calibration time.
A second table repeats the post-LN rows on a function-preserving variant of the model whose post-LN
activations have outlier channels, as large trained ViTs do (the case RepQ-ViT is designed for).
Writes table.json, table.md and the parameter files to --out; prints the Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

BITS = ((4, 4), (6, 6))
# (label, post_ln, softmax); RepQ-ViT's own choices are "reparam" for both
ROWS = (
    ("post-LN layer-wise", "layer", "reparam"),
    ("post-LN channel-wise", "channel", "reparam"),
    ("softmax log2", "reparam", "log2"),
    ("softmax log-sqrt2", "reparam", "log-sqrt2"),
    ("RepQ-ViT (both reparameterized)", "reparam", "reparam"),
)
OUTLIER_ROWS = ROWS[:2] + ROWS[4:]
OUTLIERS = {"channels": 4, "factor": 10.0, "seed": 0}
NO_INTEGER_FORM = {
    "channel": "per-channel activation scales do not factor out of an integer GEMM",
    "log-sqrt2": "float sqrt(2) weights are not shifts; its integer form is the reparameterized row",
}


def with_outlier_channels(model, channels: int = 4, factor: float = 10.0, seed: int = 0):
    """Copy of a pyqsim ViT computing the same function whose post-LN activations have outlier channels:
    gamma and beta of ``channels`` random channels of every LayerNorm times ``factor``, the input columns of the
    Linear that reads it divided by ``factor``."""
    import torch

    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    pairs = [(b.norm1, b.attn.qkv) for b in m.blocks] + [(b.norm2, b.mlp.fc1) for b in m.blocks] + [(m.norm, m.head)]
    with torch.no_grad():
        for ln, lin in pairs:
            idx = torch.randperm(ln.weight.numel(), generator=gen)[:channels]
            ln.weight[idx] *= factor
            ln.bias[idx] *= factor
            lin.weight[:, idx] /= factor
    return m


def count_mismatches(program, images: np.ndarray, backend: str, chunk: int = 90) -> dict:
    """Integer run on ``backend``; every recorded integer-op call is re-run on backend="reference" with the
    same inputs and its output compared with ==."""
    from .. import ops
    from ..runtime.verify import replay_counts

    total = {"op_calls": 0, "elements": 0, "mismatches": 0}
    for i in range(0, len(images), chunk):
        with ops.record() as calls:
            program.run(images[i:i + chunk], backend=backend)
        for k, v in replay_counts(calls).items():
            total[k] += v
    return {"backend": ops.resolve_backend(backend, "int_gemm"), **total}


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100)


def _run_row(model, cfg, label, x_tr_t, x_te, y_te, seeds, calib_images, backend, stem) -> dict:
    """One table row: calibrate on ``seeds`` calibration draws, fake-quant and integer top-1, agreement,
    and (first seed) the kernel-vs-reference mismatch count; keeps the first seed's parameter file."""
    import torch

    from ..calib.repqvit import calibrate, calibration_batch
    from ..runtime import load

    fake, integer, agree, secs = [], [], [], []
    row = {"bits": f"W{cfg.w_bits}A{cfg.a_bits}", "label": label, "post_ln": cfg.post_ln, "softmax": cfg.softmax}
    exportable = cfg.post_ln not in NO_INTEGER_FORM and cfg.softmax not in NO_INTEGER_FORM
    for seed in range(seeds):
        res = calibrate(model, calibration_batch(x_tr_t, calib_images, seed), cfg)
        secs.append(res.seconds)
        fake_logits = res(torch.from_numpy(x_te)).numpy()
        fake.append(_top1(fake_logits, y_te))
        if not exportable:
            continue
        path = Path(f"{stem}_s{seed}.safetensors")
        res.export(path)
        program = load(path)
        int_logits = program.run(x_te, backend=backend)
        integer.append(_top1(int_logits, y_te))
        agree.append(float((int_logits.argmax(1) == fake_logits.argmax(1)).mean() * 100))
        if seed == 0:
            row["kernel_vs_reference"] = count_mismatches(program, x_te, backend)
        else:
            path.unlink()
    row.update(fake_top1=float(np.mean(fake)), fake_top1_std=float(np.std(fake)), fake_top1_seeds=fake,
               calib_seconds=float(np.mean(secs)))
    if integer:
        row.update(int_top1=float(np.mean(integer)), int_top1_seeds=integer, agreement=float(np.mean(agree)))
    else:
        row["int_top1"] = None
        row["no_integer_form"] = NO_INTEGER_FORM.get(cfg.post_ln) or NO_INTEGER_FORM[cfg.softmax]
    return row


def run_table(out_dir="pyqsim-report/repqvit", seeds: int = 5, bits=BITS, rows=ROWS, outlier_rows=OUTLIER_ROWS,
              calib_images: int = 32, backend: str = "auto", log=print) -> dict:
    """Compute the table (see module doc); writes ``table.json`` and the RepQ-ViT parameter files to ``out_dir``."""
    import torch

    from ..calib.repqvit import RepQConfig
    from ..models.vit import DIGITS_WEIGHTS, digits_split, load_npz

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = load_npz(DIGITS_WEIGHTS)
    x_tr, _, x_te, y_te = digits_split()
    x_tr_t, x_te_t = torch.from_numpy(x_tr), torch.from_numpy(x_te)
    with torch.no_grad():
        fp = _top1(model(x_te_t).numpy(), y_te)
    result = {"model": "digits ViT (pyqsim/models/weights/digits_vit.npz)", "test_images": int(len(y_te)),
              "calib_images": calib_images, "seeds": seeds, "torch_threads": torch.get_num_threads(),
              "fp32_top1": fp, "rows": [], "outliers": dict(OUTLIERS), "outlier_rows": []}
    log(f"FP32 top-1 {fp:.2f} % on {len(y_te)} test images")
    variant = with_outlier_channels(model, **OUTLIERS)
    with torch.no_grad():
        result["outliers"]["fp32_top1"] = _top1(variant(x_te_t).numpy(), y_te)
    for key, net, table_rows, tag in (("rows", model, rows, ""), ("outlier_rows", variant, outlier_rows, "_outl")):
        for w_bits, a_bits in bits:
            for label, post_ln, softmax in table_rows:
                row = _run_row(net, RepQConfig(w_bits, a_bits, post_ln, softmax), label, x_tr_t, x_te, y_te, seeds,
                               calib_images, backend, out / f"repqvit_w{w_bits}a{a_bits}_{post_ln}_{softmax}{tag}")
                result[key].append(row)
                log(f"{'outlier model ' if tag else ''}{row['bits']} {label}: done "
                    f"({row['calib_seconds']:.1f} s calibration per seed)")
    result.update(wall_seconds=round(time.perf_counter() - t0, 1), load_average=os.getloadavg()[0])
    (out / "table.json").write_text(json.dumps(result, indent=1))
    return result


def _fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def _row_md(r: dict) -> str:
    kv = r.get("kernel_vs_reference")
    mism = f"{kv['mismatches']} / {kv['elements']:,} ({kv['backend']})" if kv else "n/a"
    return (f"| {r['bits']} | {r['label']} | {r['fake_top1']:.2f} ± {r['fake_top1_std']:.2f} | {_fmt(r['int_top1'])} | "
            f"{_fmt(r.get('agreement'), '.1f')} | {mism} | {r['calib_seconds']:.2f} |")


def markdown(result: dict) -> str:
    def table(fp, rows):
        return ("| bits | quantizers | fake-quant top-1 (%) | integer top-1 (%) | int-vs-fake agreement (%) | "
                "kernel-vs-reference mismatches / elements (backend) | calibration (s) |\n"
                "|---|---|---|---|---|---|---|\n"
                f"| FP32 | full precision | {fp:.2f} | — | — | — | — |\n" + "\n".join(_row_md(r) for r in rows))

    o = result["outliers"]
    return (table(result["fp32_top1"], result["rows"])
            + f"\n\nSame model with outlier channels ({o['channels']} per LayerNorm, x{o['factor']:g}, function-preserving):\n\n"
            + table(o["fp32_top1"], result["outlier_rows"]))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The table's options (``pyqsim table repq-vit`` and ``python -m pyqsim.experiments.repqvit_table``)."""
    from .._argtypes import BACKEND_CHOICES, positive_int

    ap.add_argument("--out", default="pyqsim-report/repqvit",
                    help="folder for table.json, table.md and parameter files (default: %(default)s)")
    ap.add_argument("--seeds", type=positive_int, default=5,
                    help="calibration-set draws averaged per row (default: %(default)s)")
    ap.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="integer-op backend (default: auto)")
    ap.add_argument("--quick", action="store_true", help="one calibration seed")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="torch CPU threads (default: 1, the fastest for this model)")
    ap.add_argument("--deit-s", action="store_true", help="only time RepQ-ViT calibration of a random DeiT-S")
    ap.add_argument("--json", action="store_true", help="print the JSON result instead of Markdown")


def run(args) -> int:
    """Compute the table with parsed options; progress on stderr, the table once on stdout."""
    import torch

    torch.set_num_threads(args.threads)
    if args.deit_s:
        from ..calib.repqvit import time_deit_small

        print(json.dumps(time_deit_small(threads=max(args.threads, 2)), indent=1))
        return 0
    result = run_table(args.out, seeds=1 if args.quick else args.seeds, backend=args.backend,
                       log=(lambda r: None) if args.json else (lambda r: print(r, file=sys.stderr, flush=True)))
    md = markdown(result)
    (Path(args.out) / "table.md").write_text(md + "\n")
    print(json.dumps(result, indent=1) if args.json else md)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyqsim.experiments.repqvit_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
