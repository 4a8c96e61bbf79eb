"""DDPM noise schedule and DDIM sampler in float32 NumPy (model-agnostic: takes an eps function)."""
from __future__ import annotations

from typing import Callable

import numpy as np

EpsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def linear_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """cumprod(1 - beta_t) for the DDPM linear beta schedule, float64 [T]."""
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def ddim_timesteps(steps: int, num_timesteps: int = 1000, skip: str = "uniform") -> np.ndarray:
    """Increasing timesteps visited by DDIM: ``uniform`` (every T/steps) or ``quadratic`` (DDIM paper)."""
    if skip == "uniform":
        seq = np.arange(0, num_timesteps, max(num_timesteps // steps, 1))[:steps]
    elif skip == "quadratic":
        seq = (np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2).astype(np.int64)
    else:
        raise ValueError(f"skip must be 'uniform' or 'quadratic', got {skip!r}")
    return seq.astype(np.int64)


class DDIMSampler:
    """DDIM (eta-parameterized) sampling over a skipped timestep sequence."""

    def __init__(self, steps: int = 20, eta: float = 0.0, skip: str = "uniform", num_timesteps: int = 1000,
                 alphas_cumprod: np.ndarray | None = None):
        self.alphas_cumprod = linear_alphas_cumprod(num_timesteps) if alphas_cumprod is None else alphas_cumprod
        self.timesteps = ddim_timesteps(steps, len(self.alphas_cumprod), skip)
        self.eta = float(eta)

    def step(self, x: np.ndarray, eps: np.ndarray, t: int, t_next: int, noise: np.ndarray | None) -> np.ndarray:
        """One DDIM update from timestep ``t`` to ``t_next`` (-1 means the clean image)."""
        at = self.alphas_cumprod[t]
        an = self.alphas_cumprod[t_next] if t_next >= 0 else 1.0
        x0 = (x - np.float32(np.sqrt(1 - at)) * eps) / np.float32(np.sqrt(at))
        c1 = self.eta * np.sqrt((1 - at / an) * (1 - an) / (1 - at))
        c2 = np.sqrt(max(1 - an - c1 ** 2, 0.0))
        out = np.float32(np.sqrt(an)) * x0 + np.float32(c2) * eps
        if c1 > 0 and noise is not None:
            out = out + np.float32(c1) * noise
        return out.astype(np.float32)

    def sample(self, eps_fn: EpsFn, shape: tuple, seed: int = 0, x_T: np.ndarray | None = None,
               callback: Callable[[int, int, np.ndarray], None] | None = None) -> np.ndarray:
        """Run the reverse process from x_T ~ N(0, I); ``callback(i, t, x_t)`` sees each model input."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape, dtype=np.float32) if x_T is None else np.asarray(x_T, np.float32)
        seq = self.timesteps[::-1]
        for i, t in enumerate(seq):
            t_next = int(seq[i + 1]) if i + 1 < len(seq) else -1
            if callback is not None:
                callback(i, int(t), x)
            eps = np.asarray(eps_fn(x, np.full(shape[0], t, np.int64)), np.float32)
            noise = rng.standard_normal(shape, dtype=np.float32) if self.eta > 0 else None
            x = self.step(x, eps, int(t), t_next, noise)
        return x


def torch_eps_fn(model, batch_size: int = 1000) -> EpsFn:
    """Wrap a torch eps model (``model(x, t)``) as a NumPy eps function, run in chunks without grad."""
    import torch

    def fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        outs = []
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                outs.append(model(torch.from_numpy(x[s:s + batch_size]), torch.from_numpy(t[s:s + batch_size])).numpy())
        return np.concatenate(outs).astype(np.float32)

    return fn
