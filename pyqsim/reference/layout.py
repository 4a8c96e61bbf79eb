"""Layout stages (spec §15.10): concatenation and nearest-neighbour resampling; copies, no arithmetic."""
from __future__ import annotations

import numpy as np


def concat(xs, axis: int) -> np.ndarray:
    """The arrays (one dtype) joined along ``axis``."""
    return np.concatenate(xs, axis=axis)


def resample_nearest(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``x[..., rows[i], cols[j]]`` over the last two axes."""
    return np.take(np.take(x, rows, axis=-2), cols, axis=-1)
