// Per-element output stages of the runtime numerics profiles (docs/spec.md §14), written once and
// compiled into the CPU kernel translation units (through generic_impl.h) and the CUDA profile pass
// (csrc/cuda/elementwise.cu, where nvcc builds with --fmad=false).
// Integer steps wrap modulo 2^32 where the runtime's int32 arithmetic would; float steps are one IEEE
// binary32 operation each (the kernels are built with -ffp-contract=off), rounded to nearest even.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define QSIM_NUM_FN __host__ __device__ inline
#else
#define QSIM_NUM_FN inline
#endif

namespace qsim {

enum class Numerics : int { Pyqsim = 0, Tflite = 1, TfliteSingle = 2, Onnxruntime = 3, Fbgemm = 4 };

namespace numerics {

// The runtime profiles' names (pyqsim.numerics.NAMES without "pyqsim"); false for any other name.
inline bool runtime_profile(const char* name, Numerics* p) {
  static const struct { const char* name; Numerics p; } names[] = {{"tflite", Numerics::Tflite},
                                                                    {"tflite-single", Numerics::TfliteSingle},
                                                                    {"onnxruntime", Numerics::Onnxruntime},
                                                                    {"fbgemm", Numerics::Fbgemm}};
  for (const auto& nm : names)
    if (std::strcmp(nm.name, name) == 0) return *p = nm.p, true;
  return false;
}

// Round to nearest, ties to even (the default rounding mode on both sides).
QSIM_NUM_FN float round_even(float t) {
#if defined(__CUDA_ARCH__)
  return rintf(t);
#else
  return std::nearbyint(t);
#endif
}

QSIM_NUM_FN int32_t wrap32(int64_t v) { return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(v))); }

// gemmlowp SaturatingRoundingDoublingHighMul: high half of 2*a*b, rounded half away from zero (§14.2).
QSIM_NUM_FN int32_t srdhm(int32_t a, int32_t b) {
  if (a == b && a == INT32_MIN) return INT32_MAX;
  const int64_t ab = static_cast<int64_t>(a) * b;
  const int64_t nudge = ab >= 0 ? (int64_t(1) << 30) : 1 - (int64_t(1) << 30);
  return static_cast<int32_t>((ab + nudge) / (int64_t(1) << 31));  // C++ division truncates toward zero
}

// gemmlowp RoundingDivideByPOT: x / 2^e rounded half away from zero, e in [0, 31] (§14.2).
QSIM_NUM_FN int32_t rdbpot(int32_t x, int e) {
  const int64_t mask = (int64_t(1) << e) - 1;
  const int64_t rem = static_cast<int64_t>(x) & mask;
  const int64_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return static_cast<int32_t>((static_cast<int64_t>(x) >> e) + (rem > threshold ? 1 : 0));
}

// TFLite MultiplyByQuantizedMultiplier; shift s = 31 - TFLite's shift, in [1, 62] (§14.2, §14.3).
QSIM_NUM_FN int32_t tflite_mul(int32_t acc, int32_t m, int s, bool single) {
  if (single) return wrap32((static_cast<int64_t>(acc) * m + (int64_t(1) << (s - 1))) >> s);
  const int left = s < 31 ? 31 - s : 0, right = s > 31 ? s - 31 : 0;
  return rdbpot(srdhm(wrap32(static_cast<int64_t>(static_cast<uint32_t>(acc)) << left), m), right);
}

// One requantized code under profile p (not Pyqsim): fixed profiles use (m, s), float ones `scale`.
QSIM_NUM_FN int32_t requant_code(Numerics p, int32_t acc, int32_t m, int s, float scale, int32_t zy, int32_t lo, int32_t hi) {
  int32_t y;
  if (p == Numerics::Tflite || p == Numerics::TfliteSingle) {
    y = wrap32(static_cast<int64_t>(tflite_mul(acc, m, s, p == Numerics::TfliteSingle)) + zy);
  } else {
    float t = static_cast<float>(acc) * scale;  // fl32(fl32(acc) * scale)
    if (p == Numerics::Onnxruntime) {          // clamp in float, round half even, add zero point (§14.4)
      const float flo = static_cast<float>(lo - zy), fhi = static_cast<float>(hi - zy);
      t = t < flo ? flo : (t > fhi ? fhi : t);
      y = static_cast<int32_t>(round_even(t)) + zy;
    } else {  // Fbgemm: cvtps2dq (out of range -> INT32_MIN), int32 add of the zero point (§14.5)
      const bool inside = t >= -2147483648.0f && t < 2147483648.0f;
      const int32_t r = inside ? static_cast<int32_t>(round_even(t)) : INT32_MIN;
      y = wrap32(static_cast<int64_t>(r) + zy);
    }
  }
  return y < lo ? lo : (y > hi ? hi : y);
}

}  // namespace numerics
}  // namespace qsim
