"""Post-training calibration (RepQ-ViT, Q-Diffusion) and lowering to programs; needs PyTorch."""
from __future__ import annotations

METHODS = ("repq-vit", "qdiffusion", "linear")


def quantize(model, calib, method: str = "repq-vit", w_bits=None, a_bits=None, **options):
    """See :func:`pyqsim.quantize`."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method == "repq-vit":
        from .repqvit import RepQConfig, calibrate
        return calibrate(model, calib, RepQConfig(w_bits=w_bits or 4, a_bits=a_bits or 4, **options))
    if method in ("qdiffusion", "linear"):  # "linear": Q-Diffusion's min-max baseline on the same calibration set
        from .qdiffusion import EpsModel, QDiffConfig, _check_cali, calibrate, discover_splits
        if "method" in options:
            raise TypeError("pass the recipe as method='qdiffusion' or method='linear', not as an option")
        cfg = QDiffConfig(w_bits=w_bits or 4, a_bits=a_bits or 8, method=method, **options)
        xs, ts = _check_cali(calib)
        if cfg.split:
            discover_splits(EpsModel.wrap(model), xs[:2].float(), ts[:2])
        return calibrate(model, calib, cfg)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
