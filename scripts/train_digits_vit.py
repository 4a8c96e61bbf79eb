"""Retrain the bundled digits ViT (pyqsim/models/weights/digits_vit.npz).

    python scripts/train_digits_vit.py [--epochs N] [--out PATH]

Deterministic on CPU for a given torch build (fixed seeds, fixed split).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.nn import functional as F

from pyqsim.models.vit import DIGITS, DIGITS_SEED, DIGITS_WEIGHTS, ViT, digits_split, save_npz


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to max_shift pixels in x and y, filling with zeros."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(model: ViT, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def train(epochs: int, batch: int = 64, lr: float = 2e-3, seed: int = DIGITS_SEED) -> tuple[ViT, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = (torch.from_numpy(a) for a in digits_split())
    model = ViT(DIGITS)
    model.reset_parameters(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x_tr) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(random_shift(x_tr[idx], gen)), y_tr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            print(f"epoch {epoch + 1:4d}  loss {loss.item():.4f}  test top-1 {accuracy(model, x_te, y_te):.4f}"
                  f"  {time.perf_counter() - t0:.0f}s", flush=True)
    info = {"test_top1": accuracy(model, x_te, y_te), "train_top1": accuracy(model, x_tr, y_tr),
            "epochs": epochs, "seed": seed, "train_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__, "n_test": len(x_te)}
    return model.eval(), info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", default=str(DIGITS_WEIGHTS))
    ap.add_argument("--threads", type=int, default=1, help="small batches run fastest on one thread")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = train(args.epochs)
    save_npz(model, args.out, info)
    print(f"saved {args.out}: {info}")
    np.testing.assert_(info["test_top1"] >= 0.97, "test top-1 below 97%")


if __name__ == "__main__":
    main()
