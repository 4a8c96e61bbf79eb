"""Float stages (spec §15) and float -> code quantization (§2) of pyqsim's CPU backend against the NumPy reference
and PyTorch fp32, on transformer and UNet shapes, in one run.

Contenders (same float32 input each):
  pyqsim     pyqsim.ops.<op>(..., backend="cpu"): argument checks + the C++ kernels (bit-exact to the reference)
  reference  pyqsim.ops.<op>(..., backend="reference"): the NumPy golden model
  torch      torch.softmax / layer_norm / group_norm / gelu / silu / quantize_per_tensor in float32 (eager)

Prints a table of milliseconds and ratios (torch / pyqsim > 1 means pyqsim is faster) and writes JSON to
benchmarks/results/. Usage: python benchmarks/bench_float.py [--threads N] [--clock cpu|wall] [--quick]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _timer  # noqa: E402

from pyqsim import ops  # noqa: E402
from pyqsim.backends import cpu  # noqa: E402

try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # pragma: no cover - torch is in the [bench] extra
    torch = TF = None

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def cases(quick: bool):
    """(name, shape, pyqsim call(x, backend), torch call(t) or None)."""
    s = 0.25 if quick else 1.0  # --quick shrinks the batch dimension

    def b(n):
        return max(1, int(n * s))
    w384, b384 = np.linspace(0.5, 1.5, 384, dtype=np.float32), np.linspace(-0.1, 0.1, 384, dtype=np.float32)
    g128 = np.linspace(0.5, 1.5, 128, dtype=np.float32)
    tw = (lambda a: torch.from_numpy(a)) if torch is not None else None
    return [
        ("softmax", (b(48), 197, 197), lambda x, be: ops.softmax(x, backend=be), lambda t: torch.softmax(t, -1)),
        ("layer_norm", (b(8), 197, 384), lambda x, be: ops.layer_norm(x, w384, b384, backend=be),
         lambda t: TF.layer_norm(t, (384,), tw(w384), tw(b384))),
        ("gelu", (b(8), 197, 1536), lambda x, be: ops.gelu(x, backend=be), lambda t: TF.gelu(t)),
        ("gelu_tanh", (b(8), 197, 1536), lambda x, be: ops.gelu(x, "tanh", backend=be),
         lambda t: TF.gelu(t, approximate="tanh")),
        ("group_norm", (b(8), 128, 32, 32), lambda x, be: ops.group_norm(x, 32, g128, g128, backend=be),
         lambda t: TF.group_norm(t, 32, tw(g128), tw(g128))),
        ("silu", (b(8), 128, 32, 32), lambda x, be: ops.silu(x, backend=be), lambda t: TF.silu(t)),
        ("quantize", (b(8), 197, 384), lambda x, be: ops.quantize(x, 0.05, 128, "uint8", backend=be),
         lambda t: torch.quantize_per_tensor(t, 0.05, 128, torch.quint8)),
    ]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="threads for pyqsim and torch (default 1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--quick", action="store_true", help="a quarter of the batch (smoke run)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_float-<N>thread.json)")
    args = ap.parse_args(argv)
    _timer.set_clock(args.clock)
    cpu.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": _timer.machine(),
              "threads": args.threads, "clock": args.clock, "isa": cpu.get_isa(), "rows": []}
    rng = np.random.default_rng(0)
    print(f"threads={args.threads} clock={args.clock} isa={cpu.get_isa()}")
    print(f"{'op':<11} {'shape':<18} {'pyqsim ms':>10} {'ref ms':>9} {'torch ms':>9} {'ref/pyqsim':>11} "
          f"{'torch/pyqsim':>13}")
    for name, shape, fn, tfn in cases(args.quick):
        x = (rng.standard_normal(shape) * 2).astype(np.float32)
        fns = {"pyqsim": lambda: fn(x, "cpu")}
        if torch is not None:
            t = torch.from_numpy(x)
            fns["torch"] = lambda: tfn(t)
        res = _timer.compare(fns, reps=args.reps)
        if not args.skip_reference:
            res.update(_timer.compare({"reference": lambda: fn(x, "reference")}, reps=min(args.reps, 2)))
        assert np.array_equal(np.asarray(fn(x, "cpu")).view(np.uint8), np.asarray(fn(x, "reference")).view(np.uint8))
        best = {k: v["best"] for k, v in res.items()}
        row = {"op": name, "shape": list(shape), "results": res,
               "ref_over_pyqsim": best.get("reference", np.nan) / best["pyqsim"],
               "torch_over_pyqsim": best.get("torch", np.nan) / best["pyqsim"]}
        report["rows"].append(row)
        print(f"{name:<11} {str(shape):<18} {best['pyqsim'] * 1e3:>10.2f} {best.get('reference', np.nan) * 1e3:>9.1f} "
              f"{best.get('torch', np.nan) * 1e3:>9.2f} {row['ref_over_pyqsim']:>11.1f} {row['torch_over_pyqsim']:>13.2f}")
    out = _timer.write_report(report, args.out or RESULTS / f"bench_float-{args.threads}thread-{args.clock}clock.json",
                              RESULTS, "bench_float")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
