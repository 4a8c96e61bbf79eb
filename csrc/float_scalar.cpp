// Scalar lanes for the float stages (float_math.h): one float per lane, plain C++ IEEE operations.
#include <cmath>
#include <cstring>

#include "float_kernels.h"

namespace qsim {
namespace detail {
namespace {

struct ScalarOps {
  using V = float;
  using I = int32_t;
  using M = bool;
  static constexpr int W = 1;
  static V set(float v) { return v; }
  static V zero() { return 0.0f; }
  static V load(const float* p) { return *p; }
  static V load_fill(const float* p, int k, float fill) { return k > 0 ? *p : fill; }
  static void store(float* p, V v) { *p = v; }
  static void store_part(float* p, V v, int k) {
    if (k > 0) *p = v;
  }
  static I load_int(const int32_t* p, int k) { return k > 0 ? *p : 0; }
  static I set_int(int32_t v) { return v; }
  static void store_codes(uint8_t* p, I v, int k) {  // the low byte (two's complement) of each lane
    if (k > 0) *p = static_cast<uint8_t>(v);
  }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V abs(V a) { return std::fabs(a); }
  static V clamp(V v, V lo, V hi) { return v > hi ? hi : (v >= lo ? v : lo); }
  static M gt(V a, V b) { return a > b; }
  static M ge(V a, V b) { return a >= b; }
  static M unord(V a, V b) { return a != a || b != b; }
  static M mor(M a, M b) { return a || b; }
  static bool any(M m) { return m; }
  static V select(M m, V a, V b) { return m ? a : b; }
  static V keep(V v, int k) { return k > 0 ? v : 0.0f; }
  static float tree(V v) { return v; }
  static float hmax_lanes(V v) { return v; }
  static I to_int(V v) { return static_cast<int32_t>(v); }
  static I iadd(I a, I b) { return a + b; }
  static I isub(I a, I b) { return a - b; }
  static I sra1(I a) { return a >> 1; }  // arithmetic shift (floor)
  static V pow2(I k) {
    const uint32_t bits = static_cast<uint32_t>(k + 127) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  template <int K>
  static bool log_codes(const float* p, int64_t n, double delta, int zero_code, uint8_t* out) {
    return fmath::log_codes_each<ScalarOps, K>(p, n, delta, zero_code, out);
  }
};

}  // namespace

const FloatKernels& float_kernels_scalar() { return float_kernel_table<ScalarOps>(); }

}  // namespace detail
}  // namespace qsim
