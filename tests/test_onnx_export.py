"""ONNX export of programs (pyqsim/program/onnx_export.py) against ONNX Runtime.

Tolerance policy: none. The exported integer nodes (MatMulInteger / ConvInteger with int32 zero-point corrections,
Cast, Mul) compute pyqsim's float32 output stage exactly; QuantizeLinear is the onnxruntime profile's quantize
(spec §14.4, equal to pyqsim's); Relu, Add, MaxPool and the layout operators are exact. So the program's outputs and
ONNX Runtime's are compared with ``==`` on their float32 bit patterns. (Average pooling happens to match here; its
summation order is not part of any contract.) The float stages (softmax, layer_norm, group_norm, gelu, silu) are
exported as spec §15's steps in correctly rounded primitive operators (spec §14.7), so they too are compared with
``==``, NaN bits included.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.needs_torch, pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx and onnxruntime are not installed (pip install -e '.[test]')")]

import pyqsim  # noqa: E402
import strategies as S  # noqa: E402
from pyqsim.cli import main  # noqa: E402
from pyqsim.program.onnx_export import OnnxExportError  # noqa: E402


class CNN(torch.nn.Module):
    """conv-BN-ReLU, a depthwise conv (grouped, per-channel weight zero points), a residual add, max pooling,
    global average pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                        torch.nn.ReLU())
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = torch.nn.Conv2d(16, 16, 1)
        self.pool = torch.nn.MaxPool2d(2)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.pw(torch.relu(self.dw(x))))
        x = self.pool(x)
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def cnn_program(tmp_path_factory):
    torch.manual_seed(0)
    model = CNN().eval()
    with torch.no_grad():
        bn = model.stem[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    calib = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    q = pyqsim.quantize(model, calib, w_bits=8, a_bits=8, require_patterns=False)
    path = tmp_path_factory.mktemp("onnx") / "cnn.safetensors"
    q.export(path)
    return pyqsim.load(path), path


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_w8a8_cnn_equals_onnxruntime_bit_for_bit(cnn_program, tmp_path, backend):
    import onnxruntime as ort
    program, _ = cnn_program
    assert program.describe()["kinds"]["int_conv2d"] == 3
    onnx_path = tmp_path / "cnn.onnx"
    program.to_onnx(onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for n, scale in ((1, 1.0), (5, 3.0), (17, 0.2)):  # batch sizes and input ranges, saturating codes included
        x = (rng.standard_normal((n, 3, 16, 16)) * scale).astype(np.float32)
        want = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        got = program.run(x, backend=backend, numerics="onnxruntime")
        assert np.array_equal(_bits(got), _bits(want)), (n, float(np.abs(got - want).max()))
        assert np.array_equal(_bits(program.run(x, backend=backend)), _bits(got))  # float-out nodes: same bits


@pytest.fixture(scope="module")
def vit_program(tmp_path_factory):
    """The bundled digits ViT, RepQ-ViT W8A8 with uniform post-softmax codes (attn @ v as int_bmm)."""
    from pyqsim.calib.repqvit import RepQConfig, calibrate, calibration_batch
    from pyqsim.models.vit import digits_split, digits_vit
    x_tr, _, x_te, _ = digits_split()
    res = calibrate(digits_vit(), calibration_batch(torch.from_numpy(x_tr), 8, 0),
                    RepQConfig(8, 8, softmax="uniform"))
    path = tmp_path_factory.mktemp("onnx") / "vit.safetensors"
    res.export(path)
    return pyqsim.load(path), path, x_te


@pytest.fixture(scope="module")
def hf_vit_program():
    """A Hugging Face ViTForImageClassification (2 layers, hidden 64, random weights), W8A8, uniform attention codes."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=10)
    model = transformers.ViTForImageClassification(cfg).eval()
    q = pyqsim.quantize(model, torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)), w_bits=8,
                        a_bits=8, softmax="uniform")
    return q.lower()


def _encoder_equals_onnxruntime(program, tmp_path, level, feeds):
    import onnx
    import onnxruntime as ort
    onnx_path = tmp_path / "encoder.onnx"
    program.to_onnx(onnx_path)
    ops_used = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert not ops_used & {"Softmax", "Erf", "Exp", "ReduceSum", "ReduceMean", "LayerNormalization"}
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    for feed in feeds:
        want = sess.run(None, feed)
        for b in pyqsim.ops.available_backends():
            got = program.run(backend=b, numerics="onnxruntime", **feed)
            for g, w in zip(got if isinstance(got, tuple) else (got,), want, strict=True):
                assert np.array_equal(_bits(g), _bits(w)), (b, int(np.count_nonzero(_bits(g) != _bits(w))))


LEVELS = ["ORT_ENABLE_ALL", "ORT_DISABLE_ALL"]


@pytest.mark.parametrize("level", LEVELS)
def test_w8a8_vit_encoder_equals_onnxruntime_bit_for_bit(vit_program, tmp_path, level):
    program, _, x_te = vit_program
    kinds = program.describe()["kinds"]
    assert kinds["int_bmm"] == 8 and "log2_attn_matmul" not in kinds
    assert kinds["softmax"] == 4 and kinds["layer_norm"] == 9 and kinds["gelu"] == 4
    noise = (np.random.default_rng(3).standard_normal((5, 1, 8, 8)) * 4).astype(np.float32)  # saturating codes
    _encoder_equals_onnxruntime(program, tmp_path, level, [{"x": x} for x in (x_te[:1], x_te[:64], noise)])


@pytest.mark.parametrize("level", LEVELS)
def test_hugging_face_vit_equals_onnxruntime_bit_for_bit(hf_vit_program, tmp_path, level):
    kinds = hf_vit_program.describe()["kinds"]
    assert kinds["int_bmm"] == 4 and kinds["softmax"] == 2 and kinds["size"] == 1 and kinds["where"] == 2
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    _encoder_equals_onnxruntime(hf_vit_program, tmp_path, level, [{"pixel_values": v} for v in (x[:1], x, x * 8)])


def _bert_feed(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, length * 3 // 4:] = 0  # padded keys
    return {"input_ids": torch.randint(0, 100, (n, length), generator=g).numpy(), "attention_mask": mask.numpy()}


@pytest.fixture(scope="module")
def hf_bert_program():
    """A Hugging Face BertModel without the pooler (its tanh is ONNX Runtime's own kernel), 2 layers, hidden 64,
    random weights, W8A8, uniform attention codes, sequence length 16."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    calib = {k: torch.from_numpy(v) for k, v in _bert_feed(16, 16, 0).items()}
    return pyqsim.quantize(model, calib, w_bits=8, a_bits=8, softmax="uniform").lower()


@pytest.mark.parametrize("level", LEVELS)
def test_hugging_face_bert_equals_onnxruntime_bit_for_bit(hf_bert_program, tmp_path, level):
    kinds = hf_bert_program.describe()["kinds"]
    assert kinds["int_bmm"] == 4 and kinds["embedding"] == 3 and kinds["index"] == 1
    _encoder_equals_onnxruntime(hf_bert_program, tmp_path, level, [_bert_feed(n, 16, s) for n, s in ((1, 1), (9, 2))])


def test_cli_verifies_the_exported_vit_against_onnxruntime(vit_program, capsys):
    _, path, _ = vit_program
    assert main(["verify", str(path), "--against", "onnxruntime", "--n", "4"]) == 0
    assert "OK: equal to ONNX Runtime bit for bit" in capsys.readouterr().out


def test_nodes_without_an_onnx_form_are_named(tmp_path):
    from pyqsim.calib.repqvit import RepQConfig, calibrate, calibration_batch
    from pyqsim.models.vit import digits_split, digits_vit
    x_tr = digits_split()[0]
    res = calibrate(digits_vit(), calibration_batch(torch.from_numpy(x_tr), 8, 0), RepQConfig(4, 4))
    with pytest.raises(OnnxExportError, match=r"node '.+' \(.+\)"):
        res.lower().to_onnx(tmp_path / "vit.onnx")
    assert not (tmp_path / "vit.onnx").exists()


def test_four_bit_weights_are_refused_with_the_reason(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    q = pyqsim.quantize(model, torch.randn(16, 8), w_bits=4, a_bits=8, require_patterns=False)
    with pytest.raises(OnnxExportError, match="8-bit"):
        q.lower().to_onnx()


def test_cli_export_and_verify_against_onnxruntime(cnn_program, tmp_path, capsys):
    _, path = cnn_program
    out = tmp_path / "m.onnx"
    assert main(["export", str(path), "--format", "onnx", "--out", str(out)]) == 0 and out.stat().st_size > 0
    capsys.readouterr()
    assert main(["verify", str(path), "--against", "onnxruntime", "--n", "3"]) == 0
    assert "OK: equal to ONNX Runtime bit for bit" in capsys.readouterr().out


# --------------------------------------------------------------------------- float stages (spec §15 / §14.7)
# Each stage alone, exported and run by ONNX Runtime, against the op on every backend, compared with == on the
# bits. One ORT session per shape family (creating one is slow), fed the drawn rows.

EDGE = S.FLOAT_EDGES
ROW_LENGTHS = (1, 17, 32, 33, 77)   # one block and a tail, a whole block, a block + 1, three blocks
EPS = (0.0, 1e-5, 1.0)
GROUPS = ((4, 9, 2), (6, 1, 3), (8, 5, 1))  # (channels, spatial, groups)


def _stage_session(kind, args, attrs, inputs):
    """An ORT session on the export of a one-node program ``kind(x, *args)``; inputs: (name, shape, example)."""
    import onnxruntime as ort
    from pyqsim.program import Program
    prog = {"inputs": [{"name": n, "dtype": "float32", "shape": list(s)} for n, s, _ in inputs],
            "nodes": [{"name": "y", "kind": kind, "args": [{"@": "x"}] + list(args), "attrs": attrs}],
            "outputs": [{"name": "out", "value": {"@": "y"}}],
            "examples": {n: f"examples.{n}" for n, _, _ in inputs}}
    program = Program({f"examples.{n}": e for n, _, e in inputs}, {"program": prog})
    return ort.InferenceSession(program.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])


_SESSIONS: dict = {}


def _session(key, make):
    if key not in _SESSIONS:
        _SESSIONS[key] = make()
    return _SESSIONS[key]


def _equal_on_every_backend(want, op, *args, **kw):
    for b in pyqsim.ops.available_backends():
        got = getattr(pyqsim.ops, op)(*args, **kw, backend=b)
        assert np.array_equal(_bits(got), _bits(want)), (op, b, args, got, want)


@st.composite
def _softmax_rows(draw):
    x = draw(S.float32_arrays((draw(st.integers(1, 8)), draw(st.sampled_from(ROW_LENGTHS)))))
    masked = draw(hnp.arrays(np.bool_, x.shape))  # attention masks: some entries, some whole rows -inf
    x[masked] = -np.inf
    return x


@given(x=_softmax_rows())
@example(x=np.full((2, 33), -np.inf, np.float32))
@example(x=np.array([[np.nan, 1.0] * 16 + [0.0], [np.inf, 1.0] * 16 + [0.0], [-np.inf, 0.0] * 16 + [5.0]],
                    np.float32))
@example(x=np.array([EDGE + [0.0] * 3], np.float32))
@example(x=np.array([[1e-45, -0.0, 0.0, 3e38, -3e38]], np.float32).repeat(7, axis=1)[:, :17])
@example(x=np.array([[0.0] + [-100.0] * 31, [88.0] * 32], np.float32))  # subnormal results, ties
def test_exported_softmax_equals_onnxruntime(x):
    sess = _session(("softmax", x.shape[1]), lambda: _stage_session(
        "softmax", [-1], {}, [("x", [None, x.shape[1]], np.zeros((1, x.shape[1]), np.float32))]))
    _equal_on_every_backend(sess.run(None, {"x": x})[0], "softmax", x)


@given(data=st.data(), length=st.sampled_from(ROW_LENGTHS[:3] + (64,)), eps=st.sampled_from(EPS),
       affine=st.booleans())
@example(data=None, length=1, eps=0.0, affine=False)  # a constant row with eps = 0: 0 * inf = NaN
@example(data=None, length=64, eps=1e-5, affine=False)
def test_exported_layer_norm_equals_onnxruntime(data, length, eps, affine):
    if data is None:
        x, w, b = np.array([[3e38, -3e38] * 32, [0.0] * 64, [-0.0] * 64], np.float32)[:, :length], None, None
    else:
        x = data.draw(S.float32_arrays((data.draw(st.integers(1, 6)), length)))
        w, b = (data.draw(S.float32_arrays((length,))), data.draw(S.float32_arrays((length,)))) if affine else (None, None)
    vec = [("w", [length], np.ones(length, np.float32)), ("b", [length], np.zeros(length, np.float32))]
    sess = _session(("layer_norm", length, eps, affine), lambda: _stage_session(
        "layer_norm", [[length]] + ([{"@": "w"}, {"@": "b"}] if affine else []), {"eps": eps},
        [("x", [None, length], np.zeros((1, length), np.float32))] + (vec if affine else [])))
    feed = {"x": x, **({"w": w, "b": b} if affine else {})}
    _equal_on_every_backend(sess.run(None, feed)[0], "layer_norm", x, w, b, eps)


@given(data=st.data(), shape=st.sampled_from(GROUPS), affine=st.booleans())
@example(data=None, shape=GROUPS[1], affine=False)
def test_exported_group_norm_equals_onnxruntime(data, shape, affine):
    c, s, g = shape
    if data is None:
        x, w, b = np.ones((1, c, s), np.float32), None, None
    else:
        x = data.draw(S.float32_arrays((data.draw(st.integers(1, 3)), c, s)))
        w, b = (data.draw(S.float32_arrays((c,))), data.draw(S.float32_arrays((c,)))) if affine else (None, None)
    vec = [("w", [c], np.ones(c, np.float32)), ("b", [c], np.zeros(c, np.float32))]
    sess = _session(("group_norm", shape, affine), lambda: _stage_session(
        "group_norm", [g] + ([{"@": "w"}, {"@": "b"}] if affine else []), {},
        [("x", [None, c, s], np.zeros((1, c, s), np.float32))] + (vec if affine else [])))
    feed = {"x": x, **({"w": w, "b": b} if affine else {})}
    _equal_on_every_backend(sess.run(None, feed)[0], "group_norm", x, g, w, b)


ELEMENTWISE = (("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"}), ("silu", {}))


@given(x=st.integers(1, 5).flatmap(lambda n: S.float32_arrays((n, 40))), stage=st.sampled_from(ELEMENTWISE))
@example(x=np.array([EDGE], np.float32), stage=ELEMENTWISE[0])
@example(x=np.array([EDGE], np.float32), stage=ELEMENTWISE[1])
@example(x=np.array([EDGE], np.float32), stage=ELEMENTWISE[2])
@example(x=np.linspace(-20, 20, 101).astype(np.float32)[None], stage=ELEMENTWISE[0])
def test_exported_gelu_silu_equal_onnxruntime(x, stage):
    kind, attrs = stage
    sess = _session(stage[0] + str(attrs), lambda: _stage_session(kind, [], attrs, [("x", [None, None], np.zeros((1, 1), np.float32))]))
    want = sess.run(None, {"x": x})[0]
    _equal_on_every_backend(want, kind, x, *attrs.values())


def test_a_float_stage_needs_example_inputs():
    from pyqsim.program import Program
    prog = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, 8]}],
            "nodes": [{"name": "y", "kind": "softmax", "args": [{"@": "x"}, -1]}],
            "outputs": [{"name": "out", "value": {"@": "y"}}]}
    with pytest.raises(OnnxExportError, match=r"node 'y' \(softmax\).*example inputs"):
        Program({}, {"program": prog}).to_onnx()
