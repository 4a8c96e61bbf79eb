"""Whole-model inference: pyqsim's integer program against PyTorch fp32, the fake-quant model and ONNX Runtime int8,
side by side in one run.

Models (random weights; the speed of a program does not depend on how well it was calibrated, so calibration uses
few samples and, for Q-Diffusion, few reconstruction steps):
  deit-s      pyqsim.models.vit.deit_small, batch 8 at 224x224, RepQ-ViT W8A8 and W4A4
  bert-base   transformers.BertModel with BERT-base shapes (12 x 768, 12 heads, FFN 3072), sequence 128, W8A8
  ddpm        pyqsim.models.unet.ddpm_cifar10_unet (35.7 M parameters), one denoising step at batch 8,
              Q-Diffusion W8A8 and W4A8

Contenders (each timed on the same inputs, interleaved; best of --reps, milliseconds per image/sequence):
  int        pyqsim.load(exported program).run(..., backend="cpu"): exact integer kernels + native float stages
  fp32       the float PyTorch model, eager, torch.no_grad()
  fake       the calibrated fake-quant PyTorch model (what the papers' accuracy comes from)
  ort-int8   the float model exported to ONNX (TorchScript exporter, opset 17) and quantized statically by
             onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights, uint8 activations, MinMax on
             the calibration inputs), CPU execution provider
  reference  the same program on backend="reference" (NumPy golden model), one run on one input

Also reported: the fraction of the int run spent outside native kernels (Python glue), from the time spent
inside ``pyqsim.ops`` dispatch, and each op's share of the run ("kernels", the fastest of three profiled runs: a
float stage that also writes the next node's codes counts under its own op). Ratios > 1 mean the integer program is
faster.

Usage: python benchmarks/bench_models.py [--threads N] [--only deit-s-w8a8,...] [--reps R] [--quick]
Writes JSON to benchmarks/results/bench_models-<N>threads.json (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _timer  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CASES = ("deit-s-w8a8", "deit-s-w4a4", "bert-base-w8a8", "ddpm-w8a8", "ddpm-w4a8")


# --------------------------------------------------------------------------- models


def _deit(quick: bool, batch: int, torch):
    from pyqsim.models.vit import deit_small
    model = deit_small(**({"depth": 2, "img_size": 64} if quick else {})).eval()
    model.reset_parameters(0)
    size = model.cfg.img_size
    g = torch.Generator().manual_seed(0)
    calib = torch.randn(4 if quick else 16, 3, size, size, generator=g)
    x = torch.randn(batch, 3, size, size, generator=g)
    return model, calib, (x,), {}


def _bert(quick: bool, batch: int, torch):
    import transformers
    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=128 if quick else 768, num_hidden_layers=2 if quick else 12,
        num_attention_heads=4 if quick else 12, intermediate_size=512 if quick else 3072,
        max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    seq = 32 if quick else 128
    g = torch.Generator().manual_seed(0)

    def inputs(n):
        ids = torch.randint(0, cfg.vocab_size, (n, seq), generator=g)
        mask = torch.ones(n, seq, dtype=torch.int64)
        mask[n // 2:, seq - seq // 4:] = 0  # padded sequences in half the batch
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(n, seq, dtype=torch.int64)}

    class Encoder(torch.nn.Module):  # one tensor out (last_hidden_state), for every contender alike
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    return Encoder(model).eval(), inputs(4 if quick else 16), (), inputs(batch)


def _ddpm(quick: bool, batch: int, torch):
    from pyqsim.models.unet import UNet, UNetConfig, ddpm_cifar10_unet
    if quick:
        model = UNet(UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                                dropout=0.0, num_groups=8)).eval()
    else:
        model = ddpm_cifar10_unet().eval()
    res = model.cfg.resolution
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g)
    t = torch.full((batch,), 500, dtype=torch.int64)
    return model, None, (x, t), {}


def _qdiff_calib(model, quick: bool, torch):
    from pyqsim.calib.qdiffusion import generate_calibration_data
    from pyqsim.models.ddim import DDIMSampler
    res = model.cfg.resolution
    return generate_calibration_data(model, DDIMSampler(steps=4), cali_n=2, cali_st=2 if quick else 4,
                                     shape=(3, res, res))


# --------------------------------------------------------------------------- contenders


def _ort_session(model, example_args, example_kwargs, calib_feeds, threads, workdir):
    """(run callable, note) of ONNX Runtime int8 on the float model, or (None, why not)."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        import torch
    except ImportError as exc:
        return None, f"onnxruntime not installed ({exc})"
    names = list(example_kwargs) if example_kwargs else [f"input{i}" for i in range(len(example_args))]
    args = tuple(example_kwargs.values()) if example_kwargs else example_args
    fp32 = os.path.join(workdir, "model.onnx")
    int8 = os.path.join(workdir, "model.int8.onnx")
    try:
        with warnings_off():
            torch.onnx.export(model, args, fp32, input_names=names, output_names=["out"], opset_version=17,
                              dynamo=False, dynamic_axes={n: {0: "batch"} for n in names})

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calib_feeds)

            def get_next(self):
                return next(self.it, None)

        quantize_static(fp32, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(int8, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    feed = {n: a.numpy() for n, a in zip(names, args)}
    return (lambda: sess.run(None, feed)), "QDQ, per-channel int8 weights, uint8 activations, MinMax"


@contextlib.contextmanager
def warnings_off():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def kernel_timer(acc: dict):
    """Add the seconds spent inside pyqsim.ops dispatch (native kernels and their argument handling) to acc[op]."""
    from pyqsim import ops
    orig = ops._dispatch

    def timed(op, backend, args):
        t0 = time.perf_counter()
        try:
            return orig(op, backend, args)
        finally:
            acc[op] = acc.get(op, 0.0) + time.perf_counter() - t0

    ops._dispatch = timed
    try:
        yield
    finally:
        ops._dispatch = orig


def run_case(name: str, args, torch) -> dict:
    import pyqsim
    model_key, bits = name.rsplit("-", 1)
    w_bits, a_bits = int(bits[1]), int(bits[3])
    batch = args.batch
    build = {"deit-s": _deit, "bert-base": _bert, "ddpm": _ddpm}[model_key]
    model, calib, xs, kw = build(args.quick, batch, torch)
    method = "qdiffusion" if model_key == "ddpm" else "repq-vit"
    t0 = time.perf_counter()
    if method == "qdiffusion":
        calib = _qdiff_calib(model, args.quick, torch)
        qmodel = pyqsim.quantize(model, calib, method=method, w_bits=w_bits, a_bits=a_bits, weight_iters=2,
                                 act_iters=2, init_samples=8, batch_size=4)
    else:
        qmodel = pyqsim.quantize(model, calib, method=method, w_bits=w_bits, a_bits=a_bits)
    calib_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.params")
        qmodel.export(path)
        program = pyqsim.load(path)
        np_pos = tuple(a.numpy() for a in xs)
        np_kw = {k: v.numpy() for k, v in kw.items()}
        fns = {"int": lambda: program.run(*np_pos, backend="cpu", **np_kw)}
        with torch.no_grad():
            fns["fp32"] = lambda: model(*xs, **kw)
            fns["fake"] = lambda: qmodel(*xs, **kw)
            if method == "qdiffusion":
                feeds = [{"input0": calib["x"][i:i + 1], "input1": calib["t"][i:i + 1]} for i in range(len(calib["x"]))]
            elif kw:
                feeds = [{k: v[i:i + 1].numpy() for k, v in calib.items()} for i in range(len(calib["input_ids"]))]
            else:
                feeds = [{"input0": calib[i:i + 1].numpy()} for i in range(len(calib))]
            ort_run, ort_note = (None, "skipped (--skip-ort)") if args.skip_ort else \
                _ort_session(model, xs, kw, feeds, args.threads, tmp)
            if ort_run is not None:
                fns["ort-int8"] = ort_run
            res = _timer.compare(fns, reps=args.reps, warmup=1)
        whole, inside = float("inf"), {}
        for _ in range(3):  # the profile of the fastest of three runs
            acc = {}
            with kernel_timer(acc):
                t1 = time.perf_counter()
                program.run(*np_pos, backend="cpu", **np_kw)
                t = time.perf_counter() - t1
            if t < whole:
                whole, inside = t, acc
        row = {"case": name, "batch": batch, "method": method, "w_bits": w_bits, "a_bits": a_bits,
               "calibration_seconds": round(calib_s, 1), "ort": ort_note,
               "ms_per_item": {k: v["best"] / batch * 1e3 for k, v in res.items()},
               "median_ms_per_item": {k: v["median"] / batch * 1e3 for k, v in res.items()},
               "outside_kernels_fraction": max(0.0, 1.0 - sum(inside.values()) / whole),
               "kernel_shares": {op: t / whole for op, t in sorted(inside.items(), key=lambda kv: -kv[1])}}
        if not args.skip_reference:
            one_pos = tuple(a[:1] for a in np_pos)
            one_kw = {k: v[:1] for k, v in np_kw.items()}
            t2 = time.perf_counter()
            ref = program.run(*one_pos, backend="reference", **one_kw)
            row["ms_per_item"]["reference"] = (time.perf_counter() - t2) * 1e3
            cpu_one = program.run(*one_pos, backend="cpu", **one_kw)
            row["reference_equals_cpu"] = bool(np.array_equal(np.asarray(ref), np.asarray(cpu_one)))
    ms = row["ms_per_item"]
    row["ratios"] = {f"{k}/int": ms[k] / ms["int"] for k in ("fp32", "fake", "ort-int8", "reference") if k in ms}
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=",".join(CASES), help=f"comma-separated cases of {', '.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help="tiny models (smoke run)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {', '.join(CASES)}")
    import torch
    from pyqsim.backends import cpu
    torch.set_num_threads(args.threads)
    cpu.set_num_threads(args.threads)
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": _timer.machine(),
              "threads": args.threads, "clock": "wall", "batch": args.batch, "quick": args.quick, "rows": []}
    print(f"threads={args.threads} batch={args.batch} (ms per image or sequence; ratio = contender / int)")
    print(f"{'case':<15} {'int':>8} {'fp32':>8} {'fake':>8} {'ort-int8':>9} {'reference':>10} {'fp32/int':>9} "
          f"{'fake/int':>9} {'ort/int':>8} {'glue':>6}")
    for name in cases:
        row = run_case(name, args, torch)
        report["rows"].append(row)
        ms, r = row["ms_per_item"], row["ratios"]
        f = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        print(f"{name:<15} {f(ms['int']):>8} {f(ms['fp32']):>8} {f(ms['fake']):>8} {f(ms.get('ort-int8')):>9} "
              f"{f(ms.get('reference')):>10} {r['fp32/int']:>9.2f} {r['fake/int']:>9.2f} "
              f"{r.get('ort-int8/int', float('nan')):>8.2f} {row['outside_kernels_fraction']:>6.1%}", flush=True)
        print("  kernels: " + ", ".join(f"{op} {v:.1%}" for op, v in list(row["kernel_shares"].items())[:8]))
        if "ort-int8" not in ms:
            print(f"  ort-int8: {row['ort']}")
    out = _timer.write_report(report, args.out or RESULTS / f"bench_models-{args.threads}threads.json", RESULTS,
                              "bench_models")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
