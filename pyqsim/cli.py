"""The ``pyqsim`` command line: demo, calibrate, run, verify, vectors, cost, info."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from . import build_info, ops
from ._argtypes import BACKEND_CHOICES, int_in as _int_in, positive_int as _positive_int
from ._version import __version__


class CLIError(Exception):
    """A user-facing failure: printed without a traceback, exit code 2."""


# `pyqsim verify` exit status when no backend besides the reference ran: nothing was compared, so nothing is verified
EXIT_NOTHING_COMPARED = 3


def _emit(args, data: dict, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=1, default=_jsonable))
    else:
        print(text)


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _load(path):
    from .runtime import ParamFileError, load
    if not os.path.isfile(path):
        raise CLIError(f"parameter file not found: {path}")
    try:
        return load(path)
    except ParamFileError as exc:
        raise CLIError(str(exc)) from None


def _inputs(path):
    """The arrays of a .npy/.npz input file (checked: readable, numeric, non-empty)."""
    if not os.path.isfile(path):
        raise CLIError(f"input file not found: {path}")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                arrays = [z[k] for k in z.files]
        else:
            arrays = [np.load(path, allow_pickle=False)]
    except Exception as exc:  # noqa: BLE001 - any unreadable file (pickled, truncated, bad zip) is a user error
        raise CLIError(f"--input {path} is not a readable .npy/.npz file of arrays: {type(exc).__name__}: {exc}") from None
    if not arrays:
        raise CLIError(f"--input {path} holds no arrays")
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf":
            raise CLIError(f"--input {path} must hold numeric arrays, got dtype {getattr(a, 'dtype', type(a))}")
        if a.size == 0:
            raise CLIError(f"--input {path} holds an empty array of shape {a.shape}")
    return arrays


def _named_inputs(program, path, n):
    """(positional, named) inputs of a program: its stored examples, or a .npy/.npz file (npz by input name)."""
    if path is None:
        ex = program.example_inputs()
        return (), {k: np.resize(v, (n,) + v.shape[1:]) if v.ndim else v for k, v in ex.items()}
    arrays = _inputs(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
        wanted = [i["name"] for i in program.inputs]
        if set(names) <= set(wanted):
            return (), dict(zip(names, arrays))
    return tuple(arrays), {}


def _run_program(program, args_in, backend):
    pos, named = args_in
    try:
        out = program.run(*pos, backend=backend, **named)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from None
    return out if isinstance(out, tuple) else (out,)


def _check_out_file(path: str, flag: str) -> None:
    """Fail before a long computation when the output file cannot be created."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a directory; give a file name")
    if not os.path.isdir(parent):
        raise CLIError(f"{flag} {path}: directory {parent} does not exist")


# Activation bit width of ``calibrate`` when --a-bits is not given: the settings of each method's paper table.
DEFAULT_A_BITS = {"repq-vit": 4, "qdiffusion": 8}


def _check_environment(args) -> None:
    """Fail before any work when the environment or ``--backend`` names something this process cannot run."""
    from .backends import cpu
    if cpu.available():
        try:
            cpu.get_isa()  # reads PYQSIM_CPU_ISA: an unknown value, or avx2 without AVX2, raises
        except (ValueError, RuntimeError) as exc:
            raise CLIError(str(exc)) from None
    backend = getattr(args, "backend", None)
    if backend is not None:
        try:
            ops.resolve_backend(backend, "int_gemm")
        except (ValueError, RuntimeError) as exc:
            raise CLIError(f"--backend {backend}: {exc}" if backend != "auto" else str(exc)) from None


# --------------------------------------------------------------------------- commands


def cmd_info(args) -> int:
    info = build_info()
    cpu = info.get("cpu", {})
    cuda = cpu.get("cuda", {}) if cpu.get("compiled") else {}
    lines = [
        f"pyqsim {info['version']} (numpy {info['numpy']})",
        f"backends available: {', '.join(ops.available_backends())}",
        f"cpu kernels: {'compiled' if cpu.get('compiled') else 'NOT compiled (' + str(cpu.get('reason')) + ')'}",
    ]
    if cpu.get("compiled"):
        lines.append(f"simd: {cpu.get('isa')} (compiled: {', '.join(cpu.get('simd_compiled', []))}), "
                     f"threads: {cpu.get('threads')}")
        if cpu.get("isa") == "scalar":
            lines.append("WARNING: the portable scalar path is in use; results are identical but much slower")
        lines.append(f"cuda: {'compiled' if cuda.get('compiled') else 'not compiled'}, "
                     f"devices seen: {cuda.get('devices', 0)}")
    simt = info.get("cuda", {}).get("simulator")
    lines.append(f"cuda kernels on the host SIMT emulator (tests): {'built' if simt else 'not built'}")
    _emit(args, info, "\n".join(lines))
    return 0


