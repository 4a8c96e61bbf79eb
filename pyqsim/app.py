"""The main job (``pyqsim demo``) and ``pyqsim calibrate``: calibration, export, integer runs, verification, report.

Needs the ``full`` extra (PyTorch, scikit-learn, matplotlib) for calibration; the exported parameter files then
run on the integer ops without it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import build_info, ops, report


class Progress:
    """Stage progress on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.enabled = enabled and sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            fill = int(width * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                             f"{time.perf_counter() - self.t0:6.1f}s {label[:48]:48s}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class DemoSettings:
    """Sizes of the demo run; ``quick`` shrinks every one."""

    vit_calib: int = 32
    unet_cali_n: int = 32
    unet_cali_st: int = 10
    unet_weight_iters: int = 150
    unet_act_iters: int = 50
    unet_samples: int = 1000
    unet_steps: int = 20
    check_samples: int = 4
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(vit_calib=32, unet_cali_n=8, unet_cali_st=5, unet_weight_iters=20, unet_act_iters=10,
                   unet_samples=200, unet_steps=10, check_samples=2)


def _sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.mean((ref.astype(np.float64) - test) ** 2))
    power = float(np.mean(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(power, 1e-30) / noise)


def _module_outputs(model, inputs: tuple, names) -> dict:
    """Output of each named submodule of ``model`` on ``inputs`` (first call), as float NumPy arrays."""
    import torch

    mods = dict(model.named_modules())
    got, hooks = {}, []

    def keep(name):
        def hook(module, inputs, output):
            got.setdefault(name, output.detach().float().numpy().copy())
        return hook

    for n in names:
        if n in mods:
            hooks.append(mods[n].register_forward_hook(keep(n)))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return got


def _integer_outputs(run_integer, names) -> dict:
    """Float32 outputs of the integer GEMM/convolution ops recorded under each layer's scope name."""
    layer_ops = ("int_gemm", "int_conv2d", "split_gemm", "split_conv2d")
    with ops.record() as calls:
        run_integer()
    wanted, got = set(names), {}
    for scope, op, _, result in calls:
        if op in layer_ops and scope in wanted and np.asarray(result).dtype == np.float32:
            got.setdefault(scope, np.asarray(result))
    return got


def layer_errors(fp_model, q_model, inputs: tuple, run_integer=None) -> dict:
    """SQNR (dB) of each Linear/Conv2d output against the same-named module of ``fp_model``: of ``q_model``
    (``"fake"``) and, given ``run_integer`` (a call of the integer program on the same inputs), of the integer
    layer outputs recorded under that name (``"integer"``)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    names = [n for n, m in fp_model.named_modules() if isinstance(m, kinds)]
    q_mods = dict(q_model.named_modules())
    # the calibrated module of each layer: the same path, or the quantized copy RepQ-ViT inserts ("<path>_q"),
    # under Q-Diffusion's EpsModel wrapper ("model.<path>"); program nodes carry the same path as their scope
    q_name = {}
    for n in names:
        for cand in (f"{n}_q", n, f"model.{n}_q", f"model.{n}"):
            if cand in q_mods:
                q_name[n] = cand
                break
    fp = _module_outputs(fp_model, inputs, names)
    fake_by_q = _module_outputs(q_model, inputs, list(q_name.values()))
    fake = {n: fake_by_q[q] for n, q in q_name.items() if q in fake_by_q}
    res = {"fake": {n: _sqnr_db(fp[n], fake[n]) for n in names
                    if n in fp and n in fake and fp[n].shape == fake[n].shape}, "integer": {}}
    if run_integer is not None:
        got = _integer_outputs(run_integer, list(q_name.values()))
        for n, q in q_name.items():
            y = got.get(q)
            if y is not None and n in fp and y.size == fp[n].size:
                res["integer"][n] = _sqnr_db(fp[n], y.reshape(fp[n].shape))
    return res


# --------------------------------------------------------------------------- ViT


def demo_vit(out: Path, st: DemoSettings, backend: str, prog: Progress) -> dict:
    import torch

    from .calib.repqvit import RepQConfig, calibrate, calibration_batch
    from .models.vit import DIGITS_WEIGHTS, digits_split, load_npz
    from .runtime import load
    from .runtime.verify import replay_counts

    model, _ = load_npz(DIGITS_WEIGHTS)
    x_tr, _, x_te, y_te = digits_split()
    x_te_t = torch.from_numpy(x_te)
    with torch.no_grad():
        fp_logits = model(x_te_t).numpy()
    t0 = time.perf_counter()
    res = calibrate(model, calibration_batch(torch.from_numpy(x_tr), st.vit_calib, 0), RepQConfig(4, 4))
    calib_s = time.perf_counter() - t0
    prog.step("ViT: RepQ-ViT W4A4 calibrated")
    fake_logits = res(x_te_t).numpy()
    path = out / "vit_w4a4.safetensors"
    res.export(path)
    program = load(path)
    t0 = time.perf_counter()
    with ops.record() as calls:
        int_logits = program.run(x_te, backend=backend)
    int_s = time.perf_counter() - t0
    prog.step("ViT: integer inference on the test set")
    check = {"backend": ops.resolve_backend(backend, "int_gemm"), **replay_counts(calls)}
    prog.step("ViT: every integer op re-run on the reference")
    codes = np.concatenate([a.codes.ravel() for _, op, a, _ in calls if op == "log2_attn_matmul"])
    errors = layer_errors(model, res.model, (x_te_t[:64],), lambda: program.run(x_te[:64], backend=backend))
    top1 = lambda lg: float((lg.argmax(1) == y_te).mean() * 100)  # noqa: E731
    return {
        "model": "digits ViT", "bits": "W4A4", "params": path.name, "test_images": int(len(y_te)),
        "fp32_top1": top1(fp_logits), "fake_top1": top1(fake_logits), "int_top1": top1(int_logits),
        "int_vs_fake_agreement": float((int_logits.argmax(1) == fake_logits.argmax(1)).mean() * 100),
        "calib_seconds": calib_s, "int_seconds": int_s, "backend": check["backend"], "check": check,
        "attn_code_hist": np.bincount(codes, minlength=16).tolist(), "layer_sqnr_db": errors["fake"],
        "layer_sqnr_db_integer": errors["integer"],
    }


# --------------------------------------------------------------------------- UNet


def demo_unet(out: Path, st: DemoSettings, backend: str, prog: Progress) -> dict:
    import torch

    from .calib.qdiffusion import QDiffConfig, calibrate, export_params, generate_calibration_data
    from .eval.fid import fid, inception_score
    from .experiments.qdiffusion_table import count_mismatches
    from .models.ddim import DDIMSampler, torch_eps_fn
    from .models.digits_classifier import load_digits_classifier
    from .models.unet import load_digits_unet
    from .runtime import load

    model, clf = load_digits_unet(), load_digits_classifier()
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    sampler = DDIMSampler(steps=st.unet_steps, eta=0.0, skip="quadratic")

    def sample(eps_fn):
        t0 = time.perf_counter()
        x = np.clip(sampler.sample(eps_fn, (st.unet_samples, *shape), seed=0), -1, 1)
        return x, time.perf_counter() - t0

    fp_x, fp_s = sample(torch_eps_fn(model))
    prog.step("UNet: full-precision samples")
    t0 = time.perf_counter()
    cali = generate_calibration_data(model, sampler, st.unet_cali_n, st.unet_cali_st, shape, seed=1)
    qcfg = QDiffConfig(w_bits=4, a_bits=8, weight_iters=st.unet_weight_iters, act_iters=st.unet_act_iters, **st.extra)
    qmodel = calibrate(model, cali, qcfg)
    calib_s = time.perf_counter() - t0
    prog.step("UNet: Q-Diffusion W4A8 calibrated")
    fq_x, fq_s = sample(torch_eps_fn(qmodel))
    prog.step("UNet: fake-quant samples")
    path = out / "unet_w4a8.safetensors"
    export_params(qmodel, path)
    program = load(path)
    int_x, int_s = sample(lambda x, t: program.run(x, t, backend=backend))
    prog.step("UNet: integer samples")
    check = count_mismatches(program, sampler, st.check_samples, 0, backend)
    prog.step("UNet: integer sampling re-run on the reference")
    xt = torch.from_numpy(np.random.default_rng(3).standard_normal((16, *shape), dtype=np.float32))
    tt = torch.full((16,), 500, dtype=torch.long)
    errors = layer_errors(model, qmodel, (xt, tt), lambda: program.run(xt.numpy(), tt.numpy(), backend=backend))
    scores = lambda x: {"fid": fid(x, clf=clf), "is": inception_score(x, clf=clf)}  # noqa: E731
    return {
        "model": "digits UNet", "bits": "W4A8", "params": path.name, "samples": st.unet_samples,
        "ddim_steps": st.unet_steps, "fp32": {**scores(fp_x), "seconds": fp_s},
        "fake": {**scores(fq_x), "seconds": fq_s}, "integer": {**scores(int_x), "seconds": int_s},
        "mean_abs_pixel_diff_int_vs_fake": float(np.abs(int_x - fq_x).mean()),
        "calib_seconds": calib_s, "check": check, "layer_sqnr_db": errors["fake"],
        "layer_sqnr_db_integer": errors["integer"],
        "_grids": {"FP32": fp_x, "Q-Diffusion W4A8 fake-quant": fq_x, "Q-Diffusion W4A8 integer": int_x},
    }


# --------------------------------------------------------------------------- report


def demo(out_dir="pyqsim-report", quick: bool = False, backend: str = "auto", progress: bool = True,
         settings: DemoSettings | None = None) -> dict:
    """Run the main job on the bundled models; writes report.md, report.json, parameter files and PNGs."""
    import torch

    torch.set_num_threads(1)  # the bundled models are small: one thread is fastest and never oversubscribes
    st = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prog = Progress(10, progress)
    t0 = time.perf_counter()
    vit = demo_vit(out, st, backend, prog)
    unet = demo_unet(out, st, backend, prog)
    figures = report.figures(out, vit, unet)
    prog.step("report written")
    total = time.perf_counter() - t0
    info = build_info()
    summary = report.summary(vit, unet, total, info, st)
    ok = vit["check"]["mismatches"] == 0 and unet["check"]["mismatches"] == 0
    result = {"ok": ok, "quick": quick, "seconds": total, "build": info, "vit": vit, "unet": unet,
              "settings": st.__dict__, "figures": figures, "summary": summary}
    (out / "report.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "report.md").write_text(report.markdown({**result, "settings_obj": st}))
    result["summary"] = summary + f"\n\nreport: {out / 'report.md'}" + ("" if ok else "\nFAILED: mismatches found")
    return result


# --------------------------------------------------------------------------- calibrate


def load_user_model(spec: str):
    """A user's model: a file saved with ``torch.save(module)`` or a ``package.module:factory`` spec (imported with
    the current folder on the path, so the user's own modules are found)."""
    import importlib
    import sys

    import torch

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if os.path.isfile(spec):
        try:
            model = torch.load(spec, weights_only=False)  # the user's own file: a pickled module
        except ModuleNotFoundError as exc:
            raise ValueError(f"--model {spec}: the class of the saved model lives in module {exc.name!r}, which "
                             "cannot be imported; run from the folder that holds it, or give package.module:factory")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error
            raise ValueError(f"--model {spec} is not a file saved with torch.save(model) "
                             f"({type(exc).__name__}: {str(exc)[:200]})") from None
    elif ":" in spec:
        mod_name, _, factory = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), factory)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"--model {spec}: cannot import {factory!r} from {mod_name!r} ({exc})") from None
        model = fn()
    else:
        raise ValueError(f"--model {spec}: no such file, and not a package.module:factory spec")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model {spec} must give a torch.nn.Module, got {type(model).__name__}")
    return model.eval()


