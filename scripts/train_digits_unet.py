"""Train the bundled 8x8 digits diffusion UNet (eps prediction, DDPM loss) and save it as .npz.

Usage: python scripts/train_digits_unet.py [--iters N] [--out PATH]   (~10 min on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from pyqsim.models.ddim import linear_alphas_cumprod
from pyqsim.models.unet import DIGITS_CONFIG, WEIGHTS_DIR, UNet, state_to_npz


def digits_images() -> np.ndarray:
    """scikit-learn digits as float32 [1797, 1, 8, 8] in [-1, 1]."""
    return (load_digits().images.astype(np.float32) / 8.0 - 1.0)[:, None]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iters", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this size)")
    ap.add_argument("--out", default=str(WEIGHTS_DIR / "digits_unet.npz"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = torch.from_numpy(digits_images())
    abar = torch.from_numpy(linear_alphas_cumprod()).float()
    model = UNet(DIGITS_CONFIG)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.iters, pct_start=0.05)
    t0, avg = time.time(), None
    for it in range(args.iters):
        x0 = data[torch.from_numpy(rng.integers(0, len(data), args.batch))]
        t = torch.randint(0, len(abar), (args.batch,))
        noise = torch.randn_like(x0)
        a = abar[t][:, None, None, None]
        loss = torch.mean((model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - noise) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        avg = loss.item() if avg is None else 0.99 * avg + 0.01 * loss.item()
        if it % 500 == 0 or it == args.iters - 1:
            print(f"iter {it} loss {avg:.4f} {time.time() - t0:.0f}s", flush=True)
    state_to_npz(ema, args.out, {"iters": args.iters, "batch": args.batch, "lr": args.lr, "ema": args.ema,
                                  "seed": args.seed, "train_seconds": round(time.time() - t0, 1)})
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
