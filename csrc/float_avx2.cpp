// AVX2 lanes for the float stages (float_math.h): eight floats per lane vector. Compiled with -mavx2
// only (no FMA) and -ffp-contract=off, so every operation is the IEEE operation float_math.h names.
#include <immintrin.h>

#include "float_kernels.h"

namespace qsim {
namespace detail {
namespace {

struct Avx2Ops {
  using V = __m256;
  using I = __m256i;
  using M = __m256;
  static constexpr int W = 8;
  static __m256i first(int k) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static V set(float v) { return _mm256_set1_ps(v); }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_fill(const float* p, int k, float fill) {
    const __m256i m = first(k);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_part(float* p, V v, int k) { _mm256_maskstore_ps(p, first(k), v); }
  static I load_int(const int32_t* p, int k) { return _mm256_maskload_epi32(p, first(k)); }
  static I set_int(int32_t v) { return _mm256_set1_epi32(v); }
  static void store_codes(uint8_t* p, I v, int k) {  // the low byte (two's complement) of each lane
    const __m256i low = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                -1, -1));
    const __m128i b = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(low, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1)));
    if (k == W) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(p), b);
    } else {
      alignas(16) uint8_t tmp[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), b);
      for (int j = 0; j < k; ++j) p[j] = tmp[j];
    }
  }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  // max(v, lo) is v > lo ? v : lo (NaN -> lo), then min(., hi) is . < hi ? . : hi: equal values are the same
  // float as the bounds are not zero
  static V clamp(V v, V lo, V hi) { return _mm256_min_ps(_mm256_max_ps(v, lo), hi); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static M unord(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_UNORD_Q); }
  static M mor(M a, M b) { return _mm256_or_ps(a, b); }
  static bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static V keep(V v, int k) { return _mm256_and_ps(v, _mm256_castsi256_ps(first(k))); }
  static float tree(V v) {  // lanes j + j+4, then j + j+2, then 0 + 1 (§15.1)
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
  static float hmax_lanes(V v) {
    const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
  }
  static I to_int(V v) { return _mm256_cvtps_epi32(v); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I sra1(I a) { return _mm256_srai_epi32(a, 1); }
  static V pow2(I k) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23)); }

  // §3 codes, eight at a time: the float64 quotients of fmath::log_code in two halves of four, the same bit tests
  // on 64-bit lanes (f <= T as T + 1 > f), then the clamps on the low 32 bits of each code.
  template <int K>
  static __m128i log_half(__m128 p, __m256d delta) {
    const __m256i bits = _mm256_castpd_si256(_mm256_div_pd(_mm256_cvtps_pd(p), delta));
    const __m256i e = _mm256_sub_epi64(_mm256_srli_epi64(bits, 52), _mm256_set1_epi64x(1022));
    const __m256i f = _mm256_and_si256(bits, _mm256_set1_epi64x(fmath::kLogFrac));
    const auto le = [&](uint64_t t) {  // -1 where f <= t
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(static_cast<int64_t>(t + 1)), f);
    };
    const __m256i c = K == 1 ? _mm256_sub_epi64(_mm256_sub_epi64(_mm256_setzero_si256(), e), le(fmath::kLogHalf))
                             : _mm256_sub_epi64(_mm256_sub_epi64(_mm256_sub_epi64(_mm256_setzero_si256(),
                                                                                  _mm256_slli_epi64(e, 1)),
                                                                 le(fmath::kLogQuarter)),
                                                le(fmath::kLogThreeQuarters));
    return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
  }
  template <int K>
  static bool log_codes(const float* p, int64_t n, double delta, int zero_code, uint8_t* out) {
    const __m256d dv = _mm256_set1_pd(delta);
    const __m256i zc = _mm256_set1_epi32(zero_code);
    __m256 bad = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += W) {
      const int k = static_cast<int>(n - i < W ? n - i : W);
      const V x = k == W ? load(p + i) : load_fill(p + i, k, 0.0f);
      bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(x, zero(), _CMP_NGE_UQ),
                                           _mm256_cmp_ps(x, set(std::numeric_limits<float>::max()), _CMP_GT_OQ)));
      __m256i c = _mm256_set_m128i(log_half<K>(_mm256_extractf128_ps(x, 1), dv),
                                   log_half<K>(_mm256_castps256_ps128(x), dv));
      c = _mm256_min_epi32(_mm256_max_epi32(c, _mm256_setzero_si256()), zc);  // r == 0 exactly when p == 0
      c = _mm256_blendv_epi8(c, zc, _mm256_castps_si256(_mm256_cmp_ps(x, zero(), _CMP_EQ_OQ)));
      store_codes(out + i, c, k);
    }
    return _mm256_movemask_ps(bad) == 0;
  }
};

}  // namespace

const FloatKernels& float_kernels_avx2() { return float_kernel_table<Avx2Ops>(); }

}  // namespace detail
}  // namespace qsim