def _calib_inputs(path):
    """Calibration inputs from a .npy (one tensor) or .npz (keyword tensors by name) file."""
    import torch

    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        return torch.from_numpy(np.load(path, allow_pickle=False))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"--calib {path} is not a readable .npy/.npz file ({type(exc).__name__}: {exc})") from None


def calibrate(method: str, out, w_bits: int = 4, a_bits: int | None = None, calib_n: int | None = None,
              model_file=None, quick: bool = False, progress: bool = True, calib_file=None, shape=None) -> dict:
    """Calibrate the bundled model (or a user's model) with ``method``; write the program file ``out``."""
    import torch

    torch.set_num_threads(1)
    prog = Progress(2, progress)
    t0 = time.perf_counter()
    user_model = load_user_model(model_file) if model_file is not None else None
    if method == "repq-vit":
        from .calib.repqvit import RepQConfig, calibrate as rq_calibrate, calibration_batch
        from .models.vit import DIGITS_WEIGHTS, digits_split, load_npz

        model = user_model or load_npz(DIGITS_WEIGHTS)[0]
        if calib_file is not None:
            calib = _calib_inputs(calib_file)
        else:
            x_tr = digits_split()[0]
            calib = calibration_batch(torch.from_numpy(x_tr), calib_n or 32, 0)
        res = rq_calibrate(model, calib, RepQConfig(w_bits, a_bits or 4))
        prog.step("calibrated")
        res.export(out)
    elif method == "qdiffusion":
        from .calib.qdiffusion import QDiffConfig, calibrate as qd_calibrate, export_params, generate_calibration_data
        from .models.ddim import DDIMSampler
        from .models.unet import load_digits_unet

        model = user_model or load_digits_unet()
        if shape is None:
            cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
            try:
                shape = (cfg.in_channels, cfg.resolution if hasattr(cfg, "resolution") else cfg.sample_size,
                         cfg.resolution if hasattr(cfg, "resolution") else cfg.sample_size)
            except AttributeError:
                raise ValueError("qdiffusion needs the sample shape of the model: give --shape C,H,W") from None
        sampler = DDIMSampler(steps=10 if quick else 20, eta=0.0, skip="quadratic")
        cali = generate_calibration_data(model, sampler, calib_n or (8 if quick else 64), 5 if quick else 10,
                                         tuple(shape), seed=1)
        kw = dict(weight_iters=20, act_iters=10) if quick else {}
        qmodel = qd_calibrate(model, cali, QDiffConfig(w_bits=w_bits, a_bits=a_bits or 8, **kw))
        prog.step("calibrated")
        export_params(qmodel, out)
    else:
        raise ValueError(f"method must be 'repq-vit' or 'qdiffusion', got {method!r}")
    prog.step(f"wrote {out}")
    return {"params": str(out), "method": method, "w_bits": w_bits, "a_bits": a_bits or (4 if method == "repq-vit" else 8),
            "seconds": time.perf_counter() - t0}
