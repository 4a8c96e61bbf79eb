"""Integer GEMM / conv2d throughput of pyqsim's CUDA backend against PyTorch (cuBLASLt, cuDNN) and CuPy.

Every contender gets the same inputs as torch CUDA tensors (pyqsim's CUDA backend takes them without copies,
returns torch tensors and runs on the current stream) and is timed with CUDA events on that stream: warm-up,
then repetitions of all contenders interleaved (the order rotates every round), each sample a loop of calls
lasting about --sample-ms. The best per-call time is the headline number; the median goes to the JSON too.
TOPS = 2 * multiply-adds / second; "% peak" is against the INT8 tensor-core peak (--peak-tops, default 1979
= H100 SXM dense); ratios are pyqsim speed / peer speed (> 1: pyqsim is faster).

GEMM contenders, per shape (M, N, K), x int8 [M, K], w int8 [N, K], zero points 0:
  pyqsim-int8     ops.int_gemm(x, w, out_dtype="int32", backend="cuda")
  torch-int_mm    torch._int_mm(x, w.t())  (cuBLASLt; needs M > 16 and K, N multiples of 8, else skipped)
  pyqsim-requant  ops.int_gemm(..., out_dtype="int8", multiplier=m, shift=s, out_zero_point=z): per-channel
                  int32 multipliers in [2^30, 2^31-1] and shifts (NumPy int32 [N]), spec §6
  torch-unfused   what a user writes today: acc = torch._int_mm(x, w.t());
                  y = ((acc.to(int64) * M + 2^(S-1)) >> S) + z; y.clamp_(-128, 127).to(int8)
                  (M, S, 2^(S-1) precomputed as int64 CUDA tensors); checked bitwise equal to pyqsim-requant
  pyqsim-w4a8     int4 weights packed two per byte along K (ops.pack_int4, w_format="int4"), int32 output
  torch-fp16      torch.matmul(x.half(), w.half().t())  (reference point; not exact)
  cupy-fp16       cupy.matmul on the same float16 data (if CuPy imports; reference point)
Shapes: DeiT-S at batch 64 (M = 64 * 197 = 12608; qkv, proj, fc1, fc2), 4096^3 and 8192^3.

Conv2d contenders (UNet 3x3, stride 1, padding 1, C = O: 128 @ 32x32, 256 @ 16x16, 512 @ 8x8, batch 64):
  pyqsim-int8      ops.int_conv2d(x uint8 NCHW, w int8 [O, C, 3, 3], padding=1, x_zero_point=128,
                   out_dtype="int32", backend="cuda")
  torch-fp16-nchw  torch.nn.functional.conv2d in float16, NCHW (cuDNN, cudnn.benchmark on)
  torch-fp16-nhwc  the same with channels_last input and weight

Correctness is checked once per shape, outside the timings: pyqsim's int32 results against torch._int_mm (or a
float64 matmul / conv, exact for these sizes), its requantized output against the unfused PyTorch pipeline.

Needs torch with a visible CUDA device (exits with status 2 and one line otherwise); CuPy is optional.
Usage: python benchmarks/bench_cuda.py [--quick] [--only gemm,conv] [--peak-tops T] [--out JSON] [--markdown MD]
Writes a Markdown report to stdout (progress to stderr) and JSON to benchmarks/results/bench_cuda-<device>.json.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from typing import Callable

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEVICE = "cuda"
DEFAULT_PEAK_TOPS = 1979.0  # H100 SXM5, dense INT8 tensor-core peak (3958 is the 2:4-sparse figure)

DEIT_M = 64 * 197
DEIT = [("deit-qkv", 1152, 384), ("deit-proj", 384, 384), ("deit-fc1", 1536, 384), ("deit-fc2", 384, 1536)]
SQUARE = [4096, 8192]
QUICK_SQUARE = [4096]
QUICK_DEIT = 1  # DeiT shapes in a --quick run (the first: qkv)
UNET = [(128, 32), (256, 16), (512, 8)]  # (C = O, H = W), 3x3 kernel, padding 1
UNET_BATCH, QUICK_UNET_BATCH = 64, 8

GEMM_CONTENDERS = ("pyqsim-int8", "torch-int_mm", "pyqsim-requant", "torch-unfused", "pyqsim-w4a8", "torch-fp16",
                   "cupy-fp16")
CONV_CONTENDERS = ("pyqsim-int8", "torch-fp16-nchw", "torch-fp16-nhwc")
# (fast, slow): ratio = speed(fast) / speed(slow) = time(slow) / time(fast)
GEMM_RATIOS = (("pyqsim-int8", "torch-int_mm"), ("pyqsim-requant", "torch-unfused"), ("pyqsim-w4a8", "pyqsim-int8"),
               ("pyqsim-requant", "pyqsim-int8"), ("pyqsim-int8", "torch-fp16"), ("pyqsim-int8", "cupy-fp16"))
CONV_RATIOS = (("pyqsim-int8", "torch-fp16-nchw"), ("pyqsim-int8", "torch-fp16-nhwc"))
TARGET_RAW = 0.8  # raw int8 GEMM at TARGET_RAW_SIZE^3 >= 0.8x torch._int_mm
TARGET_RAW_SIZE = 8192
TARGET_REQUANT = 1.2  # GEMM + requant >= 1.2x the unfused PyTorch pipeline
MAX_INNER = 1000  # most calls in one timed sample

torch = None  # imported in main(), after the arguments are parsed (so --help needs no torch)
ops = None
cupy = None  # optional
CUPY_NOT_USED = "not imported"  # why cupy-fp16 is skipped (None once CuPy is in use)
_CUPY_STREAM = None  # cupy.cuda.ExternalStream wrapping torch's current stream, kept alive while in use


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- timing (CUDA events)


def cuda_compare(fns: dict[str, Callable[[], object]], *, reps: int, warmup: int, sample_ms: float,
                 min_time: float = 0.0, max_reps: int = 1000) -> dict[str, dict]:
    """Time every callable with CUDA events on the current stream, interleaved, best and median per call.

    After ``warmup`` calls each, one timed call per contender sets its loop count so that one sample lasts
    about ``sample_ms``. Then ``reps`` rounds (more while the rounds so far took less than ``min_time``
    seconds) each record start event, the loop, end event for every contender, in an order that rotates by
    one each round so no contender always follows the same one. The host does not wait between samples
    (one synchronize at the end), so the GPU stays busy unless the host cannot issue calls as fast as the
    GPU runs them -- then the time includes that host overhead, as in eager use.

    Returns ``{name: {"best_ms", "median_ms", "reps", "inner"}}`` (milliseconds per call).
    """
    cuda = torch.cuda
    names = list(fns)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cuda.synchronize()
    inner = {}
    for name, fn in fns.items():
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        cuda.synchronize()
        one = max(start.elapsed_time(end), 1e-4)
        inner[name] = max(1, min(MAX_INNER, math.ceil(sample_ms / one)))
    events: dict[str, list] = {k: [] for k in names}
    cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    while n < reps or (time.perf_counter() - t0 < min_time and n < max_reps):
        shift = n % len(names)
        for name in names[shift:] + names[:shift]:
            fn, loops = fns[name], inner[name]
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            start.record()
            for _ in range(loops):
                fn()
            end.record()
            events[name].append((start, end))
        n += 1
    cuda.synchronize()
    out = {}
    for name in names:
        per_call = [s.elapsed_time(e) / inner[name] for s, e in events[name]]
        out[name] = {"best_ms": min(per_call), "median_ms": statistics.median(per_call), "reps": len(per_call),
                     "inner": inner[name]}
    return out


def probe(fns: dict[str, Callable[[], object]], keep=()) -> tuple[dict, dict, dict]:
    """Call each contender once: (callables that worked, {name: {"error"}}, {name: result} for names in keep)."""
    ok, failed, results = {}, {}, {}
    for name, fn in fns.items():
        try:
            res = fn()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a contender that fails is reported, the others still run
            msg = str(exc).strip().splitlines()
            failed[name] = {"error": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]}
            log(f"  {name}: {failed[name]['error']}")
            continue
        ok[name] = fn
        if name in keep:
            results[name] = res
        del res
    return ok, failed, results


def result_kind(res) -> str:
    """What a pyqsim call returned (the CUDA backend should return a CUDA tensor, no host copy)."""
    if torch.is_tensor(res):
        return f"torch.Tensor {str(res.dtype).replace('torch.', '')} {tuple(res.shape)} on {res.device}"
    return f"{type(res).__module__}.{type(res).__name__}"


def as_device_tensor(res):
    if torch.is_tensor(res):
        return res.to(DEVICE)
    if hasattr(res, "__dlpack__"):
        return torch.from_dlpack(res).to(DEVICE)
    return torch.as_tensor(np.asarray(res)).to(DEVICE)


def compare_exact(got, want) -> dict:
    """Bitwise comparison of a pyqsim result with the expected tensor."""
    got = as_device_tensor(got)
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        return {"equal": False,
                "detail": f"got {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"}
    bad = int((got != want).sum().item())
    return {"equal": bad == 0, "detail": None if bad == 0 else f"{bad} of {want.numel()} elements differ"}


def timing_record(t: dict, nops: float, peak_tops: float) -> dict:
    best, med = t["best_ms"], t["median_ms"]
    tops = nops / (best * 1e-3) / 1e12 if best > 0 else None
    return {"ms": best, "median_ms": med, "tops": tops,
            "tops_median": nops / (med * 1e-3) / 1e12 if med > 0 else None,
            "pct_peak": 100.0 * tops / peak_tops if tops is not None else None,
            "reps": t["reps"], "inner": t["inner"]}


def ratios(results: dict, pairs, key: str = "ms") -> dict:
    out = {}
    for fast, slow in pairs:
        a, b = results.get(fast, {}).get(key), results.get(slow, {}).get(key)
        out[f"{fast}/{slow}"] = (b / a) if (a and b) else None
    return out


# --------------------------------------------------------------------------- GEMM


def int_mm_skip_reason(m: int, n: int, k: int) -> str | None:
    if m <= 16:
        return f"torch._int_mm needs M > 16 (M={m})"
    if k % 8 or n % 8:
        return f"torch._int_mm needs K and N to be multiples of 8 (K={k}, N={n})"
    return None


def exact_gemm(x, w, int_mm_ok: bool):
    """Exact int32 x @ w.T on the GPU: cuBLASLt when it applies, else float64 (exact: |acc| < 2^53)."""
    if int_mm_ok:
        return torch._int_mm(x, w.t())
    return (x.double() @ w.double().t()).to(torch.int32)


class GemmCase:
    """One (M, N, K): every contender's inputs prepared once, on the device."""

    def __init__(self, name: str, m: int, n: int, k: int, seed: int):
        self.name, self.m, self.n, self.k = name, m, n, k
        self.nops = 2.0 * m * n * k
        g = torch.Generator(device=DEVICE)
        g.manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEVICE, generator=g)
        self.w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE, generator=g)
        self.wt = self.w.t()
        # Per-channel real scales that map about +-3 sigma of the accumulator onto +-120 codes, as fixed-point
        # multipliers M0 in [2^30, 2^31-1] and shifts S (spec §6.1); the shifts differ across channels.
        sigma = math.sqrt(k) * 73.9 * 73.6  # std of a sum of k products of uniform int8 codes
        real = (40.0 / sigma) * rng.uniform(0.5, 1.5, n)
        self.mult, self.shift = (np.ascontiguousarray(a, dtype=np.int32) for a in ops.quantize_multiplier(real))
        self.zy = 5
        self.M = torch.from_numpy(self.mult.astype(np.int64)).to(DEVICE)
        self.S = torch.from_numpy(self.shift.astype(np.int64)).to(DEVICE)
        self.R = torch.ones_like(self.S) << (self.S - 1)  # 2^(S-1), the round-half-up term
        codes = rng.integers(-8, 8, (n, k), dtype=np.int8)
        self.w4_codes = torch.from_numpy(codes).to(DEVICE)
        self.w4 = torch.from_numpy(np.ascontiguousarray(ops.pack_int4(codes, signed=True))).to(DEVICE)
        del codes
        self.xh = self.x.half()
        self.wh = self.w.half()
        self.wht = self.wh.t()
        self.int_mm_skip = int_mm_skip_reason(m, n, k)

    def requant_torch(self, acc):
        """The unfused PyTorch epilogue (spec §6, round half up, arithmetic shift) on an int32 accumulator."""
        y = ((acc.to(torch.int64) * self.M + self.R) >> self.S) + self.zy
        return y.clamp_(-128, 127).to(torch.int8)

    def contenders(self) -> tuple[dict, dict]:
        x, w, wt, w4, mult, shift, zy = self.x, self.w, self.wt, self.w4, self.mult, self.shift, self.zy
        fns = {
            "pyqsim-int8": lambda: ops.int_gemm(x, w, out_dtype="int32", backend="cuda"),
            "torch-int_mm": lambda: torch._int_mm(x, wt),
            "pyqsim-requant": lambda: ops.int_gemm(x, w, out_dtype="int8", multiplier=mult, shift=shift,
                                                   out_zero_point=zy, backend="cuda"),
            "torch-unfused": lambda: self.requant_torch(torch._int_mm(x, wt)),
            "pyqsim-w4a8": lambda: ops.int_gemm(x, w4, w_format="int4", out_dtype="int32", backend="cuda"),
            "torch-fp16": lambda: torch.matmul(self.xh, self.wht),
        }
        skipped = {}
        if self.int_mm_skip:
            for name in ("torch-int_mm", "torch-unfused"):
                del fns[name]
                skipped[name] = {"skipped": self.int_mm_skip}
        if cupy is not None:
            # Zero-copy views of the torch tensors; cupy's matmul runs on torch's current stream (set in main).
            xc, wct = cupy.asarray(self.xh), cupy.asarray(self.wh).T
            fns["cupy-fp16"] = lambda: cupy.matmul(xc, wct)
        else:
            skipped["cupy-fp16"] = {"skipped": f"CuPy not used ({CUPY_NOT_USED})"}
        return fns, skipped

    def checks(self, results: dict) -> dict:
        """Bitwise checks of the pyqsim results from the probe call (run once, outside the timings)."""
        out = {}
        int_mm_ok = self.int_mm_skip is None
        ref_name = "torch._int_mm" if int_mm_ok else "float64 matmul"
        acc = None
        if "pyqsim-int8" in results or "pyqsim-requant" in results:
            acc = exact_gemm(self.x, self.w, int_mm_ok)
        if "pyqsim-int8" in results:
            out["int8"] = dict(compare_exact(results["pyqsim-int8"], acc), reference=ref_name)
        if "pyqsim-requant" in results:
            ref = "unfused torch pipeline" + ("" if int_mm_ok else " on a float64 accumulator")
            out["requant"] = dict(compare_exact(results["pyqsim-requant"], self.requant_torch(acc)), reference=ref)
        del acc
        if "pyqsim-w4a8" in results:
            acc4 = exact_gemm(self.x, self.w4_codes, int_mm_ok)
            out["w4a8"] = dict(compare_exact(results["pyqsim-w4a8"], acc4),
                               reference=f"{ref_name} on the unpacked int4 codes")
            del acc4
        return out