def cmd_run(args) -> int:
    program = _load(args.params)
    if args.out:
        _check_out_file(args.out, "--out")
    x = _named_inputs(program, args.input, args.n)
    t0 = time.perf_counter()
    outs = _run_program(program, x, args.backend)
    y = outs[0]
    dt = time.perf_counter() - t0
    backend = ops.resolve_backend(args.backend, "int_gemm")
    if args.out:
        np.save(args.out, y)
    data = {"params": args.params, "backend": backend, "output_shape": list(y.shape), "seconds": dt}
    if y.ndim == 2:
        data["predictions"] = y.argmax(axis=1).tolist()
    text = f"ran {args.params} on {backend} in {dt:.3f} s: output {tuple(y.shape)}"
    if "predictions" in data:
        text += f"\npredicted classes: {data['predictions']}"
    _emit(args, data, text)
    return 0


def _eps_inputs(program):
    """(C, H, W, number of timesteps) of a noise-prediction program with inputs x [N, C, H, W] float and t [N] int."""
    ins = program.inputs
    ok = (len(ins) == 2 and ins[0]["dtype"].startswith("float") and len(ins[0]["shape"]) == 4
          and ins[1]["dtype"].startswith(("int", "uint")) and len(ins[1]["shape"]) == 1)
    if not ok:
        desc = ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in ins)
        raise CLIError(f"sample needs a noise-prediction program with inputs (x [N, C, H, W] float32, t [N] int); "
                       f"this one takes {desc}")
    shape = list(ins[0]["shape"][1:])
    if any(s is None for s in shape):
        ex = program.example_inputs().get(ins[0]["name"])
        if ex is None:
            raise CLIError("the program's image size is symbolic and it stores no example input; re-export it")
        shape = list(ex.shape[1:])
    rng = ins[1].get("range")
    return tuple(shape), (int(rng[1]) + 1 if rng else 1000)


def cmd_sample(args) -> int:
    from .models.ddim import DDIMSampler
    from .runtime.images import grid, to_uint8, write_png
    program = _load(args.params)
    (c, h, w), n_t = _eps_inputs(program)
    if c not in (1, 3):
        raise CLIError(f"the program makes {c}-channel images; a PNG grid needs 1 or 3 (use --npy for the arrays)")
    _check_out_file(args.out, "--out")
    if args.npy:
        _check_out_file(args.npy, "--npy")
    if not args.eta >= 0:
        raise CLIError(f"--eta must be >= 0, got {args.eta}")
    if args.steps > n_t:
        raise CLIError(f"--steps must be <= the program's {n_t} timesteps, got {args.steps}")
    sampler = DDIMSampler(steps=args.steps, eta=args.eta, num_timesteps=n_t)
    backend = ops.resolve_backend(args.backend, "int_gemm")
    tty = sys.stderr.isatty() and not args.json
    t0 = time.perf_counter()

    def eps(x, t):
        out = program.run(x, t, backend=backend)
        return out[0] if isinstance(out, tuple) else out

    def progress(i, t, x):
        if tty:
            print(f"\rstep {i + 1}/{args.steps} (t = {t})", end="", file=sys.stderr, flush=True)

    x = sampler.sample(eps, (args.n, c, h, w), seed=args.seed, callback=progress)
    if tty:
        print(file=sys.stderr)
    dt = time.perf_counter() - t0
    write_png(args.out, grid(to_uint8(x)))
    if args.npy:
        np.save(args.npy, x)
    data = {"params": args.params, "backend": backend, "n": args.n, "steps": args.steps, "eta": args.eta,
            "seed": args.seed, "out": args.out, "seconds": dt}
    _emit(args, data, f"sampled {args.n} images ({args.steps} DDIM steps, {backend}) in {dt:.1f} s: wrote {args.out}")
    return 0


def verify_program(program, n: int, backends=None) -> dict:
    """Per-op replay on every backend plus whole-model runs, compared with ``==`` to the reference."""
    from .runtime.verify import compare, verify_calls
    x = _named_inputs(program, None, n)
    with ops.record() as calls:
        ref = _run_program(program, x, "reference")
    backends = [b for b in (backends or ops.available_backends()) if b != "reference"]
    mismatches, counts = verify_calls(calls, backends)
    end_to_end = {}
    for b in backends:
        out = _run_program(program, x, b)
        end_to_end[b] = sum(compare(r, o)[1] for r, o in zip(ref, out))
    return {"ops_checked": len(calls), "backends": backends, "op_mismatches": counts,
            "output_mismatches": end_to_end, "examples": [str(m) for m in mismatches],
            "ok": not mismatches and not any(end_to_end.values())}


