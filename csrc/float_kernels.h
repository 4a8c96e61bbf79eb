// Per-ISA entry points of the float stages (docs/spec.md §15), instantiated from float_math.h by
// float_scalar.cpp and float_avx2.cpp. Single-threaded; floatops.cpp splits the work into tasks.
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
  // §2 codes of n floats; per-element parameters (s, lo - z, hi - z, z) when stride == 1, else shared
  void (*quantize_run)(const float* x, int64_t n, const float* s, const float* lo, const float* hi, const int32_t* z,
                       int stride, uint8_t* out);
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
          case UnaryOp::GeluErf: fmath::map<O>(x, y, n, [](V v) { return fmath::gelu_erf<O>(v); }); break;
          case UnaryOp::GeluTanh: fmath::map<O>(x, y, n, [](V v) { return fmath::gelu_tanh<O>(v); }); break;
          default: fmath::map<O>(x, y, n, [](V v) { return fmath::silu<O>(v); }); break;
        }
      },
      [](const float* x, int64_t n, const float* s, const float* lo, const float* hi, const int32_t* z, int stride,
         uint8_t* out) {
        constexpr int W = O::W;
        for (int64_t i = 0; i < n; i += W) {
          const int k = static_cast<int>(n - i < W ? n - i : W);
          const int64_t p = stride ? i : 0;
          const V xv = fmath::load_n<O>(x + i, k);
          const V sv = stride ? O::load_fill(s + p, k, 1.0f) : O::set(s[0]);
          const V lv = stride ? fmath::load_n<O>(lo + p, k) : O::set(lo[0]);
          const V hv = stride ? fmath::load_n<O>(hi + p, k) : O::set(hi[0]);
          const typename O::I zv = stride ? O::load_int(z + p, k) : O::set_int(z[0]);
          O::store_codes(out + i, fmath::quantize_lanes<O>(xv, sv, lv, hv, zv), k);
        }
      },
  };
  return table;
}

const FloatKernels& float_kernels_scalar();
#if defined(PYQSIM_HAVE_AVX2_TU)
const FloatKernels& float_kernels_avx2();
#endif

}  // namespace detail
}  // namespace qsim
