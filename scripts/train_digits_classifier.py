"""Train the bundled digits MLP classifier used for FID/IS and save it as .npz (about a minute on CPU).

Usage: python scripts/train_digits_classifier.py [--epochs N] [--out PATH]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from pyqsim.models.digits_classifier import WEIGHTS, DigitsClassifier, real_digits


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.1, help="std of Gaussian input noise (augmentation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(WEIGHTS))
    args = ap.parse_args(argv)
    from sklearn.datasets import load_digits
    torch.manual_seed(args.seed)
    x = torch.from_numpy(real_digits().reshape(-1, 64))
    y = torch.from_numpy(load_digits().target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(x)))
    n_tr = int(0.8 * len(x))
    tr, te = perm[:n_tr], perm[n_tr:]
    net = nn.Sequential(nn.Linear(64, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.features), nn.ReLU(),
                        nn.Linear(args.features, 10))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(args.epochs):
        for idx in tr[torch.randperm(n_tr)].split(64):
            xb = (x[idx] + args.noise * torch.randn(len(idx), 64)).clamp(-1, 1)
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    params = {f"fc{i + 1}.{k}": v.detach().numpy() for i, m in enumerate(net[::2]) for k, v in m.state_dict().items()}
    clf = DigitsClassifier(params)
    acc = float((clf.logits(x[te].numpy()).argmax(1) == y[te].numpy()).mean())
    clf.meta = {"test_accuracy": round(acc, 4), "n_train": n_tr, **vars(args)}
    clf.meta.pop("out")
    clf.save(args.out)
    print(f"held-out accuracy {acc:.4f}; saved {args.out}")


if __name__ == "__main__":
    main()
