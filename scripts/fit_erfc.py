"""Derive the float32 coefficients of the erfc approximation of docs/spec.md §15.3 (prints them as hex).

    python scripts/fit_erfc.py          (needs mpmath; a few seconds)

Model: erfc(u) = t * exp(P(t - 1/2) - u*u) with t = 1 / (1 + u/2), P a degree-10 polynomial, fitted on
u in [0, 10.5] (t in [0.16, 1]) to g(t) = log(erfc(u) / t) + u*u, the log of the relative error being the
error in g. Lawson-weighted least squares on Chebyshev nodes approaches the minimax fit; coefficients are
rounded to float32 one at a time, lowest degree first, refitting the others after each rounding so the
rounded polynomial stays close to minimax.
"""
from __future__ import annotations

import mpmath as mp
import numpy as np

DEGREE, U_MAX, CENTER, NODES = 10, 10.5, 0.5, 3000


def target(t: float) -> float:
    u = 2 * (1 / mp.mpf(t) - 1)
    return float(mp.log(mp.erfc(u) / t) + u * u)


def fit() -> np.ndarray:
    mp.mp.dps = 40
    t_lo = 1 / (1 + U_MAX / 2)
    k = np.arange(NODES)
    t = ((np.cos(np.pi * (k + 0.5) / NODES) + 1) / 2 * (1 - t_lo) + t_lo).astype(np.float32).astype(np.float64)
    g = np.array([target(v) for v in t])
    v = (t.astype(np.float32) - np.float32(CENTER)).astype(np.float64)
    basis = np.vander(v, DEGREE + 1, increasing=True)
    fixed: list[float] = []
    for j in range(DEGREE + 1):
        rest = g - sum(c * v**i for i, c in enumerate(fixed))
        cols = basis[:, j:]
        w = np.ones(NODES)
        for _ in range(20):
            c, *_ = np.linalg.lstsq(cols * np.sqrt(w)[:, None], rest * np.sqrt(w), rcond=None)
            w *= np.abs(cols @ c - rest) + 1e-30
            w /= w.sum()
        fixed.append(float(np.float32(c[0])))
    coef = np.array(fixed, np.float32)
    p = np.full(v.shape, coef[-1], np.float32)
    for c in coef[-2::-1]:
        p = p * v.astype(np.float32) + c
    print(f"max |P - g| in float32 Horner: {np.abs(p.astype(np.float64) - g).max():.3g}")
    return coef


if __name__ == "__main__":
    for i, c in enumerate(fit()):
        print(f"c{i} = {float(c).hex()}  ({c!r})")