def _onnx_session(program):
    """An ONNX Runtime CPU session on the program's ONNX export, or CLIError saying why not."""
    from .program.onnx_export import OnnxExportError
    try:
        import onnxruntime as ort
        model = program.to_onnx()
    except ImportError as exc:
        raise CLIError(f"--against onnxruntime needs onnx and onnxruntime ({exc})") from None
    except OnnxExportError as exc:
        raise CLIError(str(exc)) from None
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def cmd_verify_onnxruntime(args, program) -> int:
    """The program (numerics="onnxruntime", every backend) against ONNX Runtime on its ONNX export, with ==."""
    sess = _onnx_session(program)
    pos, named = _named_inputs(program, None, args.n)
    names = [i["name"] for i in program.inputs]
    feed = dict(zip(names, pos)) | named
    feed = {s.name: np.asarray(feed[n], dtype=np.dtype(_ONNX_NP[s.type]))
            for s, n in zip(sess.get_inputs(), names)}
    want = sess.run(None, feed)
    backends = args.backends or ops.available_backends()
    res = {"against": "onnxruntime", "backends": backends, "mismatches": {}, "outputs": len(want)}
    for b in backends:
        out = program.run(*pos, backend=b, numerics="onnxruntime", **named)
        outs = out if isinstance(out, tuple) else (out,)
        res["mismatches"][b] = int(sum(np.count_nonzero(np.asarray(o).view(np.uint32) != np.asarray(w, np.float32)
                                                        .view(np.uint32)) for o, w in zip(outs, want)))
    res["ok"] = all(v == 0 for v in res["mismatches"].values())
    lines = [f"{b}: {m} of the outputs' values differ from ONNX Runtime" for b, m in res["mismatches"].items()]
    lines.append("OK: equal to ONNX Runtime bit for bit" if res["ok"] else "FAILED: differs from ONNX Runtime")
    _emit(args, res, "\n".join(lines))
    return 0 if res["ok"] else 1


_ONNX_NP = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8",
            "tensor(bool)": "bool"}


def cmd_export(args) -> int:
    from .program.onnx_export import OnnxExportError
    program = _load(args.params)
    _check_out_file(args.out, "--out")
    try:
        program.to_onnx(args.out)
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    except OnnxExportError as exc:
        raise CLIError(str(exc)) from None
    _emit(args, {"params": args.params, "format": args.format, "out": args.out}, f"wrote {args.out} (ONNX opset 17)")
    return 0


def cmd_verify(args) -> int:
    program = _load(args.params)
    if args.against == "onnxruntime":
        return cmd_verify_onnxruntime(args, program)
    res = verify_program(program, args.n, args.backends)
    if not res["backends"]:
        res["ok"] = False
        res["note"] = "only the reference backend is available: nothing was compared"
        _emit(args, res, f"{res['ops_checked']} integer op calls ran on the reference only\n"
                         f"NOT VERIFIED: {res['note']} (exit status {EXIT_NOTHING_COMPARED})")
        return EXIT_NOTHING_COMPARED
    lines = [f"{res['ops_checked']} integer op calls checked against the reference on: {', '.join(res['backends'])}"]
    for b in res["backends"]:
        lines.append(f"  {b}: {res['op_mismatches'][b]} op-output mismatches, "
                     f"{res['output_mismatches'][b]} model-output mismatches")
    lines += [f"  MISMATCH {e}" for e in res["examples"]]
    lines.append("OK: bit-exact" if res["ok"] else "FAILED: mismatches found")
    _emit(args, res, "\n".join(lines))
    return 0 if res["ok"] else 1


def cmd_vectors(args) -> int:
    from .runtime.vectors import write_vectors
    program = _load(args.params)
    with ops.record() as calls:
        _run_program(program, _named_inputs(program, None, args.n), args.backend)
    manifest = write_vectors(calls, args.out, {"params": os.path.basename(args.params), "pyqsim": __version__})
    data = {"out": args.out, "layers": len(manifest["layers"])}
    _emit(args, data, f"wrote {len(manifest['layers'])} layers of golden vectors to {args.out} (manifest.json, .npz, .hex)")
    return 0