def gemm_row(name: str, m: int, n: int, k: int, seed: int, args, peak_tops: float) -> dict:
    """Probe, check and time every GEMM contender of one shape (the tensors die with this frame)."""
    row = {"name": name, "m": m, "n": n, "k": k, "ops": 2.0 * m * n * k}
    case = GemmCase(name, m, n, k, seed)
    fns, skipped = case.contenders()
    ok, failed, results = probe(fns, keep=("pyqsim-int8", "pyqsim-requant", "pyqsim-w4a8"))
    row["returned"] = {c: result_kind(v) for c, v in results.items()}
    row["checks"] = case.checks(results)
    del results
    row["equal"] = row["checks"].get("requant", {}).get("equal")
    t = cuda_compare(ok, reps=args.reps, warmup=args.warmup, sample_ms=args.sample_ms, min_time=args.min_time)
    res = {c: timing_record(t[c], row["ops"], peak_tops) for c in t}
    res.update(skipped)
    res.update(failed)
    row["results"] = {c: res[c] for c in GEMM_CONTENDERS if c in res}
    row["ratios"] = ratios(row["results"], GEMM_RATIOS)
    row["ratios_median"] = ratios(row["results"], GEMM_RATIOS, key="median_ms")
    return row


def run_gemm(shapes, args, peak_tops: float) -> list[dict]:
    rows = []
    for i, (name, m, n, k) in enumerate(shapes):
        log(f"gemm {name}: M={m} N={n} K={k}")
        try:
            row = gemm_row(name, m, n, k, args.seed + i, args, peak_tops)
        except Exception as exc:  # noqa: BLE001 - record the failure (e.g. out of memory) and go on
            log(traceback.format_exc())
            row = {"name": name, "m": m, "n": n, "k": k, "ops": 2.0 * m * n * k,
                   "error": f"{type(exc).__name__}: {exc}"[:500]}
        free_memory()
        rows.append(row)
        log("  " + summary_line(row))
    return rows


