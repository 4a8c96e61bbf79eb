"""Small MLP classifier for 8x8 digits in NumPy; its penultimate features define FID/IS (pyqsim.eval)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits_classifier.npz"
LAYERS = ("fc1", "fc2", "fc3")


class DigitsClassifier:
    """64 -> hidden -> features -> 10 MLP with ReLU; inputs are images in [-1, 1], shape [N, 1, 8, 8] or [N, 64]."""

    def __init__(self, params: dict[str, np.ndarray], meta: dict | None = None):
        self.params = {k: np.asarray(v, np.float32) for k, v in params.items()}
        self.meta = meta or {}

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.params[name + ".weight"].T + self.params[name + ".bias"]

    def features(self, x: np.ndarray) -> np.ndarray:
        """Penultimate (post-ReLU) features, float32 [N, D]."""
        x = np.clip(np.asarray(x, np.float32).reshape(len(x), -1), -1.0, 1.0)
        h = np.maximum(self._dense(x, "fc1"), 0)
        return np.maximum(self._dense(h, "fc2"), 0)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._dense(self.features(x), "fc3")

    def probs(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def save(self, path=WEIGHTS) -> None:
        np.savez_compressed(path, __meta__=np.array(json.dumps(self.meta)), **self.params)


def load_digits_classifier(path=WEIGHTS) -> DigitsClassifier:
    """The bundled classifier (trained by scripts/train_digits_classifier.py)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        params = {k: z[k] for k in z.files if k != "__meta__"}
    return DigitsClassifier(params, meta)


def real_digits() -> np.ndarray:
    """All 1,797 scikit-learn digits as float32 [N, 1, 8, 8] in [-1, 1] (the diffusion model's data space)."""
    from sklearn.datasets import load_digits
    return (load_digits().images.astype(np.float32) / 8.0 - 1.0)[:, None]
