"""Integer GEMM / conv2d throughput of pyqsim's CPU kernels against PyTorch and NumPy, on the same inputs.

Contenders (all fed the same integer codes; GOPS = 2 * multiply-adds / second):
  pyqsim      pyqsim._C with a prepacked weight (pyqsim.backends.cpu.pack_weight), requantized uint8 output
              (per-channel fixed-point multipliers, spec §6) unless stated
  pyqsim-op   pyqsim.ops.int_gemm(..., backend="cpu") with a plain weight array (validation + packing per call)
  fbgemm      torch.ops.quantized.linear / conv2d (x86 engine = FBGEMM), prepacked, quint8 activations, qint8
              per-channel weights, quint8 output. FBGEMM's AVX2 kernel sums vpmaddubsw pairs in saturating int16;
              PyTorch avoids overflow with reduce_range (7-bit activations) -- here it gets the same full-range codes
              as pyqsim, which costs it nothing in speed but makes its results inexact where pairs saturate.
  fp32        torch.matmul / conv2d in float32 (MKL / oneDNN)
  numpy-int   numpy.matmul on int32 (no BLAS), timed on at most 512 rows
  w4a8        pyqsim with packed int4 weights
  pyqsim-avx2 pyqsim with the AVX2 kernels forced, where the auto choice is AVX-512 VNNI (spec §10.7)

Sections: deit (DeiT-S layer GEMMs, M = 197 * 32 tokens), square (2048^3), decode (M <= 8: W4A8 vs our W8A8),
conv (UNet-like 3x3 convs), peak (register-only AVX2 int8 loops). Prints a table, writes JSON to
benchmarks/results/. Usage: python benchmarks/bench_gemm.py [--quick] [--threads N] [--only deit,conv]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import pathlib
import sys
import warnings

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _timer  # noqa: E402

from pyqsim import _C, ops  # noqa: E402
from pyqsim.backends import cpu  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover - torch is in the [bench] extra
    torch = None

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEIT = [(1152, 384), (384, 384), (1536, 384), (384, 1536)]  # (N, K): qkv, proj, fc1, fc2
DEIT_M = 197 * 32
CONVS = [(128, 32), (256, 32), (256, 16), (512, 16)]  # (channels, H=W), 3x3, stride 1, pad 1, batch 1
DECODE = [(1536, 384), (384, 1536), (4096, 4096), (11008, 4096)]


def _torch_q():
    warnings.filterwarnings("ignore")
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"


class Gemm:
    """One W8A8 (or W4A8) GEMM problem with every contender's inputs prepared once."""

    def __init__(self, m, n, k, seed=0):
        rng = np.random.default_rng(seed)
        self.m, self.n, self.k = m, n, k
        self.x = rng.integers(0, 256, (m, k), dtype=np.uint8)
        self.zx = 128
        self.w = rng.integers(-127, 128, (n, k), dtype=np.int8)  # symmetric restricted range (spec §2.1)
        self.sx = 0.02
        self.sw = rng.uniform(0.5, 1.5, n).astype(np.float32) * 0.01
        self.sy, self.zy = 0.05, 128
        self.m0, self.sh = ops.quantize_multiplier(self.sx * self.sw.astype(np.float64) / self.sy, backend="reference")
        self.zw = np.zeros(n, np.int32)
        self.bias = np.zeros(n, np.int32)
        self.pw = cpu.pack_weight(self.w)
        self.ops = 2.0 * m * n * k

    def pyqsim(self):
        return _C.int_gemm(self.x, self.pw, "int8", self.zx, self.zw, self.bias, "uint8", self.m0, self.sh, self.zy, None)

    def pyqsim_op(self):
        return ops.int_gemm(self.x, self.w, x_zero_point=self.zx, out_dtype="uint8", multiplier=self.m0,
                            shift=self.sh, out_zero_point=self.zy, backend="cpu")

    def w4(self):
        if not hasattr(self, "pw4"):
            rng = np.random.default_rng(1)
            codes = rng.integers(-8, 8, (self.n, self.k), dtype=np.int8)
            self.w4p = ops.pack_int4(codes, True, backend="reference")
            self.pw4 = cpu.pack_weight(self.w4p, "int4", k=self.k)
        return lambda: _C.int_gemm(self.x, self.pw4, "int4", self.zx, self.zw, self.bias, "uint8", self.m0, self.sh,
                                   self.zy, None)

    def torch_fns(self):
        _torch_q()
        qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(self.x), self.sx, self.zx)
        qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(self.w), torch.from_numpy(self.sw.astype(np.float64)),
                                                      torch.zeros(self.n, dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        xf = torch.from_numpy(self.x.astype(np.float32))
        wf = torch.from_numpy(self.w.astype(np.float32))
        return {"fbgemm": lambda: torch.ops.quantized.linear(qx, packed, self.sy, self.zy),
                "fp32": lambda: torch.matmul(xf, wf.T)}

    def numpy_fn(self, rows=512):
        xs = self.x[: min(self.m, rows)].astype(np.int32)
        wt = np.ascontiguousarray(self.w.astype(np.int32).T)
        return (lambda: np.matmul(xs, wt)), 2.0 * xs.shape[0] * self.n * self.k


def _on_isa(isa, fn):
    """fn with the CPU kernels of ``isa`` forced for the call."""
    def run():
        _C.set_cpu_isa(isa)
        try:
            return fn()
        finally:
            _C.set_cpu_isa(None)
    return run


def run_gemm_table(shapes, args, label):
    rows = []
    for (m, n, k) in shapes:
        g = Gemm(m, n, k)
        fns = {"pyqsim": g.pyqsim, "pyqsim-op": g.pyqsim_op, "w4a8": g.w4()}
        if _C.get_cpu_isa() == "avx512vnni":
            fns["pyqsim-avx2"] = _on_isa("avx2", g.pyqsim)
        if torch is not None:
            fns.update(g.torch_fns())
        t = _timer.compare(fns, reps=args.reps, min_time=args.min_time)
        res = {name: {"gops": _timer.gops(g.ops, v["best"]), "ms": v["best"] * 1e3, "median_ms": v["median"] * 1e3}
               for name, v in t.items()}
        if not args.skip_numpy:
            fn, nops = g.numpy_fn()
            tn = _timer.compare({"numpy-int": fn}, reps=1, warmup=0)["numpy-int"]
            res["numpy-int"] = {"gops": _timer.gops(nops, tn["best"]), "ms": tn["best"] * 1e3, "rows": min(m, 512)}
        rows.append({"section": label, "m": m, "n": n, "k": k, "results": res})
        print_row(rows[-1])
    return rows


def print_row(r):
    res = r["results"]
    p = res["pyqsim"]["gops"]
    cols = [f"{r['section']:<7} M={r['m']:<5} N={r['n']:<5} K={r['k']:<5}"]
    for name in ("pyqsim", "pyqsim-op", "pyqsim-avx2", "w4a8", "fbgemm", "fp32", "numpy-int"):
        if name in res:
            cols.append(f"{name} {res[name]['gops']:7.1f}")
    ratios = []
    if "pyqsim-avx2" in res:
        ratios.append(f"x{p / res['pyqsim-avx2']['gops']:.2f} vs avx2")
    for name in ("fbgemm", "fp32", "numpy-int"):
        if name in res:
            ratios.append(f"x{p / res[name]['gops']:.2f} vs {name}")
    if "w4a8" in res:
        ratios.append(f"w4a8/w8a8 x{res['w4a8']['gops'] / p:.2f}")
    print("  ".join(cols) + "   | " + ", ".join(ratios), flush=True)


def run_decode(args):
    rows = []
    for (n, k) in DECODE[: 2 if args.quick else None]:
        for m in (1, 4, 8):
            g = Gemm(m, n, k, seed=m)
            fns = {"pyqsim": g.pyqsim, "w4a8": g.w4()}
            if torch is not None:
                fns["fbgemm"] = g.torch_fns()["fbgemm"]
            t = _timer.compare(fns, reps=max(args.reps, 20), min_time=args.min_time)
            res = {name: {"gops": _timer.gops(g.ops, v["best"]), "ms": v["best"] * 1e3, "median_ms": v["median"] * 1e3}
                   for name, v in t.items()}
            rows.append({"section": "decode", "m": m, "n": n, "k": k, "results": res})
            print_row(rows[-1])
    return rows


def run_conv(args):
    rows = []
    for (c, h) in CONVS[: 2 if args.quick else None]:
        rng = np.random.default_rng(c + h)
        b, o = 1, c
        x = rng.integers(0, 256, (b, c, h, h), dtype=np.uint8)
        w = rng.integers(-127, 128, (o, c, 3, 3), dtype=np.int8)
        sw = rng.uniform(0.5, 1.5, o) * 0.01
        m0, sh = ops.quantize_multiplier(0.02 * sw / 0.05, backend="reference")
        pw = cpu.pack_weight(w, kind="conv")
        z = np.zeros(o, np.int32)
        nops = 2.0 * b * o * c * 9 * h * h
        fns = {"pyqsim": lambda: _C.int_conv2d(x, pw, "int8", (3, 3), (1, 1), (1, 1), (1, 1), 1, 128, z, z, "uint8", m0,
                                               sh, 128, None),
               "pyqsim-op": lambda: ops.int_conv2d(x, w, padding=1, x_zero_point=128, out_dtype="uint8", multiplier=m0,
                                                   shift=sh, out_zero_point=128, backend="cpu")}
        if torch is not None:
            _torch_q()
            qx = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), 0.02, 128)
            qx_cl = qx.contiguous(memory_format=torch.channels_last)
            qw = torch._make_per_channel_quantized_tensor(torch.from_numpy(w), torch.from_numpy(sw),
                                                          torch.zeros(o, dtype=torch.int64), 0)
            packed = torch.ops.quantized.conv2d_prepack(qw, None, [1, 1], [1, 1], [1, 1], 1)
            xf, wf = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(w.astype(np.float32))
            fns["fbgemm"] = lambda: torch.ops.quantized.conv2d(qx, packed, 0.05, 128)
            fns["fbgemm-nhwc"] = lambda: torch.ops.quantized.conv2d(qx_cl, packed, 0.05, 128)
            fns["fp32"] = lambda: torch.nn.functional.conv2d(xf, wf, padding=1)
        t = _timer.compare(fns, reps=args.reps, min_time=args.min_time)
        res = {name: {"gops": _timer.gops(nops, v["best"]), "ms": v["best"] * 1e3, "median_ms": v["median"] * 1e3}
               for name, v in t.items()}
        row = {"section": "conv", "c": c, "o": o, "h": h, "batch": b, "results": res}
        rows.append(row)
        p = res["pyqsim"]["gops"]
        line = f"conv    C=O={c:<4} H=W={h:<3} " + "  ".join(f"{k} {v['gops']:7.1f}" for k, v in res.items())
        extra = [f"x{p / res[k]['gops']:.2f} vs {k}" for k in ("fbgemm", "fbgemm-nhwc", "fp32") if k in res]
        print(line + "   | " + ", ".join(extra), flush=True)
    return rows


