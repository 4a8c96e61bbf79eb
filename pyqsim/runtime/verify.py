"""Cross-backend verification: replay recorded integer ops on every backend and compare with ``==``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops


@dataclass
class Mismatch:
    """One differing output element of a recorded op."""

    layer: int
    scope: str
    op: str
    backend: str
    index: tuple
    expected: object
    got: object

    def __str__(self) -> str:
        return (f"layer {self.layer} ({self.scope or '-'}, {self.op}) on {self.backend}: "
                f"index {self.index} expected {self.expected} got {self.got}")


def compare(expected: np.ndarray, got: np.ndarray, limit: int = 5):
    """Up to ``limit`` (index, expected, got) triples where the arrays differ (shape/dtype count as one)."""
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return [((), f"{expected.dtype}{expected.shape}", f"{got.dtype}{got.shape}")], 1
    if expected.dtype.kind == "f":
        bad = expected.view(np.uint32 if expected.itemsize == 4 else np.uint64) != got.view(
            np.uint32 if got.itemsize == 4 else np.uint64)
    else:
        bad = expected != got
    idx = np.argwhere(bad)
    return [(tuple(int(v) for v in i), expected[tuple(i)].item(), got[tuple(i)].item()) for i in idx[:limit]], int(bad.sum())


def replay_counts(calls: list, reference: str = "reference") -> dict:
    """Re-run recorded ``(scope, op, args, result)`` calls on ``reference``; count differing output elements."""
    compared = bad = 0
    for _, op, args, result in calls:
        compared += int(np.size(result))
        bad += compare(ops.run_canonical(op, args, reference), np.asarray(result), limit=0)[1]
    return {"op_calls": len(calls), "elements": compared, "mismatches": bad}


def verify_calls(calls: list, backends=None, reference: str = "reference", limit: int = 20):
    """Replay ``ops.record()`` calls on ``backends`` against ``reference``; returns (mismatches, counts)."""
    backends = [b for b in (backends or ops.available_backends()) if b != reference]
    mismatches, counts = [], {b: 0 for b in backends}
    for i, (scope_name, op, args, _) in enumerate(calls):
        want = ops.run_canonical(op, args, reference)
        for b in backends:
            got = ops.run_canonical(op, args, b)
            diffs, n = compare(want, got)
            counts[b] += n
            for index, e, g in diffs:
                if len(mismatches) < limit:
                    mismatches.append(Mismatch(i, scope_name, op, b, index, e, g))
    return mismatches, counts
