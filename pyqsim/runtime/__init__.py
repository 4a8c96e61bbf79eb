"""Runtime: integer-parameter files and the integer executors that run them (no PyTorch needed).

A parameter file's metadata names its model kind (``meta["model"]["kind"]``); :func:`load` returns that
kind's program, which offers ``run(inputs, backend=...)``, ``example_inputs(n)`` and ``describe()``.
"""
from __future__ import annotations

import importlib

from .paramfile import ParamFileError, load_params, save_params

KINDS = {"vit": "pyqsim.runtime.vit", "unet": "pyqsim.runtime.unet"}

__all__ = ["load", "load_params", "save_params", "ParamFileError", "KINDS"]


def load(path):
    """The executable program stored in parameter file ``path``."""
    tensors, meta = load_params(path)
    model = meta.get("model")
    kind = model.get("kind") if isinstance(model, dict) else None
    if kind not in KINDS:
        raise ParamFileError(f"{path}: unknown model kind {kind!r}; this pyqsim runs {sorted(KINDS)}")
    return importlib.import_module(KINDS[kind]).load_program(tensors, meta)
