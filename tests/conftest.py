"""Shared test configuration: Hypothesis profiles and skip markers.

Profiles: ``ci`` (default; derandomized, fast) and ``thorough`` (10^4 examples per property), chosen by
``PYQSIM_HYPOTHESIS_PROFILE``. Markers skip on what the build or machine lacks, never inside test bodies.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=10_000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("PYQSIM_HYPOTHESIS_PROFILE", "ci"))


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_ext() -> bool:
    from pyqsim import ops
    return "cpu" in ops.available_backends()


def _cuda_build() -> bool:
    from pyqsim import build_info
    return bool(build_info().get("cuda", {}).get("compiled"))


def _gpu() -> bool:
    from pyqsim import ops
    return "cuda" in ops.available_backends()  # a visible device the kernels support (sm_80+)


def _cuda_simt() -> bool:
    from pyqsim.backends import cuda
    return cuda.simulator_available()


def _on_simulator(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("cuda_target") == "simt"


def pytest_collection_modifyitems(config, items):
    checks = {
        "needs_cuda_simt": (_cuda_simt, "pyqsim was built without the host SIMT emulator (PYQSIM_CUDA_SIMT=OFF)"),
        "needs_torch": (_has_torch, "PyTorch is not installed"),
        "needs_cpu_ext": (_cpu_ext, "pyqsim._C (CPU kernels) is not compiled in this build"),
        "needs_cuda_build": (_cuda_build, "pyqsim was built without CUDA kernels"),
        "needs_gpu": (_gpu, "no CUDA device of compute capability >= 8.0 is visible"),
    }
    cache = {}
    for item in items:
        for name, (probe, why) in checks.items():
            if item.get_closest_marker(name):
                if name not in cache:
                    cache[name] = probe()
                if not cache[name]:
                    item.add_marker(pytest.mark.skip(reason=why))
        if item.get_closest_marker("gpu_only") and _on_simulator(item):
            item.add_marker(pytest.mark.skip(reason="needs a real GPU (CUDA tensors, streams or a size beyond the "
                                                    "host SIMT emulator)"))