def cmd_cost(args) -> int:
    from .runtime.cost import program_cost
    program = _load(args.params)
    res = program_cost(program)
    lines = [f"{'layer':44s} {'op':16s} {'MACs':>12s} {'W':>2s} {'A':>2s} {'size MB':>9s}"]
    for l in res["layers"]:
        lines.append(f"{l['layer'][-44:]:44s} {l['op']:16s} {l['macs']:12d} {l['w_bits']:2d} {l['a_bits']:2d} "
                     f"{l['size_mb']:9.4f}")
    t = res["total"]
    res = {"inputs": program.inputs, **res}
    lines.insert(0, "inputs: " + ", ".join(
        f"{i['name']} {i['dtype']}[{', '.join('*' if s is None else str(s) for s in i['shape'])}]"
        + (f" in [{i['range'][0]}, {i['range'][1]}]" if i.get("range") else "") for i in program.inputs))
    lines.append(f"per sample: {t['macs']} MACs ({t['gmacs']:.3f} G), {t['gbitops']:.4f} Gbit-ops; integer weights "
                 f"{t['weight_params']} parameters, {t['size_mb']:.4f} MB at their code bits; float constants "
                 f"{t['float_params']} parameters, {t['float_size_mb']:.4f} MB at 32 bits")
    _emit(args, res, "\n".join(lines))
    return 0


def cmd_calibrate(args) -> int:
    _check_out_file(args.out, "--out")
    if args.model is not None and not os.path.isfile(args.model) and ":" not in args.model:
        raise CLIError(f"--model {args.model}: no such file, and not a package.module:factory spec")
    shape = None
    if args.shape:
        try:
            shape = tuple(int(v) for v in args.shape.split(","))
        except ValueError:
            raise CLIError(f"--shape must be C,H,W integers, got {args.shape!r}") from None
    a_bits = DEFAULT_A_BITS[args.method] if args.a_bits is None else args.a_bits
    from . import app
    res = app.calibrate(args.method, out=args.out, w_bits=args.w_bits, a_bits=a_bits, calib_n=args.calib_n,
                        model_file=args.model, quick=args.quick, progress=not args.json,
                        calib_file=args.calib, shape=shape)
    res = {**res, "w_bits": args.w_bits, "a_bits": a_bits}
    _emit(args, res, f"wrote {res['params']} ({args.method}, W{args.w_bits}A{a_bits}) in {res['seconds']:.1f} s")
    return 0


def cmd_demo(args) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} exists and is not a directory")
    from . import app
    res = app.demo(out_dir=args.out, quick=args.quick, backend=args.backend, progress=not args.json)
    _emit(args, res, res["summary"])
    return 0 if res["ok"] else 1