# --------------------------------------------------------------------------- conv2d


class ConvCase:
    def __init__(self, b: int, c: int, h: int, seed: int):
        self.b, self.c, self.o, self.h = b, c, c, h
        self.name = f"unet-c{c}-h{h}"
        self.nops = 2.0 * b * self.o * h * h * c * 9  # padding 1, stride 1: OH = H, OW = W
        g = torch.Generator(device=DEVICE)
        g.manual_seed(seed)
        self.x = torch.randint(0, 256, (b, c, h, h), dtype=torch.uint8, device=DEVICE, generator=g)
        self.w = torch.randint(-127, 128, (self.o, c, 3, 3), dtype=torch.int8, device=DEVICE, generator=g)
        self.xh = (self.x.to(torch.int16) - 128).half()  # the same values as the codes minus the zero point
        self.wh = self.w.half()
        self.xh_cl = self.xh.contiguous(memory_format=torch.channels_last)
        self.wh_cl = self.wh.contiguous(memory_format=torch.channels_last)

    def contenders(self) -> dict:
        F = torch.nn.functional
        x, w = self.x, self.w
        return {
            "pyqsim-int8": lambda: ops.int_conv2d(x, w, padding=1, x_zero_point=128, out_dtype="int32", backend="cuda"),
            "torch-fp16-nchw": lambda: F.conv2d(self.xh, self.wh, padding=1),
            "torch-fp16-nhwc": lambda: F.conv2d(self.xh_cl, self.wh_cl, padding=1),
        }

    def checks(self, results: dict) -> dict:
        if "pyqsim-int8" not in results:
            return {}
        # float64 direct convolution without cuDNN (im2col + DGEMM: integer sums below 2^53 are exact; cuDNN
        # could pick FFT or Winograd, which are not). Zero padding of (x - 128) is padding x with its zero point.
        with torch.backends.cudnn.flags(enabled=False):
            ref = torch.nn.functional.conv2d(self.xh.double(), self.wh.double(), padding=1).to(torch.int32)
        return {"int8": dict(compare_exact(results["pyqsim-int8"], ref), reference="float64 conv2d (no cuDNN)")}


