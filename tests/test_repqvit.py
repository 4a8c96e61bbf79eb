"""RepQ-ViT: scale reparameterization, pattern detection, export round trip and the integer runtime.

Tolerance policy
- Integer results (codes, accumulators, requantized outputs) across backends and across a save/load round
  trip: exact (==). Fake-quantizer codes vs pyqsim.ops quantizers: exact (==).
- Scale reparameterization, in exact rational arithmetic: per-tensor codes of the folded LayerNorm output
  == per-channel codes of the original (the next layer's output is unchanged, ==). The one exception is an
  exact rounding tie x/s = k + 1/2 with an odd r2: round-half-even (spec §2) is not translation invariant,
  round(t + r2) = round(t) + r2 +- 1 there; with round-half-up the equality is unconditional (both tested).
- Program vs fake-quant, one integer node at a time on the same input codes (every node of the exported program
  has a float32 output stage). Both compute the same real number y = sum_k (x_k - zx)(w_nk - zw) s_x s_w + b_int
  s_x s_w up to float32 rounding (u = 2^-24): the fake path rounds each dequantized operand (u each), its bias step
  fl32(s_x s_w) (u) and sums K products in any order (Higham: gamma_K = K u / (1 - K u)); the program's accumulator
  is exact and its output stage fl32(fl32(acc) * fl32(s_x s_w)) rounds three times. To first order
  |y_int - y_fake| <= (K + 6) u * (sum_k |x^_k w^_nk| + |b^_n|); we use TOL(K) = (K + 8) u as the factor. For
  attn @ v add 0.75 * 2^-16 * delta * s_v per log code deeper than 2^-16 in the row (spec §7 per-term rounding).
- End to end, errors cascade through softmax, GELU and later quantizers: top-1 agreement >= 99%.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, strategies as st

torch = pytest.importorskip("torch")

from pyqsim import ops  # noqa: E402
from pyqsim.calib._common import LogQuantizer, UniformQuantizer  # noqa: E402
from pyqsim.calib.repqvit import (  # noqa: E402
    PatternError, RepQConfig, calibrate, calibration_batch, fold_layernorm, fold_linear, reparam_factors)
from pyqsim.models.vit import digits_split, digits_vit  # noqa: E402
from pyqsim.runtime import load as load_program  # noqa: E402
from pyqsim.runtime.paramfile import load_params  # noqa: E402

pytestmark = pytest.mark.needs_torch
N_IMAGES = 24
U = 2.0 ** -24


def tol(k: int) -> float:
    return (k + 8) * U

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one torch thread is fastest (and avoids oversubscribing a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    x_tr, y_tr, x_te, y_te = digits_split()
    return digits_vit(), torch.from_numpy(x_tr), x_te, y_te


@pytest.fixture(scope="module", params=[(4, 4), (6, 6), (8, 8)], ids=lambda b: f"W{b[0]}A{b[1]}")
def calibrated(request, digits, tmp_path_factory):
    model, x_tr, _, _ = digits
    res = calibrate(model, calibration_batch(x_tr, 32, 0), RepQConfig(*request.param))
    path = tmp_path_factory.mktemp("repqvit") / "params.safetensors"
    prog = res.export(path)
    return res, path, prog.tensors, prog.meta


def test_digits_vit_fp32_accuracy(digits):
    model, _, x_te, y_te = digits
    with torch.no_grad():
        assert (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean() >= 0.97


# --------------------------------------------------------------------------- scale reparameterization

def _codes(t, z, qmax, rnd):
    """clamp(rnd(t), -z, qmax - z) + z elementwise on object arrays of Fractions."""
    return np.vectorize(lambda tv, zv: min(max(rnd(tv), -zv), qmax - zv) + zv, otypes=[object])(t, z)


def _half_up(v):
    return math.floor(v + Fraction(1, 2))


def _frac_arrays(data, shape, lo=-4, hi=4, den=16):
    n = int(np.prod(shape))
    vals = data.draw(st.lists(st.fractions(lo, hi, max_denominator=den), min_size=n, max_size=n))
    return np.array(vals, dtype=object).reshape(shape)


@given(data=st.data(), bits=st.integers(2, 8), c=st.integers(1, 5), n=st.integers(1, 4), m=st.integers(1, 3))
def test_reparameterized_codes_equal_per_channel_codes(data, bits, c, n, m):
    qmax = 2 ** bits - 1
    s = np.array(data.draw(st.lists(st.fractions(Fraction(1, 64), 4, max_denominator=64).filter(lambda v: v > 0),
                                    min_size=c, max_size=c)), dtype=object)
    z = np.array(data.draw(st.lists(st.integers(0, qmax), min_size=c, max_size=c)), dtype=object)
    gamma, beta, xhat = _frac_arrays(data, (c,)), _frac_arrays(data, (c,)), _frac_arrays(data, (n, c))
    x = xhat * gamma + beta                               # LayerNorm output
    s_t, z_t, r1, r2 = reparam_factors(s, z)
    assert isinstance(z_t, int) and all(isinstance(v, int) for v in r2)   # mean zero point rounded first
    g2, b2 = fold_layernorm(gamma, beta, s, r1, r2)
    x2 = xhat * g2 + b2                                   # folded LayerNorm output
    assert np.all(x2 / s_t == x / s + r2)                 # the identity behind the equality

    per_channel = _codes(x / s, z, qmax, round)           # Python round: half to even, as spec §2
    per_tensor = _codes(x2 / s_t, np.full(x.shape, z_t, dtype=object), qmax, round)
    tie_odd = np.vectorize(lambda t, r: t - math.floor(t) == Fraction(1, 2) and r % 2 == 1)(x / s, r2 + 0 * x)
    assert np.all(per_channel[~tie_odd] == per_tensor[~tie_odd])
    assert np.all(np.abs(per_channel[tie_odd] - per_tensor[tie_odd]) <= 1)
    assert np.all(_codes(x / s, z, qmax, _half_up) == _codes(x2 / s_t, np.full(x.shape, z_t, dtype=object),
                                                               qmax, _half_up))

    w, b = _frac_arrays(data, (m, c)), _frac_arrays(data, (m,))
    w2, b2l = fold_linear(w, b, s, r1, r2)
    assert np.all(x2 @ w2.T + b2l == x @ w.T + b)         # the next layer sees the same function


def test_reparameterized_codes_equal_in_float32(digits):
    """First post-LN quantizer of the digits ViT: per-tensor codes after folding vs per-channel codes."""
    model, x_tr, x_te, _ = digits
    cal, x = calibration_batch(x_tr, 32, 0), torch.from_numpy(x_te)
    codes = {}
    for mode in ("channel", "reparam"):
        res = calibrate(model, cal, RepQConfig(6, 6, post_ln=mode))
        act = res.model.get_submodule("blocks.0.norm1_act").quant
        h = act.register_forward_hook(lambda mod, args, out, mode=mode: codes.__setitem__(mode, mod.codes(args[0])))
        res(x)
        h.remove()
        assert (act.scale.dim() == 0) == (mode == "reparam")
    differ = int((codes["channel"] != codes["reparam"]).sum())
    assert differ <= 1e-4 * codes["channel"].numel(), differ


# --------------------------------------------------------------------------- fake quantizers follow the spec

@given(x=st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=64), bits=st.integers(2, 8),
       scale=st.floats(2.0 ** -10, 10.0, width=32), zp=st.integers(0, 255))
def test_uniform_fake_quant_codes_equal_ops(x, bits, scale, zp):
    zp = min(zp, 2 ** bits - 1)
    q = UniformQuantizer(bits)
    q.set_params(scale, zp, None)
    xt = torch.tensor(x, dtype=torch.float32)
    want = ops.quantize(xt.numpy(), np.float32(scale), zp, "uint8", bits=bits, backend="reference")
    assert np.array_equal(q.codes(xt).numpy().astype(np.int64), want.astype(np.int64))
    assert np.array_equal(q(xt).numpy(), ops.dequantize(want, np.float32(scale), zp))


@given(p=st.lists(st.floats(0.0, 2.0, width=32), min_size=1, max_size=64), bits=st.integers(2, 8),
       delta=st.floats(2.0 ** -13, 1.0, width=32), mode=st.sampled_from(["log2", "sqrt2"]))
def test_log_fake_quant_codes_equal_ops(p, bits, delta, mode):
    q = LogQuantizer(bits, mode)
    q.delta = torch.tensor(delta, dtype=torch.float32)
    pt = torch.tensor(p, dtype=torch.float32)
    want = ops.quantize_log(pt.numpy(), np.float32(delta), bits, mode)
    assert np.array_equal(q.codes(pt).numpy(), want.astype(np.int64))
    assert np.array_equal(q(pt).numpy(), ops.dequantize_log(want, np.float32(delta), bits, mode))


# --------------------------------------------------------------------------- export and integer runtime

def test_export_round_trip_gives_identical_integers(calibrated, digits):
    res, path, tensors, meta = calibrated
    loaded, meta2 = load_params(path)
    assert set(loaded) == set(tensors) and meta2["program"]["nodes"] == meta["program"]["nodes"]
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v), k
    x = digits[2][:N_IMAGES]
    runs = []
    for prog in (res.lower(), load_program(path)):
        with ops.record() as calls:
            logits = prog.run(x, backend="reference")
        runs.append((logits, calls))
    (l1, c1), (l2, c2) = runs
    assert np.array_equal(l1.view(np.uint32), l2.view(np.uint32))
    assert [(c[0], c[1]) for c in c1] == [(c[0], c[1]) for c in c2]
    assert all(np.array_equal(a[3], b[3]) for a, b in zip(c1, c2))


def test_runtime_runs_without_torch(calibrated, digits, tmp_path):
    """Loading and running a parameter file imports neither torch nor the calibration code."""
    import os
    import subprocess
    import sys

    import pyqsim

    _, path, _, _ = calibrated
    np.save(tmp_path / "x.npy", digits[2][:4])
    code = ("import sys, numpy as np; from pyqsim.runtime import load; "
            f"y = load({str(path)!r}).run(np.load({str(tmp_path / 'x.npy')!r}), backend='reference'); "
            "assert y.shape == (4, 10) and np.isfinite(y).all(); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'pyqsim.calib', 'pyqsim.models'))]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(os.path.dirname(os.path.dirname(pyqsim.__file__))),
                                                       os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_program_matches_fake_quant_node_by_node(calibrated, digits):
    """Every integer node of a reference run against the calibrated module it came from (same input codes)."""
    res, path, _, _ = calibrated
    F = torch.nn.functional
    g = res.model
    f32 = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    with ops.record() as calls:
        load_program(path).run(digits[2][:N_IMAGES], backend="reference")
    seen = set()
    for scope, op, a, out in calls:
        m = g.get_submodule(scope)
        if op in ("int_gemm", "int_conv2d"):
            w, b = m.fake_weight_bias()
            xh = (f32(a.x) - a.x_zero_point) * m.input_quantizer().scale
            if op == "int_gemm":
                fake, mag = F.linear(xh, w, b), F.linear(xh.abs(), w.abs(), b.abs())
                k = a.k
            else:
                fake, mag = F.conv2d(xh, w, b, **m.conv_args), F.conv2d(xh.abs(), w.abs(), b.abs(), **m.conv_args)
                k = w[0].numel()
        elif op == "int_bmm":
            ah = (f32(a.a) - a.a_zero_point) * m.a_quant.scale
            bh = (f32(a.b) - a.b_zero_point) * m.b_quant.scale
            fake, mag, k = ah @ bh.transpose(-2, -1), ah.abs() @ bh.abs().transpose(-2, -1), a.a.shape[-1]
        else:
            assert op == "log2_attn_matmul", op
            c = torch.from_numpy(a.codes.astype(np.int64))
            p = m.p_quant.dequant(c)
            vh = (f32(a.v) - a.v_zero_point) * m.v_quant.scale
            fake, k = p @ vh, c.shape[-1]
            e = -torch.div(-c, m.p_quant.k, rounding_mode="floor")
            deep = ((e > a.frac_bits) & (c != 2 ** a.bits - 1)).sum(-1, keepdim=True)
            mag = p.abs() @ vh.abs() + 0.75 * 2.0 ** -a.frac_bits * float(m.p_quant.delta) * float(m.v_quant.scale) \
                * deep / tol(k)
        bound = tol(k) * mag.numpy().reshape(out.shape)
        diff = np.abs(out - fake.numpy().reshape(out.shape))
        assert np.all(diff <= bound), (scope, float(diff.max()), float(bound[diff > bound].min()))
        seen.add(op)
    assert seen == {"int_conv2d", "int_gemm", "int_bmm", "log2_attn_matmul"}


def test_runner_agrees_with_fake_quant_top1(calibrated, digits):
    res, path, _, _ = calibrated
    x = digits[2][:180]
    fake = res(torch.from_numpy(x)).numpy().argmax(1)
    integer = load_program(path).run(x).argmax(1)
    assert (fake == integer).mean() >= 0.99


@pytest.mark.needs_cpu_ext
def test_cpu_kernels_equal_reference_over_a_run(calibrated, digits):
    _, path, _, _ = calibrated
    with ops.record() as calls:
        load_program(path).run(digits[2][:N_IMAGES], backend="cpu")
    assert calls
    for _, op, args, out in calls:
        assert np.array_equal(ops.run_canonical(op, args, "reference"), out), op


def test_export_rejects_configurations_without_integer_form(digits):
    model, x_tr, _, _ = digits
    for cfg in (RepQConfig(post_ln="channel"), RepQConfig(softmax="log-sqrt2")):
        with pytest.raises(ValueError, match="no integer form"):
            calibrate(model, calibration_batch(x_tr, 8, 0), cfg).export("unused.safetensors")


# --------------------------------------------------------------------------- models from other code

class _EncoderClassifier(torch.nn.Module):
    """Tokens -> torch.nn.TransformerEncoder (nn.MultiheadAttention inside) -> LayerNorm -> head."""

    def __init__(self, norm_first: bool, classes: int = 3, pool: str = "first"):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                                 norm_first=norm_first)
        self.emb = torch.nn.Linear(8, 32)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, classes)
        self.pool = pool  # "first" token or "mean" over tokens

    def forward(self, x):
        h = self.norm(self.enc(self.emb(x)))
        return self.head(h[:, 0] if self.pool == "first" else h.mean(1))


class _BertLayer(torch.nn.Module):
    """BERT-style post-LN layer: separate q/k/v Linears, additive mask, dropout, LayerNorm after the residual."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.dh = h, d // h
        self.query, self.key, self.value = (torch.nn.Linear(d, d) for _ in range(3))
        self.dense, self.ln1 = torch.nn.Linear(d, d), torch.nn.LayerNorm(d)
        self.inter, self.out, self.ln2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d), torch.nn.LayerNorm(d)
        self.drop = torch.nn.Dropout(0.1)

    def split(self, x):
        b, n, _ = x.shape
        return x.view(b, n, self.h, self.dh).permute(0, 2, 1, 3)

    def forward(self, x, mask):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh) + mask
        ctx = torch.matmul(self.drop(torch.nn.functional.softmax(scores, dim=-1)), v)
        ctx = ctx.permute(0, 2, 1, 3).reshape(x.shape)
        x = self.ln1(x + self.drop(self.dense(ctx)))
        return self.ln2(x + self.out(torch.nn.functional.gelu(self.inter(x))))


