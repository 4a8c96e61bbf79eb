"""Shared timing helpers for the benchmarks: warm-up, interleaved repetitions, best-of and median.

Contenders are timed round-robin (A, B, C, A, B, C, ...) so that background load on a shared machine
affects all of them alike; the best time is the headline number (least disturbed run), the median is
kept for the JSON record.

Clocks: ``wall`` (``perf_counter``, the default) or ``cpu`` (``process_time``: CPU seconds of the whole
process). With one thread, CPU time leaves out the time the process spends descheduled, so on a loaded
machine it measures the kernels' own cost; with several threads it adds their CPU times up (and counts
idle spinning), so use ``wall`` there.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter
CLOCK_NAME = "wall"


def set_clock(name: str) -> None:
    global _clock, CLOCK_NAME
    if name not in _CLOCKS:
        raise ValueError(f"clock must be one of {sorted(_CLOCKS)}, got {name!r}")
    _clock, CLOCK_NAME = _CLOCKS[name], name


def _now() -> float:
    return _clock()


def time_once(fn: Callable[[], object]) -> float:
    t0 = _now()
    fn()
    return _now() - t0


def compare(fns: dict[str, Callable[[], object]], *, reps: int = 5, warmup: int = 1, min_time: float = 0.0,
            max_reps: int = 50) -> dict[str, dict]:
    """Time every callable ``reps`` times (more while the total stays under ``min_time`` seconds), interleaved.

    Returns ``{name: {"best": s, "median": s, "reps": n}}``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = _now()
    n = 0
    while n < reps or (_now() - start < min_time and n < max_reps):
        for k, fn in fns.items():
            times[k].append(time_once(fn))
        n += 1
    return {k: {"best": min(v), "median": statistics.median(v), "reps": len(v)} for k, v in times.items()}


def gops(ops: float, seconds: float) -> float:
    return ops / seconds / 1e9 if seconds > 0 else float("nan")


PEAK_NAMES = ("vpmaddubsw", "unit3", "sign4", "vnni", "amx")


def int8_peaks(iterations: int) -> dict:
    """Single-thread register-only int8 GOPS (``pyqsim._C._peak_int8_gops``): the AVX2 loops and, where the CPU
    has AVX-512 VNNI, the ``vpdpbusd`` loop, and with AMX the ``tdpbusd`` loop; ``exact`` is the exact step of the
    ISA the kernels use now (the sign step of spec §10.1 on AVX2, ``vpdpbusd`` on AVX-512 VNNI, §10.7, ``tdpbusd``
    on AMX, §10.8)."""
    from pyqsim import _C
    peaks = dict(zip(PEAK_NAMES, _C._peak_int8_gops(iterations)))
    isa = _C.get_cpu_isa()
    peaks["exact"] = peaks["amx"] if isa == "amx" else peaks["vnni"] if isa == "avx512vnni" else peaks["sign4"]
    return peaks


def machine() -> dict:
    """CPU model, core counts and load, for the record."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("Model name", "CPU(s)", "Core(s) per socket", "Thread(s) per core", "Socket(s)", "L2 cache",
                       "L3 cache", "Flags"):
                val = val.strip()
                if key == "Flags":
                    flags = set(val.split())
                    val = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                                   if f in flags)
                info[key] = val
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        pass
    return info


def write_report(report: dict, out: str | None, results_dir, prefix: str):
    """Write the JSON record to ``out`` or to ``results_dir/<prefix>-<host>-<time>.json``; returns the path."""
    import datetime
    import json
    import pathlib
    import socket
    path = pathlib.Path(out) if out else pathlib.Path(results_dir) / (
        f"{prefix}-{socket.gethostname()}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=float))
    return path
