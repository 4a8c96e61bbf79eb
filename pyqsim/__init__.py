"""pyqsim: bit-accurate integer simulation and kernels for quantized neural networks."""
from ._version import __version__
from . import ops
from .ops import available_backends, build_info

__all__ = ["__version__", "ops", "build_info", "available_backends", "quantize", "load"]


def load(path):
    """The integer program in file ``path``: ``.run(*inputs, backend=...)``, ``.describe()``, ``.example_inputs()``."""
    from .program import load as _load
    return _load(path)


def quantize(model, calib, method: str = "repq-vit", w_bits: int | None = None, a_bits: int | None = None,
             **options):
    """Calibrate ``model`` (any torch.nn.Module torch.export can capture); returns a fake-quant model, callable
    like the original, with ``.export(path)`` writing its integer program.

    ``method="repq-vit"``: ``calib`` is what the model takes (a tensor, a tuple of tensors or a dict of keyword
    tensors), batched on dim 0; defaults W4A4. ``method="qdiffusion"``: ``calib`` is the timestep-aware set of
    :func:`pyqsim.calib.qdiffusion.generate_calibration_data` for an ``eps = model(x, t)`` model; defaults W4A8.
    ``method="linear"``: the min-max baseline of the Q-Diffusion paper on the same set. ``options`` are the fields
    of RepQConfig / QDiffConfig.
    """
    from .calib import quantize as _quantize
    return _quantize(model, calib, method, w_bits, a_bits, **options)
