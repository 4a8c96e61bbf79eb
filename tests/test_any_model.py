"""Any model in: models from other code quantized with pyqsim.quantize, exported, loaded and run by the program
interpreter, plus the command line on each exported file.

Tolerance policy
- Integer paths: the cpu backend equals the reference backend bit for bit (``np.array_equal`` on the float32
  bits, 0 mismatches), at the exported sequence length and at another one. No tolerance, ever.
- Integer program vs the fake-quant model: both compute the same quantized function; they differ by float32
  summation order in the GEMMs, which can move an activation across a rounding boundary of the next quantizer
  (one code) and cascade from there. Measured (W8A8, this file's seeds and sizes):
    BERT last_hidden_state / pooler, per sample cosine min 1.0 / 0.9999999 at length 16 and 64 (max |diff| 9e-5);
    ViT top-1 agreement 100 % (64 images), cosine min 0.99977;
    TransformerEncoder pre-LN / post-LN top-1 agreement 100 %, cosine min 0.9999998 / 0.99997;
    residual CNN top-1 agreement 100 %, max |diff| 1.2e-7;
    diffusers UNet (tiny) eps over 5 DDIM steps, per sample cosine min 0.9990, mean 0.99990.
  Thresholds: cosine >= 0.999 (BERT, encoders, CNN: ~1e-3 below the worst measured value, i.e. a hundredfold
  margin on 1 - cos), top-1 agreement >= 95 % (one flip in 20 allowed), UNet eps cosine min >= 0.99 and mean
  >= 0.999 (ten times the measured 1 - cos).
- Float kinds added for CNNs (pool2d, batch_norm) vs PyTorch: float32 rounding of a few ops, 1e-6.
- DDPM CIFAR-10 cost (min-max calibration on 2 samples, ~40 s on one thread; only the cost is checked): MAC counts are integers computed two ways and compared exactly.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pyqsim  # noqa: E402
from pyqsim.cli import main  # noqa: E402

pytestmark = pytest.mark.needs_torch
COS_MIN, AGREE_MIN = 0.999, 0.95


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def same_bits(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _export(q, tmp_path_factory, name: str):
    """The calibrated model's program file in a fresh temporary folder."""
    path = tmp_path_factory.mktemp(name) / f"{name}.safetensors"
    q.export(path)
    return path


def run_both(prog, *args, **kw):
    """(cpu output, reference output, cpu seconds) of one run; outputs as tuples."""
    t0 = time.perf_counter()
    yc = prog.run(*args, backend="auto", **kw)
    dt = time.perf_counter() - t0
    yr = prog.run(*args, backend="reference", **kw)
    as_t = (lambda y: y if isinstance(y, tuple) else (y,))
    return as_t(yc), as_t(yr), dt


def cli_checks(capsys, path, tmp_path):
    """pyqsim verify / vectors / cost on an exported file all succeed."""
    def run(argv):
        rc = main(argv + ["--json"])
        return rc, json.loads(capsys.readouterr().out)

    rc, res = run(["verify", str(path), "--n", "2"])
    assert rc == 0 and res["ok"] and res["ops_checked"] > 0, res
    rc, res = run(["vectors", str(path), "--out", str(tmp_path / "vec")])
    assert rc == 0 and res["layers"] > 0
    assert (tmp_path / "vec" / "manifest.json").is_file()
    rc, res = run(["cost", str(path)])
    assert rc == 0 and res["total"]["macs"] > 0
    return res


# --------------------------------------------------------------------------- 1. Hugging Face BERT (post-LN)