def conv_row(c: int, h: int, batch: int, seed: int, args, peak_tops: float) -> dict:
    """Probe, check and time every conv contender of one shape (the tensors die with this frame)."""
    row = {"name": f"unet-c{c}-h{h}", "batch": batch, "c": c, "o": c, "h": h, "w": h, "kernel": [3, 3],
           "padding": 1, "ops": 2.0 * batch * c * h * h * c * 9}
    case = ConvCase(batch, c, h, seed)
    ok, failed, results = probe(case.contenders(), keep=("pyqsim-int8",))
    row["returned"] = {cn: result_kind(v) for cn, v in results.items()}
    row["checks"] = case.checks(results)
    del results
    row["equal"] = row["checks"].get("int8", {}).get("equal")
    t = cuda_compare(ok, reps=args.reps, warmup=args.warmup, sample_ms=args.sample_ms, min_time=args.min_time)
    res = {cn: timing_record(t[cn], row["ops"], peak_tops) for cn in t}
    res.update(failed)
    row["results"] = {cn: res[cn] for cn in CONV_CONTENDERS if cn in res}
    row["ratios"] = ratios(row["results"], CONV_RATIOS)
    row["ratios_median"] = ratios(row["results"], CONV_RATIOS, key="median_ms")
    return row


def run_conv(shapes, batch: int, args, peak_tops: float) -> list[dict]:
    rows = []
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest fp16 algorithm (during the warm-up)
    for i, (c, h) in enumerate(shapes):
        log(f"conv C=O={c} H=W={h} B={batch}")
        try:
            row = conv_row(c, h, batch, args.seed + 100 + i, args, peak_tops)
        except Exception as exc:  # noqa: BLE001
            log(traceback.format_exc())
            row = {"name": f"unet-c{c}-h{h}", "batch": batch, "c": c, "o": c, "h": h, "w": h,
                   "ops": 2.0 * batch * c * h * h * c * 9, "error": f"{type(exc).__name__}: {exc}"[:500]}
        free_memory()
        rows.append(row)
        log("  " + summary_line(row))
    return rows


