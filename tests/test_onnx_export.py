"""ONNX export of programs (pyqsim/program/onnx_export.py) against ONNX Runtime.

Tolerance policy: none. The exported integer nodes (MatMulInteger / ConvInteger with int32 zero-point corrections,
Cast, Mul) compute pyqsim's float32 output stage exactly; QuantizeLinear is the onnxruntime profile's quantize
(spec §14.4, equal to pyqsim's); Relu, Add, MaxPool and the layout operators are exact. So the program's outputs and
ONNX Runtime's are compared with ``==`` on their float32 bit patterns. (Average pooling happens to match here; its
summation order is not part of any contract.)
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.needs_torch, pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx and onnxruntime are not installed (pip install -e '.[test]')")]

import pyqsim  # noqa: E402
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