def _bert_batch(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, length * 3 // 4:] = 0  # padded rows
    types = torch.zeros(n, length, dtype=torch.long)
    types[:, length // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_act="gelu")
    model = transformers.BertModel(cfg).eval()
    q = pyqsim.quantize(model, _bert_batch(32, 16, 0), w_bits=8, a_bits=8)
    return q, _export(q, tmp_path_factory, "bert")


@pytest.mark.parametrize("length", [16, 64], ids=["exported-length", "longer"])
def test_bert_integer_program(bert, length):
    q, path = bert
    prog = pyqsim.load(path)
    x = _bert_batch(8, length, 1)
    yc, yr, _ = run_both(prog, **{k: v.numpy() for k, v in x.items()})
    assert len(yc) == 2 and all(same_bits(a, b) for a, b in zip(yc, yr))
    assert yc[0].shape == (8, length, 32)
    fake = q(**x)
    for got, want in zip(yc, (fake.last_hidden_state, fake.pooler_output)):
        assert cosines(got, want.numpy()).min() >= COS_MIN


def test_bert_without_token_type_ids(tmp_path):
    """BertEmbeddings then reads its buffered token types with torch.gather."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    x = _bert_batch(16, 12, 0)
    del x["token_type_ids"]
    q = pyqsim.quantize(transformers.BertModel(cfg).eval(), x, w_bits=8, a_bits=8)
    q.export(tmp_path / "bert.safetensors")
    prog = pyqsim.load(tmp_path / "bert.safetensors")
    assert prog.describe()["kinds"]["gather"] == 1
    yc, yr, _ = run_both(prog, **{k: v.numpy() for k, v in x.items()})
    assert all(same_bits(a, b) for a, b in zip(yc, yr))
    assert cosines(yc[0], q(**x).last_hidden_state.numpy()).min() >= COS_MIN


def test_bert_cli(bert, capsys, tmp_path):
    cli_checks(capsys, bert[1], tmp_path)


# --------------------------------------------------------------------------- 2. Hugging Face ViT (pre-LN)

@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    q = pyqsim.quantize(model, torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                        w_bits=8, a_bits=8)
    return q, _export(q, tmp_path_factory, "vit")


def test_vit_integer_program(vit):
    q, path = vit
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (yc,), (yr,), _ = run_both(pyqsim.load(path), x.numpy())
    assert same_bits(yc, yr)
    fake = q(x).logits.numpy()
    assert (yc.argmax(1) == fake.argmax(1)).mean() >= AGREE_MIN
    assert cosines(yc, fake).min() >= COS_MIN


def test_vit_cli(vit, capsys, tmp_path):
    cli_checks(capsys, vit[1], tmp_path)


# --------------------------------------------------------------------------- 3. torch.nn.TransformerEncoder

def EncoderClassifier(norm_first: bool):  # noqa: N802 - the encoder classifier of tests/test_repqvit.py
    from test_repqvit import _EncoderClassifier
    return _EncoderClassifier(norm_first, classes=5, pool="mean")


@pytest.fixture(scope="module", params=[True, False], ids=["pre-LN", "post-LN"])
def encoder(request, tmp_path_factory):
    torch.manual_seed(0)
    model = EncoderClassifier(request.param).eval()
    q = pyqsim.quantize(model, torch.randn(32, 10, 8, generator=torch.Generator().manual_seed(0)),
                        w_bits=8, a_bits=8)
    return q, _export(q, tmp_path_factory, "encoder")


def test_transformer_encoder_integer_program(encoder):
    q, path = encoder
    x = torch.randn(64, 10, 8, generator=torch.Generator().manual_seed(1))
    (yc,), (yr,), _ = run_both(pyqsim.load(path), x.numpy())
    assert same_bits(yc, yr)
    fake = q(x).numpy()
    assert (yc.argmax(1) == fake.argmax(1)).mean() >= AGREE_MIN
    assert cosines(yc, fake).min() >= COS_MIN


def test_transformer_encoder_cli(encoder, capsys, tmp_path):
    cli_checks(capsys, encoder[1], tmp_path)


# --------------------------------------------------------------------------- 4. a user CNN with residual adds

class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)
        self.c2, self.b2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                        torch.nn.ReLU())
        self.b1, self.pool, self.b2 = Block(16), torch.nn.MaxPool2d(2), Block(16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.b2(self.pool(self.b1(self.stem(x))))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    model = ResCNN().eval()
    with torch.no_grad():  # non-trivial running statistics, as a trained network has
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    calib = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    q = pyqsim.quantize(model, calib, w_bits=8, a_bits=8, require_patterns=False)
    return q, _export(q, tmp_path_factory, "cnn")


def test_cnn_integer_program(cnn):
    q, path = cnn
    prog = pyqsim.load(path)
    kinds = prog.describe()["kinds"]
    assert kinds["int_conv2d"] == 5 and "batch_norm" not in kinds  # every BatchNorm folded into its conv
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    (yc,), (yr,), _ = run_both(prog, x.numpy())
    assert same_bits(yc, yr)
    fake = q(x).numpy()
    assert (yc.argmax(1) == fake.argmax(1)).mean() >= AGREE_MIN
    assert cosines(yc, fake).min() >= COS_MIN


def test_cnn_cli(cnn, capsys, tmp_path):
    cli_checks(capsys, cnn[1], tmp_path)


def test_cnn_without_patterns_is_refused_by_default():
    from pyqsim.calib.repqvit import PatternError
    with pytest.raises(PatternError, match="no softmax attention pattern"):
        pyqsim.quantize(ResCNN().eval(), torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("op, kw", [
    ("max", dict(kernel_size=2)), ("max", dict(kernel_size=3, stride=2, padding=1)),
    ("max", dict(kernel_size=3, stride=2, ceil_mode=True)), ("avg", dict(kernel_size=2)),
    ("avg", dict(kernel_size=3, stride=2, padding=1)), ("avg", dict(kernel_size=3, stride=2, padding=1,
                                                                     count_include_pad=False)),
    ("avg", dict(kernel_size=3, stride=2, ceil_mode=True)), ("avg", dict(kernel_size=2, divisor_override=3))])
def test_pool2d_kind_matches_torch(op, kw):
    from pyqsim.program import KINDS
    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    ref = (torch.nn.functional.max_pool2d if op == "max" else torch.nn.functional.avg_pool2d)(x, **kw).numpy()
    k = kw["kernel_size"]
    attrs = {"op": op, "kernel": [k, k], "stride": [kw.get("stride", k)] * 2, "padding": [kw.get("padding", 0)] * 2,
             "ceil_mode": kw.get("ceil_mode", False), "count_include_pad": kw.get("count_include_pad", True),
             "divisor": kw.get("divisor_override")}
    got = KINDS["pool2d"].run([x.numpy()], attrs, {}, None)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_unfolded_batch_norm_lowers_to_its_kind(tmp_path):
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1)).eval()
    with torch.no_grad():
        model[0].running_mean.uniform_(-1, 1)
        model[0].running_var.uniform_(0.5, 2)
    x = torch.randn(8, 4, 5, 5)
    q = pyqsim.quantize(model, x, w_bits=8, a_bits=8, require_patterns=False)
    q.export(tmp_path / "bn.safetensors")
    prog = pyqsim.load(tmp_path / "bn.safetensors")
    assert prog.describe()["kinds"]["batch_norm"] == 1
    assert cosines(prog.run(x.numpy()), q(x).numpy()).min() >= COS_MIN


# --------------------------------------------------------------------------- 5. diffusers UNet2DModel + DDIM

@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    from pyqsim.calib.qdiffusion import generate_calibration_data
    from pyqsim.models.ddim import DDIMSampler
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                  layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    cali = generate_calibration_data(model, DDIMSampler(steps=4), cali_n=4, cali_st=4, shape=(3, 8, 8))
    q = pyqsim.quantize(model, cali, method="qdiffusion", w_bits=8, a_bits=8, weight_iters=0, act_iters=0,
                        init_samples=16)
    return q, _export(q, tmp_path_factory, "unet")


def test_unet_ddim_sampling_on_the_program(unet):
    diffusers = pytest.importorskip("diffusers")
    q, path = unet
    prog = pyqsim.load(path)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(5)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    cos = []
    for i, t in enumerate(sched.timesteps):
        tt = np.full(2, int(t), np.int64)
        if i == 0:
            (eps,), (eps_ref,), _ = run_both(prog, x, tt)
            assert same_bits(eps, eps_ref)
        else:
            eps = prog.run(x, tt)
        cos.append(cosines(eps, q(torch.from_numpy(x), torch.from_numpy(tt)).numpy()))
        x = sched.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
    assert x.shape == (2, 3, 8, 8) and np.isfinite(x).all()
    assert np.min(cos) >= 0.99 and np.mean(cos) >= 0.999


def test_unet_cli(unet, capsys, tmp_path):
    cli_checks(capsys, unet[1], tmp_path)


# --------------------------------------------------------------------------- 6. DDPM CIFAR-10 UNet: size and cost

DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                          "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)


def _layer_macs(model, x, t) -> int:
    """MACs of every Conv2d and Linear of the float model on one sample, counted by forward hooks."""
    total = [0]

    def hook(mod, args, out):
        if isinstance(mod, torch.nn.Conv2d):
            total[0] += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total[0] += out[0].numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x[:1], t[:1])
    for h in hs:
        h.remove()
    return total[0]


def _attention_macs(cfg) -> int:
    """q k^T and attn v of every attention block, from the config: 2 L^2 C per block at its resolution."""
    res, ch = cfg["sample_size"], cfg["block_out_channels"]
    n_levels, lpb, total = len(ch), cfg["layers_per_block"], 0
    for i, kind in enumerate(cfg["down_block_types"]):
        r = res // 2 ** i
        if kind.startswith("Attn"):
            total += lpb * 2 * (r * r) ** 2 * ch[i]
    r_mid = res // 2 ** (n_levels - 1)
    total += 2 * (r_mid * r_mid) ** 2 * ch[-1]  # the mid block's attention
    for i, kind in enumerate(cfg["up_block_types"]):
        r = r_mid * 2 ** i
        if kind.startswith("Attn"):
            total += (lpb + 1) * 2 * (r * r) ** 2 * ch[n_levels - 1 - i]
    return total


def test_ddpm_cifar10_cost_counts_attention(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    from pyqsim.calib.qdiffusion import QDiffConfig, calibrate, generate_calibration_data
    from pyqsim.models.ddim import DDIMSampler
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**DDPM_CIFAR10).eval()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307  # DDPM's "35.7M"
    cali = generate_calibration_data(model, DDIMSampler(steps=2), cali_n=1, cali_st=2, shape=(3, 32, 32))
    q = calibrate(model, cali, QDiffConfig(w_bits=8, a_bits=8, method="linear", init_samples=2))
    path = tmp_path / "ddpm.safetensors"
    q.export(path)
    rc = main(["cost", str(path), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0
    x, t = torch.from_numpy(cali["x"][:1]), torch.from_numpy(cali["t"][:1])
    layers, attention = _layer_macs(model, x, t), _attention_macs(DDPM_CIFAR10)
    assert attention == 167_903_232  # ~0.17 G: 5 blocks at 16x16 (L=256, C=256) + the 4x4 mid block
    assert round(layers / 1e9, 2) == 6.05
    assert res["total"]["macs"] == layers + attention
    assert sum(l["macs"] for l in res["layers"] if l["op"] in ("sdpa", "int_bmm", "log2_attn_matmul")) == attention


# --------------------------------------------------------------------------- 8. torch-free load and run

def test_exported_program_runs_without_torch(cnn, tmp_path):
    _, path = cnn
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32))
    code = ("import sys, numpy as np, pyqsim; "
            f"y = pyqsim.load({str(path)!r}).run(np.load({str(tmp_path / 'x.npy')!r}), backend='auto'); "
            "assert y.shape == (3, 10) and np.isfinite(y).all(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
