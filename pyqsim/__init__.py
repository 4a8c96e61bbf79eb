"""pyqsim: bit-accurate integer simulation and kernels for quantized neural networks."""
from ._version import __version__
from . import ops
from .ops import available_backends, build_info

__all__ = ["__version__", "ops", "build_info", "available_backends"]
