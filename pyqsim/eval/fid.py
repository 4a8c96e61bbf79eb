"""FID and an Inception-Score-like figure computed with the bundled digits classifier (no downloads)."""
from __future__ import annotations

import numpy as np

from ..models.digits_classifier import DigitsClassifier, load_digits_classifier, real_digits


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), symmetric eigen-decompositions only."""
    s1 = _sqrtm_psd(cov1)
    cross = np.linalg.eigvalsh(s1 @ cov2 @ s1)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def _stats(feats: np.ndarray):
    f = feats.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def fid(samples: np.ndarray, reference: np.ndarray | None = None, clf: DigitsClassifier | None = None) -> float:
    """FID between ``samples`` [N,1,8,8] in [-1,1] and the real digits (or ``reference``) in classifier feature space."""
    clf = clf or load_digits_classifier()
    ref = real_digits() if reference is None else reference
    return frechet_distance(*_stats(clf.features(samples)), *_stats(clf.features(ref)))


def inception_score(samples: np.ndarray, clf: DigitsClassifier | None = None, splits: int = 1) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with the digits classifier, averaged over ``splits`` chunks (max 10)."""
    clf = clf or load_digits_classifier()
    p = clf.probs(samples).astype(np.float64)
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(0, keepdims=True)
        kl = np.sum(chunk * (np.log(chunk + 1e-12) - np.log(py + 1e-12)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))
