"""Q-Diffusion table for the bundled digits UNet: FP, linear quant and Q-Diffusion at W8A32, W4A32, W8A8 and
W4A8 with size, bit-operations, FID and IS for fake-quant and integer sampling, the fake-vs-integer pixel
difference, the kernel-vs-reference mismatch count of a whole integer sampling run, and calibration time.
Writes table.json, table.md, sample grids (PNG) and the parameter files to --out; prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROWS = ((8, 32), (4, 32), (8, 8), (4, 8))
METHODS = ("linear", "qdiffusion")


def count_mismatches(program, sampler, n: int, seed: int, backend: str = "auto") -> dict:
    """Integer sampling of ``n`` images on ``backend``; every recorded integer-op call is re-run on
    backend="reference" with the same inputs and its output compared with ==."""
    from .. import ops
    from ..runtime.verify import replay_counts

    shape = tuple(program.inputs[0]["shape"][1:])
    with ops.record() as calls:
        sampler.sample(lambda x, t: program.run(x, t, backend=backend), (n, *shape), seed=seed)
    return {"backend": ops.resolve_backend(backend, "int_conv2d"), **replay_counts(calls)}


def save_grid(path: Path, panels: dict[str, np.ndarray], n: int = 64) -> None:
    """PNG with one 8x8 grid of samples per panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = int(np.sqrt(n))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, imgs) in zip(np.atleast_1d(axes), panels.items()):
        im = np.pad(np.clip(imgs[:side * side, 0], -1, 1), ((0, 0), (1, 1), (1, 1)), constant_values=-1)
        r = im.shape[-1]
        grid = im.reshape(side, side, r, r).transpose(0, 2, 1, 3).reshape(side * r, side * r)
        ax.imshow(-grid, cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_table(out_dir="pyqsim-report/qdiffusion", n_samples: int = 1000, steps: int = 20, eta: float = 0.0,
              skip: str = "quadratic", cali_n: int = 64, cali_st: int = 10, rows=ROWS, methods=METHODS,
              backend: str = "auto", check_n: int = 8, seed: int = 0, calib_overrides: dict | None = None,
              log=print) -> dict:
    """Compute the table (see module doc); writes params files, PNG grids and ``table.json`` to ``out_dir``."""
    import torch

    from ..calib.qdiffusion import QDiffConfig, calibrate, export_params, generate_calibration_data
    from ..eval.cost import model_cost
    from ..runtime.cost import program_cost
    from ..eval.fid import fid, inception_score
    from ..models.ddim import DDIMSampler, torch_eps_fn
    from ..models.digits_classifier import load_digits_classifier
    from ..models.unet import load_digits_unet
    from ..runtime import load

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, clf = load_digits_unet(), load_digits_classifier()
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    sampler = DDIMSampler(steps=steps, eta=eta, skip=skip)

    def sample(eps_fn):
        t0 = time.time()
        x = np.clip(sampler.sample(eps_fn, (n_samples, *shape), seed=seed), -1, 1)
        return x, time.time() - t0

    def scores(x):
        return {"fid": fid(x, clf=clf), "is": inception_score(x, clf=clf)}

    example = (torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long))
    fp_x, fp_t = sample(torch_eps_fn(model))
    fp_cost = model_cost(model, example)
    result = {"setup": {"n_samples": n_samples, "steps": steps, "eta": eta, "skip": skip, "cali_n": cali_n,
                        "cali_st": cali_st, "seed": seed, "torch_threads": torch.get_num_threads()},
              "rows": [{"method": "fp", "bits": "W32A32", "size_mb": fp_cost["size_mb"], "gbitops": fp_cost["gbitops"],
                        "fake": {**scores(fp_x), "sample_seconds": fp_t}}]}
    log("FP32 sampled and scored")
    save_grid(out / "fp.png", {"FP32": fp_x})
    t0 = time.time()
    cali = generate_calibration_data(model, sampler, cali_n, cali_st, shape, seed=seed + 1)
    result["setup"]["cali_seconds"] = time.time() - t0
    result["setup"]["cali_samples"] = int(len(cali["x"]))
    for w_bits, a_bits in rows:
        for method in methods:
            qcfg = QDiffConfig(w_bits=w_bits, a_bits=a_bits, method=method, **(calib_overrides or {}))
            t0 = time.time()
            qmodel = calibrate(model, cali, qcfg)
            cal_s = time.time() - t0
            fq_x, fq_t = sample(torch_eps_fn(qmodel))
            path = out / f"{method}_{qcfg.label}.params"
            export_params(qmodel, path)
            program = load(path)
            integer = a_bits <= 8
            int_x, int_t = sample(lambda x, t: program.run(x, t, backend=backend))
            cost = program_cost(program)["total"]
            row = {"method": method, "bits": qcfg.label, "size_mb": cost["size_mb"] + cost["float_size_mb"],
                   "gbitops": cost["gbitops"], "stored_mb": sum(t.nbytes for t in program.tensors.values()) / 1e6,
                   "calib_seconds": cal_s, "fake": {**scores(fq_x), "sample_seconds": fq_t},
                   "integer": {**scores(int_x), "sample_seconds": int_t, "integer_ops": integer,
                               "mean_abs_pixel_diff_vs_fake": float(np.abs(int_x - fq_x).mean())}}
            if integer:
                row["integer"]["check"] = count_mismatches(program, sampler, check_n, seed, backend)
            result["rows"].append(row)
            log(f"{method} {qcfg.label}: done ({cal_s:.0f} s calibration)")
            save_grid(out / f"{method}_{qcfg.label}.png", {f"{method} {qcfg.label} fake-quant": fq_x,
                                                          f"{method} {qcfg.label} integer": int_x})
    (out / "table.json").write_text(json.dumps(result, indent=1))
    return result


