"""Numerics profiles: the deployed runtime whose integer arithmetic an op reproduces (docs/spec.md §14).

This is the one list of profiles. ``numerics=`` on the ops takes one of the names below; every profile
shares the exact accumulation of §4/§5 and differs in how it turns a real scale into parameters
(``quantize_multiplier``), how it requantizes an int32 accumulator, and how it rounds float -> code.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    params: str  # "fixed": (int32 multiplier, int32 shift); "float": (float32 scale, None)
    shift_max: int  # largest accepted shift (fixed-point profiles)
    section: str  # docs/spec.md section
    source: str  # the runtime code it follows
    pair_saturation: bool = False  # products summed in saturating int16 pairs before the int32 sum


PROFILES = {p.name: p for p in (
    Profile("pyqsim", "fixed", 94, "§6",
            "pyqsim's own rule: one round-half-up shift of the exact int64 product"),
    Profile("tflite", "fixed", 62, "§14.2",
            "TFLite kernels/internal/common.h MultiplyByQuantizedMultiplier (gemmlowp fixedpoint.h "
            "SaturatingRoundingDoublingHighMul, RoundingDivideByPOT); quantization_util.cc QuantizeMultiplier"),
    Profile("tflite-single", "fixed", 62, "§14.3",
            "TFLite kernels/internal/common.h MultiplyByQuantizedMultiplier under TFLITE_SINGLE_ROUNDING; "
            "quantization_util.cc QuantizeMultiplier"),
    Profile("onnxruntime", "float", 0, "§14.4",
            "ONNX Runtime mlas/lib/quantize.cpp MlasRequantizeOutput and MlasQuantizeLinear"),
    Profile("fbgemm", "float", 0, "§14.5",
            "FBGEMM src/QuantUtilsAvx2.cc requantizeOutputProcessingAvx2 (PyTorch quantized linear/conv, x86)"),
    Profile("fbgemm-avx2", "float", 0, "§14.5",
            "fbgemm, plus the int16 pair saturation of FBGEMM's AVX2 / AVX-512 (no VNNI) u8s8 GEMM kernels "
            "(vpmaddubsw), as PyTorch runs on such CPUs or with FBGEMM_ENABLE_INSTRUCTIONS=AVX2", True),
)}
NAMES = tuple(PROFILES)
# the profiles the native backends implement: the exact int32 op, then the output stage of csrc/numerics.h
# (FBGEMM's int16 pair saturation is a property of its AVX2 kernel, modelled in the reference only)
NATIVE = tuple(n for n, p in PROFILES.items() if not p.pair_saturation)
FLOAT_PROFILES = tuple(n for n, p in PROFILES.items() if p.params == "float")


def profile(numerics) -> Profile:
    """The profile named ``numerics``; ValueError naming the accepted names otherwise."""
    if not isinstance(numerics, str) or numerics not in PROFILES:
        raise ValueError(f"numerics must be one of {', '.join(map(repr, NAMES))}, got {numerics!r}")
    return PROFILES[numerics]
