"""The program format: a typed graph of node kinds plus tensors, in a safetensors file (docs/program.md).

Every node kind is declared once (:mod:`pyqsim.program.kinds`) with its schema and reference semantics;
a file is validated whole at load. Nothing here imports PyTorch.
"""
from __future__ import annotations

from ..runtime.paramfile import ParamFileError
from .program import Program, load
from .schema import KINDS

__all__ = ["Program", "load", "KINDS", "ParamFileError"]
