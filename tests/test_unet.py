"""UNet architecture, DDIM sampler, float NumPy stages of the integer runner, cost and FID helpers.

Tolerance policy: float32 NumPy stages are compared with torch at rtol/atol 1e-5 (same formulas, different
summation order); the DDIM sampler with an exact eps oracle must return x0 to 1e-4 (float32 rounding over
<= 50 steps); parameter counts and sizes are exact.
"""
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqsim.models.ddim import DDIMSampler, ddim_timesteps
from pyqsim.program import KINDS
from pyqsim.program.kinds import conv2d_f32


@given(steps=st.integers(2, 50), skip=st.sampled_from(["uniform", "quadratic"]), eta=st.sampled_from([0.0, 0.5]))
@settings(max_examples=20)
def test_ddim_recovers_x0_with_exact_eps(steps, skip, eta):
    rng = np.random.default_rng(steps)
    x0 = rng.uniform(-1, 1, (3, 1, 4, 4)).astype(np.float32)
    s = DDIMSampler(steps=steps, eta=eta, skip=skip)
    a = s.alphas_cumprod

    def eps(x, t):  # the exact noise for this x0
        at = a[t[0]]
        return ((x - np.sqrt(at) * x0) / np.sqrt(1 - at)).astype(np.float32)

    out = s.sample(eps, x0.shape, seed=1)
    np.testing.assert_allclose(out, x0, atol=1e-4 if eta == 0 else 2e-3)


def test_ddim_timesteps():
    assert list(ddim_timesteps(4, 1000, "uniform")) == [0, 250, 500, 750]
    q = ddim_timesteps(10, 1000, "quadratic")
    assert q[0] == 0 and len(q) == 10 and np.all(np.diff(q) > 0) and q[-1] <= 800
    with pytest.raises(ValueError):
        ddim_timesteps(4, 1000, "cubic")


def _kind(name, args, **attrs):
    from pyqsim.program.program import _Ctx
    return KINDS[name].run(args, attrs, {}, _Ctx("auto", {}))


def test_float_stages_match_torch():
    """Program float kinds vs PyTorch (tolerance: float32 rounding of a few ops, 1e-5 relative)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    g, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    ref = F.group_norm(torch.from_numpy(x), 4, torch.from_numpy(g), torch.from_numpy(b), eps=1e-6).numpy()
    np.testing.assert_allclose(_kind("group_norm", [x, 4, g, b], eps=1e-6), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_kind("silu", [x]), F.silu(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    w = rng.standard_normal((3, 8, 3, 3)).astype(np.float32)
    for stride, pad in [(1, 1), (2, 0)]:
        ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b[:3]), stride, pad).numpy()
        got = conv2d_f32(x, w, b[:3], (stride, stride), (pad, pad), (1, 1), 1)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_ddpm_cifar10_config_size():
    pytest.importorskip("torch")
    from pyqsim.eval.cost import count_params, summarize
    from pyqsim.models.unet import ddpm_cifar10_unet
    m = ddpm_cifar10_unet()
    n = count_params(m)
    assert n == 35_746_307  # DDPM's "35.7M"
    sizes = [round(summarize([], n, b)["size_mb"], 1) for b in (32, 8, 4)]
    assert sizes == [143.0, 35.7, 17.9]  # paper: 143.2 / 35.8 / 17.9 (see docs/qdiffusion.md)


def test_digits_unet_shapes_and_split_protocol():
    torch = pytest.importorskip("torch")
    from pyqsim.models.unet import DIGITS_CONFIG, UNet
    m = UNet(DIGITS_CONFIG).eval()
    y = m(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999]))
    assert y.shape == (2, 1, 8, 8)
    split = {n: mod.qsplit for n, mod in m.named_modules() if hasattr(mod, "qsplit")}
    up_blocks = [n for n, _ in m.named_modules() if re.fullmatch(r"up\.\d+\.block\.\d+", n)]
    assert len(split) == 2 * len(up_blocks) > 0
    assert all(n.startswith("up.") and n.endswith(("conv1", "nin_shortcut")) for n in split)


def test_discover_splits_marks_concat_consumers():
    torch = pytest.importorskip("torch")
    from pyqsim.calib.qdiffusion import discover_splits

    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv_shortcut = torch.nn.Conv2d(6, 4, 3, padding=1), torch.nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.conv1(torch.relu(x)) + self.conv_shortcut(x)

    class Up(torch.nn.Module):  # the diffusers up-block pattern: cat outside the resnet
        def __init__(self):
            super().__init__()
            self.inp, self.res = torch.nn.Conv2d(1, 4, 1), Res()

        def forward(self, x):
            h = self.inp(x)
            return self.res(torch.cat([h, x.repeat(1, 2, 1, 1)], dim=1))

    m = Up()
    assert discover_splits(m, torch.zeros(1, 1, 4, 4)) == 2
    assert m.res.conv1.qsplit == 4 and m.res.conv_shortcut.qsplit == 4 and not hasattr(m.inp, "qsplit")


def test_fid_and_is():
    from pyqsim.eval.fid import fid, frechet_distance, inception_score
    from pyqsim.models.digits_classifier import load_digits_classifier, real_digits
    clf = load_digits_classifier()
    real = real_digits()
    assert clf.meta["test_accuracy"] > 0.95
    assert abs(fid(real, clf=clf)) < 1e-4  # identical sets: 0 up to the eigen-solver rounding
    assert fid(np.zeros_like(real[:500]) - 1, clf=clf) > 10 * fid(real[::2], clf=clf)
    assert 8.0 < inception_score(real, clf=clf) <= 10.0
    c = np.diag([1.0, 2.0])
    assert abs(frechet_distance(np.zeros(2), c, np.ones(2), c) - 2.0) < 1e-9


def test_integer_runtime_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, pyqsim.program, pyqsim.runtime.cost, pyqsim.eval.fid; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