class _Bert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.ln = torch.nn.Embedding(50, 32), torch.nn.LayerNorm(32)
        self.layers = torch.nn.ModuleList(_BertLayer() for _ in range(2))
        self.pool = torch.nn.Linear(32, 32)

    def forward(self, ids):
        mask = (ids == 0).float()[:, None, None, :] * -10000.0  # padding mask, as BERT's extended mask
        x = self.ln(self.emb(ids))
        for layer in self.layers:
            x = layer(x, mask)
        return torch.tanh(self.pool(x[:, 0]))


def _relative_error(res, model, x):
    with torch.no_grad():
        ref = model(x)
        return float((res(x) - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_torch_transformer_encoder_calibrates(norm_first):
    torch.manual_seed(0)
    model, x = _EncoderClassifier(norm_first).eval(), torch.randn(16, 10, 8)
    res = calibrate(model, x, RepQConfig(8, 8))
    assert len(res.attention) == 2
    assert _relative_error(res, model, x) < 0.15
    if norm_first:
        assert len(res.post_ln) >= 3 and not any(g.shared for g in res.post_ln)
    else:  # post-LN: LayerNorm outputs also feed residuals, so the fold goes into a LayerNorm copy
        assert any(g.shared and g.ln.endswith("_rq") for g in res.post_ln)


def test_bert_style_model_calibrates():
    torch.manual_seed(0)
    model, ids = _Bert().eval(), torch.randint(0, 50, (8, 12))
    res = calibrate(model, ids, RepQConfig(8, 8))
    assert len(res.attention) == 2 and res.post_ln
    assert _relative_error(res, model, ids) < 0.15


def test_scaled_dot_product_attention_is_quantized():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.qkv, self.out = torch.nn.LayerNorm(16), torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.qkv(self.norm(x)).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(x.shape))

    torch.manual_seed(0)
    model, x = M().eval(), torch.randn(4, 6, 16)
    res = calibrate(model, x, RepQConfig(8, 8))
    assert len(res.attention) == 1 and _relative_error(res, model, x) < 0.15


def test_missing_patterns_are_named():
    mlp = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    with pytest.raises(PatternError, match="no softmax attention pattern"):
        calibrate(mlp, torch.randn(2, 3, 4))

    class NoNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return (self.q(x) @ self.k(x).transpose(-2, -1)).softmax(-1) @ x

    with pytest.raises(PatternError, match="no LayerNorm -> Linear pattern"):
        calibrate(NoNorm(), torch.randn(2, 3, 4))

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(PatternError, match="torch.export cannot capture"):
        calibrate(DataDependent(), torch.randn(2, 3, 4))


# --------------------------------------------------------------------------- targets (slow)

@pytest.mark.slow
def test_digits_accuracy_targets(digits, tmp_path):
    from pyqsim.experiments.repqvit_table import run_table

    result = run_table(tmp_path, seeds=5, log=lambda r: None)
    fp = result["fp32_top1"]
    row = {(r["bits"], r["post_ln"], r["softmax"]): r for r in result["rows"]}
    assert row[("W6A6", "reparam", "reparam")]["int_top1"] >= fp - 1.0
    assert row[("W4A4", "reparam", "reparam")]["int_top1"] >= fp - 5.0
    for bits in ("W4A4", "W6A6"):
        rep = row[(bits, "reparam", "reparam")]
        assert rep["fake_top1"] >= row[(bits, "channel", "reparam")]["fake_top1"] - 0.5
        assert rep["agreement"] >= 99.0 and rep["kernel_vs_reference"]["mismatches"] == 0


@pytest.mark.slow
def test_deit_small_calibration_under_three_minutes():
    from pyqsim.calib.repqvit import time_deit_small

    t = time_deit_small(32, RepQConfig(4, 4), threads=2)
    assert t["calibration_seconds"] < 180, t