def free_memory() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


# --------------------------------------------------------------------------- report


def fmt(v, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def cell_tops(res: dict) -> str:
    if res is None:
        return "-"
    if "error" in res:
        return "error"
    if "skipped" in res:
        return "skip"
    return fmt(res.get("tops"))


def cell_ms(res: dict) -> str:
    if res is None:
        return "-"
    if "error" in res:
        return "error"
    if "skipped" in res:
        return "skip"
    return f"{res['ms']:.3f} ({res['median_ms']:.3f})"


def cell_equal(row: dict, key: str) -> str:
    chk = row.get("checks", {}).get(key)
    if chk is None:
        return "-"
    return "yes" if chk["equal"] else "**NO**"


def summary_line(row: dict) -> str:
    if "error" in row:
        return f"{row['name']}: error: {row['error']}"
    parts = [f"{k} {cell_tops(v)}" for k, v in row["results"].items()]
    rs = [f"{k} x{v:.2f}" for k, v in row["ratios"].items() if v is not None]
    bad = [k for k, v in row.get("checks", {}).items() if not v["equal"]]
    return (f"{row['name']}: TOPS " + ", ".join(parts) + " | " + ", ".join(rs)
            + (f" | RESULTS DIFFER: {', '.join(bad)}" if bad else ""))


def evaluate_targets(gemm_rows: list[dict], quick: bool) -> list[dict]:
    targets = []
    key = "pyqsim-int8/torch-int_mm"
    size = TARGET_RAW_SIZE
    big = [r for r in gemm_rows if (r["m"], r["n"], r["k"]) == (size, size, size)]
    ratio = big[0].get("ratios", {}).get(key) if big else None
    if ratio is None:
        status = "not measured" + (f" (--quick runs no {size}^3)" if quick and not big else "")
    else:
        status = "met" if ratio >= TARGET_RAW else "not met"
        if big[0].get("checks", {}).get("int8", {}).get("equal") is False:
            status += " (but the int32 results differ)"
    targets.append({"target": f"raw int8 GEMM at {size}^3 >= {TARGET_RAW}x torch._int_mm", "ratio": key,
                    "threshold": TARGET_RAW, "values": {f"{size}^3": ratio}, "status": status,
                    "result": "-" if ratio is None else f"{ratio:.2f}x"})
    key = "pyqsim-requant/torch-unfused"
    vals = {r["name"]: r.get("ratios", {}).get(key) for r in gemm_rows}
    got = [v for v in vals.values() if v is not None]
    if not got:
        status, result = "not measured", "-"
    else:
        n_ok = sum(v >= TARGET_REQUANT for v in got)
        status = "met" if n_ok == len(got) else ("not met" if n_ok == 0 else f"partly ({n_ok} of {len(got)} shapes)")
        if any(r.get("equal") is False for r in gemm_rows):
            status += " (but the requantized results differ)"
        result = f"{min(got):.2f}x" if len(got) == 1 else f"{min(got):.2f}-{max(got):.2f}x over {len(got)} shapes"
    targets.append({"target": f"GEMM + requant >= {TARGET_REQUANT}x the unfused PyTorch pipeline", "ratio": key,
                    "threshold": TARGET_REQUANT, "values": vals, "status": status, "result": result})
    return targets


def shape_label(row: dict) -> str:
    if row["name"].startswith("deit-"):
        return f"DeiT-S {row['name'][5:]}"
    return f"{row['m']}^3" if row["m"] == row["n"] == row["k"] else row["name"]


def markdown(report: dict) -> str:
    dev = report["device"]
    smi = dev.get("nvidia_smi_before") or {}
    lines = [
        f"# pyqsim CUDA benchmarks: {dev['name']} (sm_{dev['capability'].replace('.', '')})",
        "",
        f"{report['date']}; torch {report['software']['torch']} (CUDA runtime {dev.get('cuda_runtime')}), "
        f"driver {dev.get('driver_version') or '?'}, CuPy {report['software'].get('cupy') or 'not used'}, "
        f"pyqsim {report['pyqsim'].get('version', '?')}. "
        f"SM clock {smi.get('clocks.sm', '?')} (max {smi.get('clocks.max.sm', '?')}), memory clock "
        f"{smi.get('clocks.mem', '?')}, power limit {smi.get('power.limit', '?')} (nvidia-smi, before the run).",
        "",
        f"Timing: CUDA events, {report['timer']['warmup']} warm-up calls, best of {report['timer']['reps']} "
        f"interleaved samples of about {report['timer']['sample_ms']} ms each (medians in the JSON). "
        f"TOPS = 2 x multiply-adds / s; % peak against {report['peak_tops']:g} TOPS INT8 ({report['peak_source']}); "
        "ratios are speed ratios, > 1 means the first is faster.",
    ]
    notes = []
    if report.get("gemm"):
        lines += ["", "## GEMM (TOPS, best)", "",
                  "| shape | M, N, K | pyqsim int8 | torch._int_mm | int8 / _int_mm | pyqsim requant | unfused torch "
                  "| requant / unfused | equal | pyqsim W4A8 | W4A8 / int8 | fp16 torch | fp16 CuPy | int8 % peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["gemm"]:
            if "error" in r:
                lines.append(f"| {shape_label(r)} | {r['m']}, {r['n']}, {r['k']} | error: {r['error']} |" + " |" * 11)
                continue
            res, rt = r["results"], r["ratios"]
            lines.append(
                f"| {shape_label(r)} | {r['m']}, {r['n']}, {r['k']} | {cell_tops(res.get('pyqsim-int8'))} "
                f"| {cell_tops(res.get('torch-int_mm'))} | {fmt(rt['pyqsim-int8/torch-int_mm'], '.2f')} "
                f"| {cell_tops(res.get('pyqsim-requant'))} | {cell_tops(res.get('torch-unfused'))} "
                f"| {fmt(rt['pyqsim-requant/torch-unfused'], '.2f')} | {cell_equal(r, 'requant')} "
                f"| {cell_tops(res.get('pyqsim-w4a8'))} | {fmt(rt['pyqsim-w4a8/pyqsim-int8'], '.2f')} "
                f"| {cell_tops(res.get('torch-fp16'))} | {cell_tops(res.get('cupy-fp16'))} "
                f"| {fmt((res.get('pyqsim-int8') or {}).get('pct_peak'), '.1f')} |")
            notes += row_notes(r)
        lines += ["", "GEMM, ms per call: best (median)", "",
                  "| shape | " + " | ".join(GEMM_CONTENDERS) + " |", "|---|" + "---|" * len(GEMM_CONTENDERS)]
        for r in report["gemm"]:
            if "error" not in r:
                cells = " | ".join(cell_ms(r["results"].get(c)) for c in GEMM_CONTENDERS)
                lines.append(f"| {shape_label(r)} | {cells} |")
    if report.get("conv"):
        lines += ["", "## conv2d 3x3, padding 1 (TOPS, best)", "",
                  "| C=O, H=W, B | pyqsim int8 | fp16 NCHW | fp16 channels_last | pyqsim / NCHW "
                  "| pyqsim / channels_last | equal | int8 % peak |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["conv"]:
            label = f"{r['c']}, {r['h']}, {r['batch']}"
            if "error" in r:
                lines.append(f"| {label} | error: {r['error']} |" + " |" * 6)
                continue
            res, rt = r["results"], r["ratios"]
            lines.append(
                f"| {label} | {cell_tops(res.get('pyqsim-int8'))} | {cell_tops(res.get('torch-fp16-nchw'))} "
                f"| {cell_tops(res.get('torch-fp16-nhwc'))} | {fmt(rt['pyqsim-int8/torch-fp16-nchw'], '.2f')} "
                f"| {fmt(rt['pyqsim-int8/torch-fp16-nhwc'], '.2f')} | {cell_equal(r, 'int8')} "
                f"| {fmt((res.get('pyqsim-int8') or {}).get('pct_peak'), '.1f')} |")
            notes += row_notes(r)
        lines += ["", "conv2d, ms per call: best (median)", "",
                  "| C=O, H=W, B | " + " | ".join(CONV_CONTENDERS) + " |", "|---|" + "---|" * len(CONV_CONTENDERS)]
        for r in report["conv"]:
            if "error" not in r:
                lines.append(f"| {r['c']}, {r['h']}, {r['batch']} | "
                             + " | ".join(cell_ms(r['results'].get(c)) for c in CONV_CONTENDERS) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    if report.get("targets"):
        lines += ["", "## Targets", "", "| target | result | status |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['result']} | {t['status']} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def row_label(row: dict) -> str:
    return shape_label(row) if "m" in row else f"conv C=O={row['c']} H=W={row['h']} B={row['batch']}"


def row_notes(row: dict) -> list[str]:
    notes = []
    for name, res in row.get("results", {}).items():
        if "skipped" in res:
            notes.append(f"{name} skipped: {res['skipped']}")
        elif "error" in res:
            notes.append(f"{row_label(row)}: {name} failed: {res['error']}")
    for name, chk in row.get("checks", {}).items():
        if not chk["equal"]:
            notes.append(f"{row_label(row)}: pyqsim {name} result differs from {chk['reference']}: {chk['detail']}")
    for name, kind in row.get("returned", {}).items():
        if not kind.startswith("torch.Tensor") or " on cuda" not in kind:
            where = kind.split(" on ")[-1] if kind.startswith("torch.Tensor") else kind
            notes.append(f"pyqsim returned {where} results, not CUDA tensors: its times may include copies")
    return notes


# --------------------------------------------------------------------------- environment


def nvidia_smi() -> dict:
    """The first visible GPU's name, clocks and power limit from nvidia-smi (``{}`` fields absent if unreadable)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    fields = ["name", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit"]
    try:
        proc = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[:300]}
    gpus = [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in proc.stdout.strip().splitlines()]
    if not gpus:
        return {"error": "no GPU listed"}
    # nvidia-smi lists every GPU of the machine in PCI order; pick the one torch uses by name when possible.
    name = torch.cuda.get_device_name()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    chosen = next((g for g in gpus if g.get("name") == name), gpus[0])
    out = dict(chosen)
    if len(gpus) > 1:
        out["all_gpus"] = gpus
        out["note"] = f"{len(gpus)} GPUs listed (CUDA_VISIBLE_DEVICES={visible}); first one named like torch's device"
    return out


def driver_version() -> str | None:
    """The CUDA driver API version (cuDriverGetVersion), e.g. '12.4', or None."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
        return f"{v.value // 1000}.{v.value % 1000 // 10}"
    except (OSError, AttributeError):
        return None


def nvidia_driver_release() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def device_info() -> dict:
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    major, minor = torch.cuda.get_device_capability(idx)
    release = nvidia_driver_release()
    api = driver_version()
    info = {
        "index": idx,
        "name": torch.cuda.get_device_name(idx),
        "capability": f"{major}.{minor}",
        "multiprocessors": getattr(props, "multi_processor_count", None),
        "total_memory_gib": round(props.total_memory / 2**30, 2),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver_version": " / CUDA ".join(v for v in (release, api) if v) or None,
        "driver_release": release,
        "driver_cuda_version": api,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    info["nvidia_smi_before"] = nvidia_smi()
    return info


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "gpu"


def json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def fail(msg: str, code: int = 2):
    print(msg, file=sys.stderr, flush=True)
    raise SystemExit(code)


def import_torch_with_cuda():
    """Import torch and require a visible CUDA device, else exit with status 2 and one line."""
    global torch
    try:
        import torch as _torch
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        fail(f"no CUDA device: PyTorch is not importable ({type(exc).__name__}: {exc}); "
             "this benchmark needs torch with CUDA")
    torch = _torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA initialization: ..." warnings: the reason goes into the one line
        try:
            available = torch.cuda.is_available()
            count = torch.cuda.device_count() if available else 0
        except Exception as exc:  # noqa: BLE001
            fail(f"no CUDA device: torch.cuda failed to initialize ({type(exc).__name__}: {exc})")
    if not available or count == 0:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        else:
            why = (f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda}, "
                   f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
        fail(f"no CUDA device: {why}")


def import_pyqsim_cuda():
    """Import pyqsim and require its CUDA backend, else exit with status 2 and one line."""
    global ops
    try:
        import pyqsim
        from pyqsim import ops as _ops
    except Exception as exc:  # noqa: BLE001
        fail(f"pyqsim not importable: {type(exc).__name__}: {exc}")
    ops = _ops
    if "cuda" not in pyqsim.available_backends():
        try:
            cinfo = pyqsim.build_info().get("cuda", {})
        except Exception as exc:  # noqa: BLE001
            cinfo = {"reason": f"build_info() failed: {exc}"}
        why = cinfo.get("reason") or cinfo.get("error") or ", ".join(f"{k}={v}" for k, v in cinfo.items()) or "?"
        fail(f"pyqsim CUDA backend not available: {why}")
    return pyqsim


def import_cupy(skip: bool) -> str | None:
    """CuPy on torch's current stream, if importable; returns the reason it is not used, else None."""
    global cupy, CUPY_NOT_USED, _CUPY_STREAM
    if skip:
        CUPY_NOT_USED = "--no-cupy"
        return CUPY_NOT_USED
    try:
        import cupy as _cupy
        ptr = torch.cuda.current_stream().cuda_stream
        stream = None
        if ptr:  # torch is not on the legacy default stream, which is also CuPy's default
            stream = _cupy.cuda.ExternalStream(ptr)
            stream.use()
    except Exception as exc:  # noqa: BLE001 - optional
        msg = str(exc).strip().splitlines()
        CUPY_NOT_USED = f"{type(exc).__name__}: {msg[0] if msg else ''}"[:200]
        return CUPY_NOT_USED
    cupy, _CUPY_STREAM, CUPY_NOT_USED = _cupy, stream, None
    return None


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"GEMM 4096^3 and DeiT-S qkv only, conv batch {QUICK_UNET_BATCH}, fewer repetitions")
    ap.add_argument("--only", default="gemm,conv", help="comma-separated sections: gemm, conv (default both)")
    ap.add_argument("--peak-tops", type=float, default=None,
                    help=f"INT8 tensor-core peak in TOPS for the %% columns "
                         f"(default {DEFAULT_PEAK_TOPS:g}, H100 SXM dense)")
    ap.add_argument("--reps", type=int, default=None, help="timed samples per contender (default 20, --quick 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per contender before timing (default 3)")
    ap.add_argument("--sample-ms", type=float, default=2.0,
                    help="one timed sample loops a contender for about this many ms (default 2)")
    ap.add_argument("--min-time", type=float, default=0.0, help="keep adding rounds for this many seconds per shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cupy", action="store_true", help="do not time cupy.matmul even if CuPy imports")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/bench_cuda-<device name>[-quick].json)")
    ap.add_argument("--markdown", default=None, metavar="PATH", help="also write the Markdown report to PATH")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 10 if args.quick else 20
    if args.reps < 1 or args.warmup < 0 or args.sample_ms <= 0:
        ap.error("--reps must be >= 1, --warmup >= 0 and --sample-ms > 0")
    if args.peak_tops is not None and args.peak_tops <= 0:
        ap.error("--peak-tops must be > 0")
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if not sections or sections - {"gemm", "conv"}:
        ap.error(f"--only takes gemm and/or conv, got {args.only!r}")

    import_torch_with_cuda()
    pyqsim = import_pyqsim_cuda()
    cupy_missing = import_cupy(args.no_cupy)

    peak = args.peak_tops or DEFAULT_PEAK_TOPS
    peak_source = "--peak-tops" if args.peak_tops else "default: H100 SXM dense"
    report = {
        "benchmark": "bench_cuda",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "device": device_info(),
        "software": {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                     "numpy": np.__version__, "cupy": getattr(cupy, "__version__", None),
                     "cupy_not_used": cupy_missing},
        "pyqsim": pyqsim.build_info(),
        "timer": {"method": "CUDA events on the current stream, interleaved, rotating order",
                  "reps": args.reps, "warmup": args.warmup, "sample_ms": args.sample_ms, "min_time_s": args.min_time},
        "peak_tops": peak,
        "peak_source": peak_source,
        "gemm": [],
        "conv": [],
    }
    dev = report["device"]
    log(f"# {dev['name']} (capability {dev['capability']}, {dev['multiprocessors']} SMs), torch {torch.__version__}, "
        f"CUDA {dev['cuda_runtime']}, driver {dev['driver_version']}, CuPy {report['software']['cupy'] or 'no'}")
    if args.peak_tops is None and "H100" not in dev["name"]:
        log(f"# note: % peak uses {DEFAULT_PEAK_TOPS:g} TOPS (H100 SXM); pass --peak-tops for a {dev['name']}")

    with torch.inference_mode():
        if "gemm" in sections:
            deit = [(name, DEIT_M, n, k) for (name, n, k) in DEIT]
            squares = [(f"square-{s}", s, s, s) for s in (QUICK_SQUARE if args.quick else SQUARE)]
            shapes = (deit[:QUICK_DEIT] if args.quick else deit) + squares
            report["gemm"] = run_gemm(shapes, args, peak)
        if "conv" in sections:
            report["conv"] = run_conv(UNET, QUICK_UNET_BATCH if args.quick else UNET_BATCH, args, peak)
    report["device"]["nvidia_smi_after"] = nvidia_smi()
    report["targets"] = evaluate_targets(report["gemm"], args.quick) if "gemm" in sections else []

    text = markdown(report)
    print(text, end="", flush=True)
    out = pathlib.Path(args.out) if args.out else RESULTS / (
        f"bench_cuda-{sanitize(dev['name'])}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=json_default) + "\n")
    log(f"# wrote {out}")
    if args.markdown:
        md = pathlib.Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
        log(f"# wrote {md}")
    return report


if __name__ == "__main__":
    main()
