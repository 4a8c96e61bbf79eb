"""Q-Diffusion calibration, export and integer execution of the bundled digits UNet.

Tolerance policy (integer runner vs fake-quant on the same inputs). Both compute the same quantized
network; they differ only where float32 rounding differs:
  * accumulation: fake-quant sums K float products in torch's order (error <= K * u * sum|terms|,
    u = 2^-24, K <= 864 here), the integer op is exact and rounds once (spec §6);
  * GroupNorm / SiLU / softmax: torch vs NumPy float32, a few ulp.
Without a code flip the per-layer relative error is <= K * u ~ 5e-5, i.e. ATOL = 1e-3 * max|eps| over the
~30 layers of a path. A difference of a few ulp can move a value across a rounding boundary of the next
activation quantizer (a "code flip": one step s_x on one element), which then propagates. Flips are rare
events, so the policy is: >= FRAC_CLOSE of all eps elements agree within ATOL, and the mean absolute
difference is <= MEAN_TOL * mean|eps| (a wrong scale, bias or split anywhere fails both by orders of magnitude).
Both thresholds come from measured rates (torch 2.13 CPU, one thread, the fixture below):
  correct runner                                   frac within ATOL 0.8936, mean|diff| / mean|eps| 0.00250
  quantizer rounding half up instead of half even  0.8467,                  0.00308   (a one-code, ties-only error)
  quantizer rounding toward -inf                   0.0527,                  0.0850
FRAC_CLOSE = 0.87 and MEAN_TOL = 0.0028 lie halfway between the correct run and the ties-only error: a margin
of 0.024 (2.6 %) and 0.0003 (12 %) below/above the measured values, and the same distance from the error.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pyqsim.calib import qdiffusion as Q  # noqa: E402
from pyqsim.models.ddim import DDIMSampler  # noqa: E402
from pyqsim.models.unet import load_digits_unet  # noqa: E402
from pyqsim.runtime import load  # noqa: E402

ATOL_REL, FRAC_CLOSE, MEAN_TOL = 1e-3, 0.87, 0.0028  # derived in the tolerance policy above
MEAN_TOL_RANDOM = 0.05  # random-weight CIFAR-config model: mean agreement only (see that test)
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_digits_unet()


@pytest.fixture(scope="module")
def cali(model):
    return Q.generate_calibration_data(model, DDIMSampler(steps=10), cali_n=8, cali_st=4, shape=SHAPE, seed=3)


@pytest.fixture(scope="module")
def qmodel(model, cali):  # W4A8 Q-Diffusion quantizers with short reconstruction
    return Q.calibrate(model, cali, Q.QDiffConfig(w_bits=4, a_bits=8, weight_iters=2, act_iters=2, init_samples=32))


@pytest.fixture(scope="module")
def exported(qmodel, tmp_path_factory):
    path = tmp_path_factory.mktemp("qd") / "w4a8.params"
    meta = Q.export_params(qmodel, path)
    return path, meta


def _run(prog, x, t):
    return prog.run(np.asarray(x), np.asarray(t), backend="reference")


def test_calibration_data_timesteps_shapes_count(cali):
    sampler = DDIMSampler(steps=10)
    visited = sampler.timesteps[::-1]  # model inputs are seen from the noisiest step down
    assert list(cali["steps"]) == [0, 3, 6, 9]  # every 3rd step, first and last included
    assert cali["x"].shape == (4 * 8, *SHAPE) and cali["x"].dtype == np.float32
    assert list(cali["t"]) == [int(t) for t in visited[[0, 3, 6, 9]] for _ in range(8)]
    # the first kept input is x_T itself (pure noise, unit variance); later ones are partly denoised
    assert 0.8 < cali["x"][:8].std() < 1.2


def test_calibration_data_matches_sampler_inputs(model):
    seen = []
    s = DDIMSampler(steps=5)
    from pyqsim.models.ddim import torch_eps_fn
    s.sample(torch_eps_fn(model), (3, *SHAPE), seed=9, callback=lambda i, t, x: seen.append((t, x.copy())))
    c = Q.generate_calibration_data(model, s, cali_n=3, cali_st=5, shape=SHAPE, seed=9)
    np.testing.assert_array_equal(c["x"], np.concatenate([x for _, x in seen]))


def test_block_reconstruction_beats_nearest_rounding(model, cali):
    cfg = Q.QDiffConfig(w_bits=4, a_bits=32, weight_iters=300, first_last_bits=None)
    xs, ts = torch.as_tensor(cali["x"]), torch.as_tensor(cali["t"])
    q = Q.quantize_model(model, cfg, (xs[:2], ts[:2]))
    name = "up.1.block.0"
    unit = q.get_submodule(name)
    layers, _ = Q._parts(unit)
    for m in layers:
        for wq, w in zip(m.wq, m.weights()):
            wq.init(w, "mse")
    args, tgt = Q._capture(model, model.get_submodule(name), xs, ts)
    nearest = Q._unit_error(unit, args, tgt)
    Q._reconstruct_weights(unit, layers, args, tgt, cfg, torch.Generator().manual_seed(0))
    assert all(not wq.soft and wq.alpha is not None for m in layers for wq in m.wq)
    h = torch.cat([wq.h().flatten() for m in layers for wq in m.wq])
    assert float(((h > 0) & (h < 1)).float().mean()) < 0.05  # the regularizer drove h to {0, 1}
    assert Q._unit_error(unit, args, tgt) < 0.8 * nearest


def test_split_layers_get_separate_quantizers(model, qmodel):
    split = {n for n, m in model.named_modules() if getattr(m, "qsplit", 0)}
    assert split
    for name, m in qmodel.model.named_modules():
        if isinstance(m, Q.QuantLayer):
            assert (m.split > 0) == (name in split)
            assert len(m.wq) == len(m.aq) == (2 if m.split else 1)
    m = qmodel.model.get_submodule(sorted(split)[0])
    assert m.aq[0] is not m.aq[1] and m.aq[0].export() != m.aq[1].export()
    assert not torch.equal(m.wq[0].scale, m.wq[1].scale)


@pytest.mark.parametrize("entry", ["calibrate", "pyqsim.quantize"])
def test_linear_baseline_has_no_split_and_minmax(model, cali, entry):
    if entry == "calibrate":
        q = Q.calibrate(model, cali, Q.QDiffConfig(w_bits=8, a_bits=8, method="linear"))
    else:
        import pyqsim
        q = pyqsim.quantize(model, cali, method="linear", w_bits=8, a_bits=8)
    layers = [m for m in q.modules() if isinstance(m, Q.QuantLayer)]
    assert all(m.split == 0 and m.wq[0].alpha is None for m in layers)
    w = layers[0].module.weight.detach().reshape(len(layers[0].module.weight), -1)
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    torch.testing.assert_close(layers[0].wq[0].scale, ((hi - lo) / 255).float())


def test_export_round_trip(qmodel, exported):
    from pyqsim import ops
    path, _ = exported
    prog = load(path)
    node = next(n for n in prog.nodes if n.get("scope") == "model.up.1.block.0.conv1" and n["kind"] == "split_conv2d")
    assert node["kind"] == "split_conv2d" and prog.info["quant"]["w_bits"] == 4
    m = qmodel.get_submodule("model.up.1.block.0.conv1")
    for i, (wq, w) in enumerate(zip(m.wq, m.weights())):
        codes = wq.codes(w).detach().numpy().astype(np.int8)
        stored = prog.tensors[node["tensors"][f"w{i + 1}"]]
        unpacked = ops.unpack_int4(stored, codes[0].size).reshape(codes.shape)
        np.testing.assert_array_equal(unpacked, codes)
    assert prog.tensors[node["tensors"]["bias"]].dtype == np.int32
    assert node["attrs"]["x1_zero_point"] == m.aq[0].export()[1]


def test_integer_runner_matches_fake_quant_and_uses_split_op(qmodel, exported, cali):
    path, _ = exported
    prog = load(path)
    x, t = cali["x"][::2], cali["t"][::2]
    eps_int = _run(prog, x, t)
    with torch.no_grad():
        eps_fq = qmodel(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    n_split = sum(1 for m in qmodel.modules() if isinstance(m, Q.QuantLayer) and m.split)
    kinds = prog.describe()["kinds"]
    assert n_split > 0 and kinds["split_conv2d"] == n_split  # one split op per split layer
    assert kinds["int_conv2d"] > 0 and kinds["int_gemm"] > 0 and kinds["int_bmm"] > 0
    diff = np.abs(eps_int - eps_fq)
    assert np.mean(diff <= ATOL_REL * np.abs(eps_fq).max()) >= FRAC_CLOSE
    assert diff.mean() <= MEAN_TOL * np.abs(eps_fq).mean()


def test_cost_from_program_matches_model(qmodel, exported):
    from pyqsim.eval.cost import model_cost
    from pyqsim.runtime.cost import program_cost
    path, _ = exported
    c_file = program_cost(load(path))["total"]
    c_model = model_cost(qmodel.model, (torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long)), 4, 8)
    assert c_file["macs"] == c_model["macs"]


def test_a32_runner_runs_float_with_dequantized_weights(model, cali, tmp_path):
    q = Q.calibrate(model, cali, Q.QDiffConfig(w_bits=8, a_bits=32, weight_iters=0))
    Q.export_params(q, tmp_path / "w8a32.params")
    prog = load(tmp_path / "w8a32.params")
    x, t = cali["x"][:4], cali["t"][:4]
    with torch.no_grad():
        ref = q(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(_run(prog, x, t), ref, atol=1e-4 * np.abs(ref).max())
    assert not prog.integer_nodes()


@pytest.mark.slow
def test_mismatch_count_whole_sampling_run(exported):
    from pyqsim.experiments.qdiffusion_table import count_mismatches
    path, _ = exported
    res = count_mismatches(load(path), DDIMSampler(steps=5), n=2, seed=0)
    assert res["op_calls"] > 0 and res["mismatches"] == 0


@pytest.fixture(scope="module")
def cifar():
    from pyqsim.models.unet import ddpm_cifar10_unet
    torch.manual_seed(0)
    return ddpm_cifar10_unet().eval(), (torch.randn(1, 3, 32, 32), torch.tensor([10]))


def test_ddpm_cifar10_config_is_wrapped_generically(cifar):
    m, example = cifar
    q = Q.quantize_model(m, Q.QDiffConfig(w_bits=4, a_bits=8), example)
    layers = {n: mod for n, mod in q.named_modules() if isinstance(mod, Q.QuantLayer)}
    assert len(layers) == sum(isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) for mod in m.modules())
    assert sum(mod.split > 0 for mod in layers.values()) == 24  # conv1 + nin_shortcut of the 12 up-path blocks
    assert {n for n, mod in layers.items() if mod.w_bits == 8} == {"conv_in", "conv_out"}
    assert sum(isinstance(mod, Q.QuantAttnCore) for mod in q.modules()) == 6
    units = [n for n, _ in Q._units(q, example)]
    assert len(units) == 22 + 6 + 10 and units[:3] == ["temb_dense.0", "temb_dense.1", "conv_in"]
    assert units[-1] == "conv_out"


@pytest.mark.slow
def test_ddpm_cifar10_config_calibrates_exports_and_runs(cifar, tmp_path):
    m, _ = cifar
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    cfg = Q.QDiffConfig(w_bits=4, a_bits=8, weight_iters=0, act_iters=0, init_samples=2)
    q = Q.calibrate(m, {"x": x.numpy(), "t": t.numpy()}, cfg)
    Q.export_params(q, tmp_path / "cifar.params")
    prog = load(tmp_path / "cifar.params")
    eps_int = prog.run(x[:1].numpy(), t[:1].numpy())
    with torch.no_grad():
        eps_fq = q(x[:1], t[:1]).numpy()
    assert prog.describe()["kinds"]["split_conv2d"] == 24
    # random weights over ~40 quantized units: code flips spread through the whole output, so only the mean
    # agreement is checked here (the per-element policy applies to the trained digits model above)
    print("cifar int-vs-fake mean |diff| / mean |eps|:", np.abs(eps_int - eps_fq).mean() / np.abs(eps_fq).mean())
    assert np.abs(eps_int - eps_fq).mean() <= MEAN_TOL_RANDOM * np.abs(eps_fq).mean()


def test_sample_command_draws_the_same_images_on_every_backend(exported, tmp_path, capsys):
    """`pyqsim sample`: integer DDIM sampling of the exported program; cpu == reference bit for bit, and the PNG
    grid (read back by matplotlib's decoder) holds the samples' bytes."""
    import json
    from pyqsim.cli import main
    from pyqsim.runtime.images import grid, to_uint8
    path, _ = exported
    runs = {}
    for backend in ("reference", "cpu"):
        png, npy = tmp_path / f"{backend}.png", tmp_path / f"{backend}.npy"
        rc = main(["sample", str(path), "--n", "3", "--steps", "3", "--seed", "5", "--out", str(png), "--npy", str(npy),
                   "--backend", backend, "--json"])
        assert rc == 0 and json.loads(capsys.readouterr().out)["steps"] == 3
        runs[backend] = (png, np.load(npy))
    x = runs["cpu"][1]
    assert x.shape == (3,) + SHAPE and np.isfinite(x).all()
    assert np.array_equal(x, runs["reference"][1])
    mpimg = pytest.importorskip("matplotlib.image")
    px = np.rint(mpimg.imread(runs["cpu"][0]) * 255).astype(np.uint8)
    want = grid(to_uint8(x))
    assert np.array_equal(px.reshape(want.shape), want)


def test_sample_command_rejects_programs_that_are_not_eps_models(tmp_path, capsys):
    from pyqsim.cli import main
    from pyqsim.program import Program
    prog = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}], "nodes": [],
            "outputs": [{"name": "y", "value": {"@": "x"}}]}
    path = tmp_path / "identity.pqs"
    Program({}, {"program": prog}).save(path)
    assert main(["sample", str(path), "--out", str(tmp_path / "s.png")]) == 2
    assert "noise-prediction program" in capsys.readouterr().err
