// AVX-512 lanes for the float stages (float_math.h): sixteen floats per lane vector. Compiled in the AVX-512 VNNI
// translation unit's flags (AVX-512 F and BW; never FMA: -ffp-contract=off, and every operation is an explicit
// intrinsic), so each operation is the IEEE operation float_math.h names, as in the scalar and AVX2 lanes.
#include <immintrin.h>

#include "float_kernels.h"

namespace qsim {
namespace detail {
namespace {

struct Avx512Ops {
  using V = __m512;
  using I = __m512i;
  using M = __mmask16;
  static constexpr int W = 16;
  static __mmask16 first(int k) { return static_cast<__mmask16>((1u << k) - 1u); }  // k in [0, 16)
  static V set(float v) { return _mm512_set1_ps(v); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_fill(const float* p, int k, float fill) { return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first(k), p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_part(float* p, V v, int k) { _mm512_mask_storeu_ps(p, first(k), v); }
  static I load_int(const int32_t* p, int k) { return _mm512_maskz_loadu_epi32(first(k), p); }
  static I set_int(int32_t v) { return _mm512_set1_epi32(v); }
  static void store_codes(uint8_t* p, I v, int k) {  // the low byte (two's complement) of each lane
    if (k == W)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v));
    else
      _mm512_mask_cvtepi32_storeu_epi8(p, first(k), v);
  }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  // as the AVX2 lanes: max(v, lo) returns lo for a NaN v, then min(., hi)
  static V clamp(V v, V lo, V hi) { return _mm512_min_ps(_mm512_max_ps(v, lo), hi); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M unord(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q); }
  static M mor(M a, M b) { return static_cast<M>(a | b); }
  static bool any(M m) { return m != 0; }
  static V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static V keep(V v, int k) { return _mm512_maskz_mov_ps(first(k), v); }
  static float tree(V v) {  // lanes j + j+8, then j + j+4, j + j+2, 0 + 1 (§15.1)
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
  static float hmax_lanes(V v) {
    const __m256 m8 = _mm256_max_ps(_mm512_castps512_ps256(v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
  }
  static I to_int(V v) { return _mm512_cvtps_epi32(v); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I sra1(I a) { return _mm512_srai_epi32(a, 1); }
  static V pow2(I k) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(127)), 23)); }
  // §3 codes: the AVX2 lanes' loop (float64 quotients, four per half register)
  template <int K>
  static bool log_codes(const float* p, int64_t n, double delta, int zero_code, uint8_t* out) {
    return float_kernels_avx2().log_codes(p, n, delta, K, zero_code, out);
  }
};

}  // namespace

const FloatKernels& float_kernels_avx512() { return float_kernel_table<Avx512Ops>(); }

}  // namespace detail
}  // namespace qsim