def run_peak(args):
    info = _C.build_info()
    if not (info["cpu_has_avx2"] and "avx2" in info["simd_compiled"]):
        return {}
    peaks = _timer.int8_peaks(20_000_000 if not args.quick else 5_000_000)
    nt = _C.get_num_threads()
    peak = {"threads": nt, "isa": _C.get_cpu_isa(), "per_thread": peaks, "machine": {k: v * nt for k, v in peaks.items()}}
    print("peak    per thread (GOPS): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + f"; x{nt} threads",
          flush=True)
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (CI smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="threads for pyqsim and torch (default: all cores)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--min-time", type=float, default=0.0, help="keep repeating each case for this many seconds")
    ap.add_argument("--only", default="peak,deit,square,decode,conv")
    ap.add_argument("--skip-numpy", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu = process CPU time (robust to background load with --threads 1)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_gemm-<host>-<time>.json)")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 7
    nt = args.threads or len(os.sched_getaffinity(0))
    _timer.set_clock(args.clock)
    _C.set_num_threads(nt)
    if torch is not None:
        torch.set_num_threads(nt)
    sections = set(args.only.split(","))
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": _timer.machine(), "threads": nt,
              "pyqsim": _C.build_info(), "torch": getattr(torch, "__version__", None), "numpy": np.__version__,
              "quick": args.quick, "clock": args.clock, "rows": []}
    m = report["machine"]
    print(f"# {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs, flags: {m.get('Flags', '')}, "
          f"threads {nt}, clock {args.clock}, load {m.get('loadavg_1m', 0):.1f}, pyqsim ISA {report['pyqsim']['isa']}",
          flush=True)
    if "peak" in sections:
        report["peak"] = run_peak(args)
    if "deit" in sections:
        shapes = [(DEIT_M, n, k) for (n, k) in DEIT]
        report["rows"] += run_gemm_table(shapes[:2] if args.quick else shapes, args, "deit")
    if "square" in sections:
        s = 1024 if args.quick else 2048
        report["rows"] += run_gemm_table([(s, s, s)], args, "square")
    if "decode" in sections:
        report["rows"] += run_decode(args)
    if "conv" in sections:
        report["rows"] += run_conv(args)
    if report.get("peak"):
        best = max((r["results"]["pyqsim"]["gops"] for r in report["rows"] if r["section"] in ("deit", "square")),
                   default=None)
        if best:
            mp = report["peak"]["machine"]
            report["peak"]["best_w8a8_fraction"] = {k: best / v for k, v in mp.items()}
            print(f"peak    best W8A8 GEMM {best:.1f} GOPS = {best / mp['vpmaddubsw']:.0%} of the vpmaddubsw peak, "
                  f"{best / mp['exact']:.0%} of the exact-step peak of {report['peak']['isa']}", flush=True)
    out = _timer.write_report(report, args.out, RESULTS, "bench_gemm")
    print(f"# wrote {out}")
    return report


if __name__ == "__main__":
    main()
