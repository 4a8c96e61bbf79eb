"""Runtime: program files and the one interpreter that runs them (no PyTorch needed).

:func:`load` returns a :class:`pyqsim.program.Program`, which offers ``run(*inputs, backend=...)``,
``example_inputs()`` and ``describe()`` for any model that was lowered (docs/program.md).
"""
from __future__ import annotations

from .paramfile import ParamFileError, load_params, save_params

__all__ = ["load", "load_params", "save_params", "ParamFileError"]


def load(path):
    """The program stored in ``path`` (validated whole at load; ParamFileError names the defect)."""
    from ..program import load as _load
    return _load(path)