def markdown(result: dict) -> str:
    """The table as Markdown."""
    lines = ["| method | W/A | size (MB) | Gbit-ops | FID fake | IS fake | FID int | IS int | |int-fake| px | "
             "mismatches | calib (s) |", "|" + "---|" * 11]
    for r in result["rows"]:
        i = r.get("integer", {})
        chk = i.get("check")
        mm = f"{chk['mismatches']}/{chk['elements']}" if chk else "n/a (float)" if i else ""
        fmt = (lambda v, f: f.format(v) if v is not None else "")
        lines.append(f"| {r['method']} | {r['bits']} | {r['size_mb']:.3f} | {r['gbitops']:.3f} | "
                     f"{r['fake']['fid']:.2f} | {r['fake']['is']:.2f} | {fmt(i.get('fid'), '{:.2f}')} | "
                     f"{fmt(i.get('is'), '{:.2f}')} | {fmt(i.get('mean_abs_pixel_diff_vs_fake'), '{:.1e}')} | {mm} | "
                     f"{fmt(r.get('calib_seconds'), '{:.0f}')} |")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The table's options (``pyqsim table qdiffusion`` and ``python -m pyqsim.experiments.qdiffusion_table``)."""
    from .._argtypes import BACKEND_CHOICES, positive_int

    ap.add_argument("--out", default="pyqsim-report/qdiffusion",
                    help="folder for table.json, table.md, PNGs and parameter files (default: %(default)s)")
    ap.add_argument("--samples", type=positive_int, default=1000,
                    help="images sampled per row for FID/IS (default: %(default)s)")
    ap.add_argument("--steps", type=positive_int, default=20, help="DDIM steps (default: %(default)s)")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic (default: %(default)s)")
    ap.add_argument("--skip", choices=("uniform", "quadratic"), default="quadratic",
                    help="DDIM timestep spacing (default: %(default)s)")
    ap.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="integer-op backend (default: auto)")
    ap.add_argument("--quick", action="store_true", help="W4A8 only, 200 samples, short calibration")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="torch CPU threads (default: 1, the fastest for this model)")
    ap.add_argument("--json", action="store_true", help="print the JSON result instead of Markdown")


def run(args) -> int:
    """Compute the table with parsed options; progress on stderr, the table once on stdout."""
    import torch
    torch.set_num_threads(args.threads)
    kw = {}
    if args.quick:
        kw = dict(rows=((4, 8),), calib_overrides={"weight_iters": 100, "act_iters": 50})
        args.samples = 200
    result = run_table(args.out, n_samples=args.samples, steps=args.steps, eta=args.eta, skip=args.skip,
                       backend=args.backend,
                       log=(lambda r: None) if args.json else (lambda r: print(r, file=sys.stderr, flush=True)), **kw)
    md = markdown(result)
    (Path(args.out) / "table.md").write_text(md + "\n")
    print(json.dumps(result, indent=1) if args.json else md)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyqsim.experiments.qdiffusion_table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
