"""argparse value types shared by the command line and the experiment scripts."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (sample, seed and batch counts)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v}")
    return v


def int_in(lo: int, hi: int):
    """An integer in [lo, hi] (bit widths)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {v}")
        return v
    return parse


BACKEND_CHOICES = ("auto", "reference", "cpu", "cuda")