def cmd_table(args) -> int:
    return args.table_module.run(args)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyqsim", description="Bit-accurate integer simulation of quantized networks.")
    p.add_argument("--version", action="version", version=f"pyqsim {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=fn)
        return sp

    backend = dict(default="auto", choices=BACKEND_CHOICES, help="integer-op backend (default: auto)")
    d = add("demo", cmd_demo, "calibrate the bundled digits ViT (RepQ-ViT W4A4) and UNet (Q-Diffusion W4A8), "
                              "run them on the integer kernels, verify against the reference, write a report")
    d.add_argument("--quick", action="store_true", help="smaller settings (under a minute)")
    d.add_argument("--out", default="pyqsim-report", help="report folder (default: pyqsim-report)")
    d.add_argument("--backend", **backend)
    c = add("calibrate", cmd_calibrate, "calibrate a bundled model or a user's model file; write a parameter file")
    c.add_argument("method", choices=["repq-vit", "qdiffusion"])
    c.add_argument("--out", required=True, help="parameter file to write")
    c.add_argument("--w-bits", type=_int_in(2, 8), default=4, help="weight bit width, 2..8 (default: 4)")
    c.add_argument("--a-bits", type=_int_in(2, 8), default=None,
                   help="activation bit width, 2..8 (default: " +
                        ", ".join(f"{v} for {k}" for k, v in DEFAULT_A_BITS.items()) + ")")
    c.add_argument("--calib-n", type=_positive_int, default=None, help="calibration samples (default: the method's)")
    c.add_argument("--model", default=None, help="the user's model: a file saved with torch.save(module), or a "
                   "package.module:factory spec (imported from the current folder)")
    c.add_argument("--calib", default=None, help="repq-vit calibration inputs: .npy (one tensor) or .npz (keyword "
                   "tensors by name, e.g. input_ids, attention_mask); default: the bundled digits images")
    c.add_argument("--shape", default=None, help="qdiffusion sample shape C,H,W (default: from the model's config)")
    c.add_argument("--quick", action="store_true", help="CPU-light settings")
    r = add("run", cmd_run, "run inference from a parameter file")
    r.add_argument("params")
    r.add_argument("--input", help="a .npy for a program with one input, or a .npz of arrays named after the "
                   "program's inputs (e.g. x and t for a UNet, input_ids and attention_mask for BERT; `pyqsim cost "
                   "FILE` lists them), or of arrays in input order. Dtypes and shapes are checked, integer "
                   "inputs against their stored range (a UNet's t: [0, 999]); float inputs are used as given, so "
                   "pass the range the model was calibrated on (the bundled ViT: pixels in [0, 1]). Default: the "
                   "file's example inputs")
    r.add_argument("--n", type=_positive_int, default=8, help="number of example inputs when --input is not given")
    r.add_argument("--out", help="save the output as .npy")
    r.add_argument("--backend", **backend)
    s = add("sample", cmd_sample, "draw images from a noise-prediction (UNet) program with integer DDIM sampling "
                                  "(DDPM linear beta schedule 1e-4..0.02 over the program's timesteps)")
    s.add_argument("params")
    s.add_argument("--n", type=_positive_int, default=16, help="number of images (default 16)")
    s.add_argument("--steps", type=_positive_int, default=20, help="DDIM steps (default 20)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png", help="PNG grid of the images (default samples.png)")
    s.add_argument("--npy", default=None, help="also save the images [N, C, H, W] in [-1, 1] as .npy")
    s.add_argument("--backend", **backend)
    v = add("verify", cmd_verify, "run on every backend and on the reference; exit 1 on any mismatch, "
                                  f"{EXIT_NOTHING_COMPARED} when only the reference backend is available (nothing "
                                  "compared)")
    v.add_argument("params")
    v.add_argument("--n", type=_positive_int, default=4, help="example inputs to run")
    v.add_argument("--backends", nargs="*", default=None, help="backends to check (default: all available)")
    v.add_argument("--against", choices=["reference", "onnxruntime"], default="reference",
                   help="reference (default): every backend against pyqsim's reference; onnxruntime: the program "
                        "run with numerics='onnxruntime' against ONNX Runtime on its ONNX export, bit for bit")
    e = add("export", cmd_export, "write the program in another format (ONNX: MatMulInteger/ConvInteger, "
                                  "QuantizeLinear and float operators; a node without an ONNX form is named)")
    e.add_argument("params")
    e.add_argument("--format", choices=["onnx"], default="onnx")
    e.add_argument("--out", required=True, help="output file (.onnx)")
    g = add("vectors", cmd_vectors, "write golden per-layer test vectors (.npz, $readmemh hex, manifest.json)")
    g.add_argument("params")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--n", type=_positive_int, default=1, help="batch size of the recorded run")
    g.add_argument("--backend", **backend)
    k = add("cost", cmd_cost, "model size (Mb) and bit-operations per forward, per layer and total")
    k.add_argument("params")
    add("info", cmd_info, "the build: version, SIMD level, CUDA compiled, GPUs seen")
    from .experiments import qdiffusion_table, repqvit_table
    tb_help = "reproduce a paper's table on the bundled model (JSON + Markdown)"
    tb = sub.add_parser("table", help=tb_help, description=tb_help + "; `pyqsim table NAME --help` explains its options",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tables = tb.add_subparsers(dest="which", required=True, metavar="NAME")
    usages = []
    for name, mod, what in (("repq-vit", repqvit_table, "RepQ-ViT ablation on the digits ViT (W4A4, W6A6)"),
                            ("qdiffusion", qdiffusion_table, "Q-Diffusion vs linear quantization on the digits UNet")):
        t = tables.add_parser(name, help=what, description=mod.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(t)
        t.set_defaults(fn=cmd_table, table_module=mod)
        first, *rest = t.format_usage().replace("usage: ", "  ", 1).splitlines()
        usages += [first] + [line[5:] for line in rest]  # continuation lines follow the shorter prefix
    tb.epilog = "options of each table:\n" + "\n".join(usages)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_environment(args)
        return args.fn(args)
    except CLIError as exc:
        print(f"pyqsim {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError, OSError, MemoryError, KeyError) as exc:  # KeyError: a tensor missing from a parameter file
        if os.environ.get("PYQSIM_DEBUG"):
            raise
        print(f"pyqsim {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
