"""Attention kernels and packed-weight GEMM through the op table, side by side in one run (CPU backend).

Sections:
  attention   DeiT-S attention shapes (batch 8, 6 heads, L = 197, d = 64, 4-bit log-sqrt2 codes, uint8 values with
              zero point 128, uint8 requantized output):
                log2        ops.log2_attn_matmul on [8, 6, 197, 197] codes x [8, 6, 197, 64] values, one call (§7.1)
                log2-loop   the same through 48 calls of the 2-D op (one per image and head)
                int_gemm    ops.int_gemm with a PackedWeight on x [8 * 6 * 197, 197] x w [64, 197]: the same number
                            of multiply-adds (M = batch * heads * L, K = L, N = d), uint8 requantized
                int_bmm     ops.int_bmm for q @ k^T ([8, 6, 197, 64] x [8, 6, 197, 64] -> [8, 6, 197, 197], uint8)
              ratio = log2 multiply-add rate / int_gemm multiply-add rate (target >= 0.5)
  packed      exact W8A8 GEMM through the op table with a PackedWeight (ops.pack_weight), uint8 requantized, on the
              DeiT-S layer GEMMs (M = 197 * 32) and 2048^3, against the exact-step peak of
              the ISA in use (the sign step on AVX2, vpdpbusd on AVX-512 VNNI; _timer.int8_peaks) measured in the same run (target >= 0.9); also a plain weight array
              through the op table and pyqsim._C with a prepacked weight (no op table)

GOPS = 2 * multiply-adds / second. Prints tables, writes JSON to benchmarks/results/.
Usage: python benchmarks/bench_attention.py [--threads 1] [--clock cpu] [--quick] [--only attention,packed]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _timer  # noqa: E402

from pyqsim import _C, ops  # noqa: E402
from pyqsim.backends import cpu  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEIT_ATTN = dict(batch=8, heads=6, length=197, d=64)
PACKED_SHAPES = [("DeiT qkv", 6304, 1152, 384), ("DeiT proj", 6304, 384, 384), ("DeiT fc1", 6304, 1536, 384),
                 ("DeiT fc2", 6304, 384, 1536), ("square", 2048, 2048, 2048)]


def _requant(n, rng, lo=2.0**-24, hi=2.0**-18):
    m0, s0 = ops.quantize_multiplier(rng.uniform(lo, hi, n))
    return dict(multiplier=m0, shift=s0, out_zero_point=128)


def run_attention(args) -> dict:
    p = dict(DEIT_ATTN)
    if args.quick:
        p["batch"] = 2
    b, h, length, d = p["batch"], p["heads"], p["length"], p["d"]
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (b, h, length, length), dtype=np.uint8)  # 4-bit log-sqrt2, zero code 15 included
    v = rng.integers(0, 256, (b, h, length, d), dtype=np.uint8)
    attn_kw = dict(v_zero_point=128, bits=4, mode="sqrt2", frac_bits=16, out_dtype="uint8",
                   **_requant(d, rng, 2.0**-40, 2.0**-34))
    x = rng.integers(0, 256, (b * h * length, length), dtype=np.uint8)
    w = ops.pack_weight(rng.integers(-127, 128, (d, length), dtype=np.int8))
    gemm_kw = dict(x_zero_point=128, out_dtype="uint8", **_requant(d, rng))
    q = rng.integers(0, 256, (b, h, length, d), dtype=np.uint8)
    k = rng.integers(0, 256, (b, h, length, d), dtype=np.uint8)
    bmm_kw = dict(a_zero_point=128, b_zero_point=128, out_dtype="uint8", **_requant(length, rng))
    c2, v2 = codes.reshape(-1, length, length), v.reshape(-1, length, d)

    def loop():
        for i in range(c2.shape[0]):
            ops.log2_attn_matmul(c2[i], v2[i], backend="cpu", **attn_kw)

    fns = {
        "log2": lambda: ops.log2_attn_matmul(codes, v, backend="cpu", **attn_kw),
        "log2-loop": loop,
        "int_gemm": lambda: ops.int_gemm(x, w, backend="cpu", **gemm_kw),
        "int_bmm": lambda: ops.int_bmm(q, k, backend="cpu", **bmm_kw),
    }
    res = _timer.compare(fns, reps=args.reps, warmup=1)
    macs = b * h * length * length * d  # the same for all four
    rows = {name: dict(ms=r["best"] * 1e3, median_ms=r["median"] * 1e3, gops=_timer.gops(2 * macs, r["best"]),
                       reps=r["reps"]) for name, r in res.items()}
    ratio = rows["log2"]["gops"] / rows["int_gemm"]["gops"]
    print(f"\nattention: batch {b}, heads {h}, L {length}, d {d} ({macs / 1e6:.0f} M multiply-adds each)")
    print("| contender | ms | GOPS |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ms']:.2f} | {r['gops']:.1f} |")
    print(f"log2 / int_gemm multiply-add rate: {ratio:.2f} (target >= 0.5); "
          f"one batched call vs 48 calls: {rows['log2-loop']['ms'] / rows['log2']['ms']:.2f}x", flush=True)
    return {"shape": p, "macs": macs, "rows": rows, "log2_over_int_gemm": ratio}


def run_packed(args) -> dict:
    peaks = _timer.int8_peaks(5_000_000 if args.quick else 20_000_000)
    print("\npeak per thread (GOPS): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()), flush=True)
    threads = cpu.get_num_threads()
    rng = np.random.default_rng(1)
    out = []
    print("| shape (M, N, K) | op + PackedWeight | op + array | _C prepacked | packed / peak |")
    print("|---|---|---|---|---|")
    for name, m, n, k in PACKED_SHAPES[:2] if args.quick else PACKED_SHAPES:
        x = rng.integers(0, 256, (m, k), dtype=np.uint8)
        wa = rng.integers(-127, 128, (n, k), dtype=np.int8)
        h = ops.pack_weight(wa)
        rq = _requant(n, rng)
        zeros_n, ones_f = np.zeros(n, np.int32), np.zeros(n, np.float32)
        pre = h.native["cpu"]
        fns = {
            "op-packed": lambda: ops.int_gemm(x, h, x_zero_point=128, out_dtype="uint8", backend="cpu", **rq),
            "op-array": lambda: ops.int_gemm(x, wa, x_zero_point=128, out_dtype="uint8", backend="cpu", **rq),
            "C-prepacked": lambda: _C.int_gemm(x, pre, "int8", 128, zeros_n, zeros_n, "uint8", rq["multiplier"],
                                               rq["shift"], 128, ones_f),
        }
        res = _timer.compare(fns, reps=args.reps, warmup=1)
        g = {kk: _timer.gops(2 * m * n * k, r["best"]) for kk, r in res.items()}
        frac = g["op-packed"] / (peaks["exact"] * threads)
        print(f"| {name} {m}, {n}, {k} | {g['op-packed']:.1f} | {g['op-array']:.1f} | {g['C-prepacked']:.1f} | "
              f"{frac:.2f} |", flush=True)
        out.append(dict(name=name, m=m, n=n, k=k, gops=g, fraction_of_exact_peak=frac,
                        ms={kk: r["best"] * 1e3 for kk, r in res.items()}))
    return {"peak_per_thread": peaks, "isa": _C.get_cpu_isa(), "threads": threads, "shapes": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="attention,packed")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_attention-<host>-<time>.json)")
    args = ap.parse_args(argv)
    cpu.set_num_threads(args.threads)
    _timer.set_clock(args.clock)
    sections = set(args.only.split(","))
    report = {"machine": _timer.machine(), "threads": args.threads, "clock": args.clock, "isa": cpu.get_isa(),
              "quick": args.quick}
    print(f"threads {args.threads}, clock {args.clock}, ISA {cpu.get_isa()}", flush=True)
    if "attention" in sections:
        report["attention"] = run_attention(args)
    if "packed" in sections:
        report["packed"] = run_packed(args)
    out = _timer.write_report(report, args.out, RESULTS, "bench_attention")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
