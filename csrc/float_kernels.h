// Per-ISA entry points of the float stages (docs/spec.md §15), instantiated from float_math.h by
// float_scalar.cpp, float_avx2.cpp and float_avx512.cpp. Single-threaded; floatops.cpp splits the work into tasks.
#pragma once

#include <cstdint>

#include "float_math.h"
#include "qsim.h"

namespace qsim {
namespace detail {

struct FloatKernels {
  void (*softmax_rows)(const float* x, float* y, int64_t rows, int64_t n);
  void (*layer_norm_rows)(const float* x, float* y, int64_t rows, int64_t n, const float* w, const float* b, float eps);
  void (*moments)(const float* x, int64_t n, float eps, float* mean, float* rstd);
  void (*normalize_run)(const float* x, float* y, int64_t n, float mean, float rstd, float w, float b);
  void (*unary)(UnaryOp op, const float* x, float* y, int64_t n);
  // §15.8: y = a + b elementwise (n values each), and y = a + b with one b
  void (*add)(const float* a, const float* b, float* y, int64_t n);
  void (*add_scalar)(const float* a, float b, float* y, int64_t n);
  // §2 codes of n floats; per-element parameters (s, lo - z, hi - z, z) when stride == 1, else shared.
  // false when some x is not finite.
  bool (*quantize_run)(const float* x, int64_t n, const float* s, const float* lo, const float* hi, const int32_t* z,
                       int stride, uint8_t* out);
  // §3 codes of n floats (k = 1 or 2); false when some p is not finite and >= 0.
  bool (*log_codes)(const float* p, int64_t n, double delta, int k, int zero_code, uint8_t* out);
};

template <class O>
const FloatKernels& float_kernel_table() {
  using V = typename O::V;
  static const FloatKernels table = {
      [](const float* x, float* y, int64_t rows, int64_t n) {
        for (int64_t r = 0; r < rows; ++r) fmath::softmax_row<O>(x + r * n, y + r * n, n);
      },
      [](const float* x, float* y, int64_t rows, int64_t n, const float* w, const float* b, float eps) {
        for (int64_t r = 0; r < rows; ++r) fmath::layer_norm_row<O>(x + r * n, y + r * n, n, w, b, eps);
      },
      [](const float* x, int64_t n, float eps, float* mean, float* rstd) { fmath::moments<O>(x, n, eps, *mean, *rstd); },
      [](const float* x, float* y, int64_t n, float mean, float rstd, float w, float b) {
        fmath::normalize_run<O>(x, y, n, mean, rstd, w, b);
      },
      [](UnaryOp op, const float* x, float* y, int64_t n) {
        switch (op) {
          case UnaryOp::GeluErf:
            fmath::map<O>(x, y, n, [](auto t, auto v) { return fmath::gelu_erf<typename decltype(t)::type>(v); });
            break;
          case UnaryOp::GeluTanh:
            fmath::map<O>(x, y, n, [](auto t, auto v) { return fmath::gelu_tanh<typename decltype(t)::type>(v); });
            break;
          default:
            fmath::map<O>(x, y, n, [](auto t, auto v) { return fmath::silu<typename decltype(t)::type>(v); });
            break;
        }
      },
      fmath::add_run<O>,
      fmath::add_scalar_run<O>,
      fmath::quantize_run<O>,
      [](const float* p, int64_t n, double delta, int k, int zero_code, uint8_t* out) {
        return k == 1 ? O::template log_codes<1>(p, n, delta, zero_code, out)
                      : O::template log_codes<2>(p, n, delta, zero_code, out);
      },
  };
  return table;
}

const FloatKernels& float_kernels_scalar();
#if defined(PYQSIM_HAVE_AVX2_TU)
const FloatKernels& float_kernels_avx2();
#endif
#if defined(PYQSIM_HAVE_VNNI_TU)
const FloatKernels& float_kernels_avx512();
#endif

}  // namespace detail
}  // namespace qsim
