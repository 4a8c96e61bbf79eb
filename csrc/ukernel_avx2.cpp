// AVX2 kernels (compiled with -mavx2 only: no FMA, -ffp-contract=off). Entered only after the
// runtime CPU check in runtime.cpp. No std:: templates in this TU (see generic_impl.h).
//
// Exactness without VNNI (docs/spec.md §10): activations arrive as x' in [-128, 127] (uint8 shifted
// by -128 in packing). The sign-path micro-kernel computes, per 4-byte k-group,
//     vpmaddubsw(|x'|, sign(w, x'))      |x'| <= 128 read as unsigned; sign(w, x') = w * sgn(x')
// which equals x'*w pairwise; with w in [-127, 127] every pair sum is at most 2*128*127 = 32512, so
// the int16 saturation of vpmaddubsw never triggers. vpmaddwd with ones widens pairs to int32 exactly
// and vpaddd accumulates modulo 2^32 (§4.1). Weights -128 arrive packed as -127; the driver subtracts x' for
// each of them after the kernel (§10.2, gemm.cpp).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace qsim {
namespace detail {
namespace {

#include "generic_impl.h"

inline __m256i bcast32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// ------------------------------------------------------------------------------ register-tile loop
// The 4 x 16 int32 tile loop shared by the sign-path and the shift-weight kernels: per k-group the 16-channel B
// panel is two vectors b0/b1 and step(a, r, b0, b1, acc0, acc1) adds row r's products; A advances by AStep
// bytes per k-group. Accumulators are named variables (not arrays) so they stay in registers: 8 accumulators,
// 2 weight vectors, the ones vector and temporaries fit the 16 ymm registers.
template <int MR, int AStep, class Step>
inline void tile_loop(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile, Step step) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  for (int64_t g = 0; g < kg; ++g) {
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + 32));
    step(a, 0, b0, b1, c00, c01);
    if (MR > 1) step(a, 1, b0, b1, c10, c11);
    if (MR > 2) step(a, 2, b0, b1, c20, c21);
    if (MR > 3) step(a, 3, b0, b1, c30, c31);
    a += AStep;
    b += 64;
  }
  __m256i* t = reinterpret_cast<__m256i*>(tile);
  _mm256_store_si256(t + 0, c00);
  _mm256_store_si256(t + 1, c01);
  if (MR > 1) {
    _mm256_store_si256(t + 2, c10);
    _mm256_store_si256(t + 3, c11);
  }
  if (MR > 2) {
    _mm256_store_si256(t + 4, c20);
    _mm256_store_si256(t + 5, c21);
  }
  if (MR > 3) {
    _mm256_store_si256(t + 6, c30);
    _mm256_store_si256(t + 7, c31);
  }
}

// ------------------------------------------------------------------------------ sign-path micro-kernel
// One k-group step for one row r: x' (4 bytes) and |x'| (precomputed in the A panel) broadcast;
// acc0/acc1 = channels 0-7 / 8-15. Exactly sign + maddubs + maddwd + add per 32 multiply-adds.
template <int MR>
void ukr_avx2(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile) {
  const __m256i ones = _mm256_set1_epi16(1);
  tile_loop<MR, 8 * MR>(a, b, kg, tile,
                        [ones](const int8_t* ag, int r, __m256i b0, __m256i b1, __m256i& acc0, __m256i& acc1) {
                          const __m256i x = bcast32(ag + 4 * r);
                          const __m256i ax = bcast32(ag + 4 * (MR + r));
                          const __m256i p0 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(b0, x));
                          const __m256i p1 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(b1, x));
                          acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(p0, ones));
                          acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(p1, ones));
                        });
}

// ------------------------------------------------------------------------------ 4-bit weights
// With stored codes c in [0, 15] and u = x' + 128 in [0, 255] (A panel's second half), a vpmaddubsw
// pair is at most 2 * 255 * 15 = 7650: it never saturates, so no sign trick is needed, and four
// k-groups (4 * 7650 = 30600 <= 32767) are summed in int16 (wrapping vpaddw, which cannot wrap here)
// before one vpmaddwd(ones) widens them. About 2.25 instructions per 32 multiply-adds instead of 4.
// Channels are processed in two halves of 8 so accumulators stay in registers.
constexpr int64_t kT4 = 4;

template <int MR>
inline void ukr4_half(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile, int half) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
  const int8_t* au = a + 4 * MR;  // u half of k-group 0
  b += 32 * half;
#define QSIM_U4_STEP(i)                                                                             \
  do {                                                                                              \
    const __m256i bv = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + (i) * 64));           \
    const int8_t* ag = au + (i) * 8 * MR;                                                           \
    s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(bcast32(ag), bv));                               \
    if (MR > 1) s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(bcast32(ag + 4), bv));               \
    if (MR > 2) s2 = _mm256_add_epi16(s2, _mm256_maddubs_epi16(bcast32(ag + 8), bv));               \
    if (MR > 3) s3 = _mm256_add_epi16(s3, _mm256_maddubs_epi16(bcast32(ag + 12), bv));              \
  } while (0)
#define QSIM_U4_FLUSH()                                                               \
  do {                                                                                \
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(s0, ones));                           \
    if (MR > 1) c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(s1, ones));               \
    if (MR > 2) c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(s2, ones));               \
    if (MR > 3) c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(s3, ones));               \
  } while (0)
  int64_t g = 0;
  for (; g + kT4 <= kg; g += kT4) {  // kT4 == 4 k-groups per int16 accumulation
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    QSIM_U4_STEP(0);
    QSIM_U4_STEP(1);
    QSIM_U4_STEP(2);
    QSIM_U4_STEP(3);
    QSIM_U4_FLUSH();
    au += kT4 * 8 * MR;
    b += kT4 * 64;
  }
  if (g < kg) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i < kg - g; ++i) QSIM_U4_STEP(i);
    QSIM_U4_FLUSH();
  }
#undef QSIM_U4_STEP
#undef QSIM_U4_FLUSH
  int32_t* t = tile + 8 * half;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), c0);
  if (MR > 1) _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + kNR), c1);
  if (MR > 2) _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + 2 * kNR), c2);
  if (MR > 3) _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + 3 * kNR), c3);
}

template <int MR>
void ukr4_avx2(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile) {
  ukr4_half<MR>(a, b, kg, tile, 0);
  ukr4_half<MR>(a, b, kg, tile, 1);
}

// Same arithmetic reading the nibble panel: byte (channel c, b) of 8-k-group g8 holds k-group 2*g8
// (low nibble) and 2*g8+1 (high nibble) -- one AND and one shift+AND per 32 bytes, no stores.
template <int MR>
inline void ukr4_nib_half(const int8_t* a, const uint8_t* nib, int64_t kg, int32_t* tile, int half) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
  const int8_t* au = a + 4 * MR;
  nib += 32 * half;
  const int64_t kg8 = kg / 2;  // kg is even for 4-bit panels
#define QSIM_NIB_STEP(q)                                                                          \
  do {                                                                                            \
    const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(nib + (q) * 64));        \
    const __m256i lo = _mm256_and_si256(v, m4);                                                   \
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);                             \
    const int8_t* ag = au + (2 * (q)) * 8 * MR;                                                   \
    const int8_t* ah = ag + 8 * MR;                                                               \
    s0 = _mm256_add_epi16(s0, _mm256_add_epi16(_mm256_maddubs_epi16(bcast32(ag), lo),            \
                                               _mm256_maddubs_epi16(bcast32(ah), hi)));           \
    if (MR > 1)                                                                                   \
      s1 = _mm256_add_epi16(s1, _mm256_add_epi16(_mm256_maddubs_epi16(bcast32(ag + 4), lo),      \
                                                 _mm256_maddubs_epi16(bcast32(ah + 4), hi)));     \
    if (MR > 2)                                                                                   \
      s2 = _mm256_add_epi16(s2, _mm256_add_epi16(_mm256_maddubs_epi16(bcast32(ag + 8), lo),      \
                                                 _mm256_maddubs_epi16(bcast32(ah + 8), hi)));     \
    if (MR > 3)                                                                                   \
      s3 = _mm256_add_epi16(s3, _mm256_add_epi16(_mm256_maddubs_epi16(bcast32(ag + 12), lo),     \
                                                 _mm256_maddubs_epi16(bcast32(ah + 12), hi)));    \
  } while (0)
#define QSIM_NIB_FLUSH()                                                              \
  do {                                                                                \
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(s0, ones));                           \
    if (MR > 1) c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(s1, ones));               \
    if (MR > 2) c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(s2, ones));               \
    if (MR > 3) c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(s3, ones));               \
  } while (0)
  int64_t q = 0;
  for (; q + 2 <= kg8; q += 2) {  // 2 x 8 k = 4 k-groups per int16 accumulation
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    QSIM_NIB_STEP(0);
    QSIM_NIB_STEP(1);
    QSIM_NIB_FLUSH();
    au += 4 * 8 * MR;
    nib += 2 * 64;
  }
  if (q < kg8) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    QSIM_NIB_STEP(0);
    QSIM_NIB_FLUSH();
  }
#undef QSIM_NIB_STEP
#undef QSIM_NIB_FLUSH
  int32_t* t = tile + 8 * half;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), c0);
  if (MR > 1) _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + kNR), c1);
  if (MR > 2) _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + 2 * kNR), c2);
  if (MR > 3) _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + 3 * kNR), c3);
}

template <int MR>
void ukr4_nib_avx2(const int8_t* a, const uint8_t* nib, int64_t kg, int32_t* tile) {
  ukr4_nib_half<MR>(a, nib, kg, tile, 0);
  ukr4_nib_half<MR>(a, nib, kg, tile, 1);
}

// ------------------------------------------------------------------------------ epilogue
inline __m256i load8(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i load4q(const int64_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// floor(q / 2^s) per 64-bit lane for 0 <= s <= 63 (AVX2 has no vpsraq): ~((~q) >>> s) for q < 0.
inline __m256i sra64(__m256i q, __m256i s) {
  const __m256i neg = _mm256_cmpgt_epi64(_mm256_setzero_si256(), q);
  return _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(q, neg), s), neg);
}

inline __m256i clamp64(__m256i y, __m256i lo, __m256i hi) {
  y = _mm256_blendv_epi8(y, lo, _mm256_cmpgt_epi64(lo, y));
  return _mm256_blendv_epi8(y, hi, _mm256_cmpgt_epi64(y, hi));
}

// 4 x int64 (each within int32) -> 4 x int32 in the low 128 bits
inline __m128i narrow64(__m256i y) {
  const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(y, idx));
}

inline __m256i corrected(const int32_t* t, const int32_t* colc, const int32_t* zw, int32_t rs) {
  __m256i v = _mm256_add_epi32(load8(t), load8(colc));
  if (zw) v = _mm256_sub_epi32(v, _mm256_mullo_epi32(load8(zw), _mm256_set1_epi32(rs)));
  return v;
}

// §6 for 8 channels starting at n, general shifts (1..62): 64-bit products, rounding and an
// arithmetic shift emulated with logical shifts, 64-bit clamp.
inline __m256i requant8_wide(const Epi& e, int64_t n, __m256i a1, const __m256i* a2) {
  const __m256i lo = _mm256_set1_epi64x(static_cast<int64_t>(e.lo) - e.zy);
  const __m256i hi = _mm256_set1_epi64x(static_cast<int64_t>(e.hi) - e.zy);
  __m128i part[2];
  for (int h = 0; h < 2; ++h) {
    const __m256i x1 = _mm256_cvtepi32_epi64(h ? _mm256_extracti128_si256(a1, 1) : _mm256_castsi256_si128(a1));
    __m256i p = _mm256_mul_epi32(x1, load4q(e.m1 + n + 4 * h));
    if (a2) {
      const __m256i x2 = _mm256_cvtepi32_epi64(h ? _mm256_extracti128_si256(*a2, 1) : _mm256_castsi256_si128(*a2));
      p = _mm256_add_epi64(p, _mm256_mul_epi32(x2, load4q(e.m2 + n + 4 * h)));
    }
    p = _mm256_add_epi64(p, load4q(e.rnd + n + 4 * h));
    part[h] = narrow64(clamp64(sra64(p, load4q(e.sh + n + 4 * h)), lo, hi));
  }
  const __m256i y = _mm256_inserti128_si256(_mm256_castsi128_si256(part[0]), part[1], 1);
  return _mm256_add_epi32(y, _mm256_set1_epi32(e.zy));
}

// §6 for 8 channels when every shift S is in [33, 62]. With p = acc*M0 (|p| < 2^62) and
// h = floor(p / 2^32) (the high dword of the exact 64-bit product, |h| <= 2^30):
//   floor((p + 2^(S-1)) / 2^S) = floor((h + 2^(S-33) + f) / 2^(S-32)),  f = (p mod 2^32) / 2^32 in [0, 1)
//                              = (h + 2^(S-33)) >> (S - 32)             (integer numerator, D >= 2)
// so the rounding shift needs only int32 lanes: vpsravd. Exact, no 64-bit shift or clamp.
inline __m256i requant8_fast(const Epi& e, int64_t n, __m256i a1, const __m256i* a2) {
  const __m256i m = load8(e.m1_32 + n);
  __m256i pe = _mm256_mul_epi32(a1, m);  // channels 0, 2, 4, 6
  __m256i po = _mm256_mul_epi32(_mm256_srli_epi64(a1, 32), _mm256_srli_epi64(m, 32));  // 1, 3, 5, 7
  if (a2) {
    const __m256i m2 = load8(e.m2_32 + n);
    pe = _mm256_add_epi64(pe, _mm256_mul_epi32(*a2, m2));
    po = _mm256_add_epi64(po, _mm256_mul_epi32(_mm256_srli_epi64(*a2, 32), _mm256_srli_epi64(m2, 32)));
  }
  const __m256i h = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  __m256i y = _mm256_srav_epi32(_mm256_add_epi32(h, load8(e.rnd32 + n)), load8(e.shr32 + n));
  y = _mm256_add_epi32(y, _mm256_set1_epi32(e.zy));
  y = _mm256_max_epi32(y, _mm256_set1_epi32(e.lo));
  return _mm256_min_epi32(y, _mm256_set1_epi32(e.hi));
}

// Writes an mr x 16 tile of results (esz bytes each, row stride 16 * esz in `res`) to the output.
// GEMM: contiguous channels per row. Conv (NCHW): ldm == 1, so each channel's mr rows are contiguous;
// 4 x 16 byte tiles are transposed in registers and stored as one 4-byte run per channel.
void write_tile(const uint8_t* res, int esz, int mr, int nc, const TileOut& o) {
  uint8_t* out = static_cast<uint8_t*>(o.out);
  if (o.ldn == 1) {
    for (int r = 0; r < mr; ++r)
      std::memcpy(out + r * o.ldm * esz, res + r * kNR * esz, static_cast<size_t>(nc * esz));
    return;
  }
  if (o.ldm == 1 && mr == kMR && esz == 1) {
    const __m128i r0 = _mm_load_si128(reinterpret_cast<const __m128i*>(res));
    const __m128i r1 = _mm_load_si128(reinterpret_cast<const __m128i*>(res + 16));
    const __m128i r2 = _mm_load_si128(reinterpret_cast<const __m128i*>(res + 32));
    const __m128i r3 = _mm_load_si128(reinterpret_cast<const __m128i*>(res + 48));
    const __m128i a = _mm_unpacklo_epi8(r0, r1), b = _mm_unpackhi_epi8(r0, r1);
    const __m128i c = _mm_unpacklo_epi8(r2, r3), d = _mm_unpackhi_epi8(r2, r3);
    alignas(16) uint8_t tb[64];  // [channel][row]
    _mm_store_si128(reinterpret_cast<__m128i*>(tb), _mm_unpacklo_epi16(a, c));
    _mm_store_si128(reinterpret_cast<__m128i*>(tb + 16), _mm_unpackhi_epi16(a, c));
    _mm_store_si128(reinterpret_cast<__m128i*>(tb + 32), _mm_unpacklo_epi16(b, d));
    _mm_store_si128(reinterpret_cast<__m128i*>(tb + 48), _mm_unpackhi_epi16(b, d));
    for (int ch = 0; ch < nc; ++ch) std::memcpy(out + ch * o.ldn, tb + 4 * ch, 4);
    return;
  }
  for (int ch = 0; ch < nc; ++ch)
    for (int r = 0; r < mr; ++r)
      std::memcpy(out + (r * o.ldm + ch * o.ldn) * esz, res + (r * kNR + ch) * esz, static_cast<size_t>(esz));
}

void epi_avx2(const Epi& e, int64_t n0, int mr, int nc, const int32_t* t1, const int32_t* rs1, const int32_t* t2,
              const int32_t* rs2, const TileOut& o) {
  const bool full = nc == kNR && o.ldn == 1;  // store straight to the output
  const bool requant = is_requant(e.type);
  const bool is_signed8 = e.type == OutType::S8 || e.type == OutType::S4;
  const int esz = requant ? 1 : 4;
  alignas(32) uint8_t res[kMR * kNR * 4];
  for (int r = 0; r < mr; ++r) {
    __m256i v[2], w[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + 8 * h;
      v[h] = corrected(t1 + r * kNR + 8 * h, e.colc1 + n, e.zw1 ? e.zw1 + n : nullptr, rs1 ? rs1[r] : 0);
      if (e.split)
        w[h] = corrected(t2 + r * kNR + 8 * h, e.colc2 + n, e.zw2 ? e.zw2 + n : nullptr, rs2 ? rs2[r] : 0);
    }
    uint8_t* dst = full ? static_cast<uint8_t*>(o.out) + r * o.ldm * esz : res + r * kNR * esz;
    if (e.type == OutType::I32) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v[0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), v[1]);
    } else if (e.type == OutType::F32) {
      for (int h = 0; h < 2; ++h) {
        const int64_t n = n0 + 8 * h;
        __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(v[h]), _mm256_loadu_ps(e.s1 + n));
        if (e.split) f = _mm256_add_ps(f, _mm256_mul_ps(_mm256_cvtepi32_ps(w[h]), _mm256_loadu_ps(e.s2 + n)));
        _mm256_storeu_ps(reinterpret_cast<float*>(dst) + 8 * h, f);
      }
    } else if (requant) {
      __m256i y[2];
      for (int h = 0; h < 2; ++h)
        y[h] = e.fast32 ? requant8_fast(e, n0 + 8 * h, v[h], e.split ? &w[h] : nullptr)
                        : requant8_wide(e, n0 + 8 * h, v[h], e.split ? &w[h] : nullptr);
      // values are already inside the output range: the saturating packs are plain narrowing
      const __m256i s16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(y[0], y[1]), 0xD8);
      const __m128i l = _mm256_castsi256_si128(s16), hh = _mm256_extracti128_si256(s16, 1);
      const __m128i bytes = is_signed8 ? _mm_packs_epi16(l, hh) : _mm_packus_epi16(l, hh);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), bytes);
    }
  }
  if (!full) write_tile(res, esz, mr, nc, o);
}

// ------------------------------------------------------------------------------ packing helpers
void unpack4_avx2(const uint8_t* src, int64_t kg, uint8_t* dst) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  for (int64_t g8 = 0; g8 < kg / 2; ++g8) {
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(src + g8 * 64 + 32 * h));
      const __m256i lo = _mm256_and_si256(v, m);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (2 * g8) * 64 + 32 * h), lo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (2 * g8 + 1) * 64 + 32 * h), hi);
    }
  }
}

void pack_a_avx2(const uint8_t* x, int64_t ldx, int mr, int64_t k, int64_t kg, uint8_t mask, bool u_half,
                 int8_t* dst, int32_t* rowsum) {
  int64_t j0 = 0;
  int64_t sums[kMR] = {0, 0, 0, 0};
  if (mr == kMR) {
    // 4 rows x 32 bytes -> 8 k-groups of [4 rows][4 bytes]: a 4x8 transpose of 32-bit words
    const __m256i vm = _mm256_set1_epi8(static_cast<char>(mask));
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i acc[kMR];
    for (int r = 0; r < kMR; ++r) acc[r] = _mm256_setzero_si256();
    for (; j0 + 32 <= k; j0 += 32) {
      __m256i rr[kMR];
      for (int r = 0; r < kMR; ++r) {
        rr[r] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * ldx + j0)), vm);
        // sum of x' = sum of (x' + 128) - 128 * count; vpsadbw sums unsigned bytes
        acc[r] = _mm256_add_epi64(acc[r], _mm256_sad_epu8(_mm256_xor_si256(rr[r], flip), _mm256_setzero_si256()));
      }
      const __m256i t0 = _mm256_unpacklo_epi32(rr[0], rr[1]), t1 = _mm256_unpackhi_epi32(rr[0], rr[1]);
      const __m256i t2 = _mm256_unpacklo_epi32(rr[2], rr[3]), t3 = _mm256_unpackhi_epi32(rr[2], rr[3]);
      const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
      const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
      // k-groups g..g+7 (g = j0/4), each [x' 16 bytes][|x'| 16 bytes]
      const __m256i o0 = _mm256_permute2x128_si256(u0, u1, 0x20), o1 = _mm256_permute2x128_si256(u2, u3, 0x20);
      const __m256i o2 = _mm256_permute2x128_si256(u0, u1, 0x31), o3 = _mm256_permute2x128_si256(u2, u3, 0x31);
      int8_t* d = dst + j0 * 2 * kMR;
      const __m256i os[4] = {o0, o1, o2, o3};
      for (int q = 0; q < 4; ++q) {
        // os[q] holds k-groups 2q and 2q+1 (16 bytes each)
        const __m256i ab = u_half ? _mm256_xor_si256(os[q], flip) : _mm256_abs_epi8(os[q]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 64 * q),
                            _mm256_permute2x128_si256(os[q], ab, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 64 * q + 32),
                            _mm256_permute2x128_si256(os[q], ab, 0x31));
      }
    }
    for (int r = 0; r < kMR; ++r) {
      alignas(32) int64_t q[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), acc[r]);
      sums[r] = q[0] + q[1] + q[2] + q[3] - 128 * j0;
    }
  }
  for (int r = 0; r < mr; ++r) {
    const uint8_t* row = x + r * ldx;
    int64_t s = sums[r];
    for (int64_t j = j0; j < kg * 4; ++j) {
      const int8_t v = j < k ? static_cast<int8_t>(row[j] ^ mask) : 0;
      int8_t* d = dst + (j >> 2) * mr * 8 + r * 4 + (j & 3);
      d[0] = v;
      d[4 * mr] = static_cast<int8_t>(static_cast<uint8_t>(u_half ? v + 128 : (v < 0 ? -v : v)));
      s += v;
    }
    rowsum[r] = static_cast<int32_t>(s);
  }
}

// ------------------------------------------------------------------------------ §7 shift-weight kernel
// a: uint8 weights 2^s (s <= 7) or 0, b: int8 values. vpmaddubsw(a, b) is exact here: a pair sum lies in
// [2 * 128 * -128, 2 * 128 * 127] = [-32768, 32512], inside int16 (no saturation); vpmaddwd with ones
// widens to int32 and the driver's L chunking keeps the int32 sums below 2^31.
template <int MR>
void ukr_shift_avx2(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile) {
  const __m256i ones = _mm256_set1_epi16(1);
  tile_loop<MR, 4 * MR>(a, b, kg, tile,
                        [ones](const int8_t* ag, int r, __m256i b0, __m256i b1, __m256i& acc0, __m256i& acc1) {
                          const __m256i w = bcast32(ag + 4 * r);
                          acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_maddubs_epi16(w, b0), ones));
                          acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_maddubs_epi16(w, b1), ones));
                        });
}

// Four rows of codes < 16: 16 codes per row at a time through a pshufb table, a 4 x 4 transpose of 32-bit
// groups into the [g][4 rows][4] layout, and psadbw row sums; the tail and other shapes take the portable loop.
void shift_a_avx2(const uint8_t* codes, int64_t ldc, int mr, int64_t lc, int64_t kg, const uint8_t* lut, int win,
                  uint8_t* dst, int64_t* rowsum) {
  for (int r = 0; r < mr; ++r) rowsum[r] = 0;
  int64_t j0 = 0;
  if (win >= 0 && mr == kMR) {
    // w = tab[c - win] for c in the window, else 0: c - win wraps to a byte, and the saturating + 0x70 keeps
    // in-window indices below 0x80 (low nibble unchanged) and sends the rest to >= 0x80, which vpshufb zeroes.
    const __m128i tab = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + win));
    const __m128i base = _mm_set1_epi8(static_cast<char>(win)), bias = _mm_set1_epi8(0x70);
    const __m128i zero = _mm_setzero_si128();
    __m128i s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    auto weights = [&](const uint8_t* p) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm_shuffle_epi8(tab, _mm_adds_epu8(_mm_sub_epi8(c, base), bias));
    };
    for (; j0 + 16 <= lc; j0 += 16) {
      const __m128i w0 = weights(codes + j0);
      const __m128i w1 = weights(codes + ldc + j0);
      const __m128i w2 = weights(codes + 2 * ldc + j0);
      const __m128i w3 = weights(codes + 3 * ldc + j0);
      s0 = _mm_add_epi64(s0, _mm_sad_epu8(w0, zero));
      s1 = _mm_add_epi64(s1, _mm_sad_epu8(w1, zero));
      s2 = _mm_add_epi64(s2, _mm_sad_epu8(w2, zero));
      s3 = _mm_add_epi64(s3, _mm_sad_epu8(w3, zero));
      const __m128i t0 = _mm_unpacklo_epi32(w0, w1), t1 = _mm_unpacklo_epi32(w2, w3);
      const __m128i t2 = _mm_unpackhi_epi32(w0, w1), t3 = _mm_unpackhi_epi32(w2, w3);
      __m128i* d = reinterpret_cast<__m128i*>(dst + j0 * 4);
      _mm_storeu_si128(d + 0, _mm_unpacklo_epi64(t0, t1));
      _mm_storeu_si128(d + 1, _mm_unpackhi_epi64(t0, t1));
      _mm_storeu_si128(d + 2, _mm_unpacklo_epi64(t2, t3));
      _mm_storeu_si128(d + 3, _mm_unpackhi_epi64(t2, t3));
    }
    const __m128i* sv[4] = {&s0, &s1, &s2, &s3};
    for (int r = 0; r < 4; ++r)
      rowsum[r] = _mm_cvtsi128_si64(*sv[r]) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(*sv[r], *sv[r]));
  }
  shift_a_rows(codes, ldc, mr, j0, lc, kg, lut, dst, rowsum);
}

// Four whole rows of v and 16 channels at a time: a byte transpose [4][16] -> [16][4] with two unpack levels.
void shift_b_avx2(const uint8_t* v, int64_t ldv, int64_t n, int64_t lc, int64_t kg, uint8_t vxor, int8_t* dst) {
  const int64_t full_g = lc / 4, full_pan = n / 16, npan = (n + 15) / 16;
  const __m128i flip = _mm_set1_epi8(static_cast<char>(vxor));
  for (int64_t g = 0; g < full_g; ++g) {
    const uint8_t* r = v + 4 * g * ldv;
    for (int64_t pn = 0; pn < full_pan; ++pn) {
      const __m128i a0 = _mm_xor_si128(flip, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + pn * 16)));
      const __m128i a1 = _mm_xor_si128(flip, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + ldv + pn * 16)));
      const __m128i a2 = _mm_xor_si128(flip, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * ldv + pn * 16)));
      const __m128i a3 = _mm_xor_si128(flip, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 3 * ldv + pn * 16)));
      const __m128i b0 = _mm_unpacklo_epi8(a0, a1), b1 = _mm_unpackhi_epi8(a0, a1);
      const __m128i b2 = _mm_unpacklo_epi8(a2, a3), b3 = _mm_unpackhi_epi8(a2, a3);
      __m128i* d = reinterpret_cast<__m128i*>(dst + (pn * kg + g) * 64);
      _mm_storeu_si128(d + 0, _mm_unpacklo_epi16(b0, b2));
      _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(b0, b2));
      _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(b1, b3));
      _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(b1, b3));
    }
    if (full_pan < npan) {  // the channel tail of this k-group
      int8_t* d = dst + (full_pan * kg + g) * 64;
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t c = 0; c < 16; ++c)
          d[c * 4 + q] = full_pan * 16 + c < n ? static_cast<int8_t>(r[q * ldv + full_pan * 16 + c] ^ vxor) : 0;
    }
  }
  shift_b_rows(v, ldv, n, lc, full_g, kg, vxor, dst);
}

// int32 differences widened to int64, multiplied by mul (< 2^31, vpmuldq) and shifted left by sh.
void shift_acc_avx2(const int32_t* tile, int mr, const int32_t* corr, int64_t mul, int sh, int64_t* acc) {
  const __m256i m = _mm256_set1_epi64x(mul);
  const __m128i cnt = _mm_cvtsi32_si128(sh);
  for (int r = 0; r < mr; ++r) {
    const __m256i c = _mm256_set1_epi32(corr[r]);
    for (int h = 0; h < 2; ++h) {
      const __m256i d = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + r * 16 + 8 * h)), c);
      const __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(d));
      const __m256i hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(d, 1));
      __m256i* a = reinterpret_cast<__m256i*>(acc + r * 16 + 8 * h);
      _mm256_storeu_si256(a, _mm256_add_epi64(_mm256_loadu_si256(a), _mm256_sll_epi64(_mm256_mul_epi32(lo, m), cnt)));
      _mm256_storeu_si256(a + 1,
                          _mm256_add_epi64(_mm256_loadu_si256(a + 1), _mm256_sll_epi64(_mm256_mul_epi32(hi, m), cnt)));
    }
  }
}

// deep_add_impl on 8 lanes: bytes widened to int32, the rounding shift and the product in int32, widened to add.
void deep_add_avx2(const uint8_t* vr, int64_t nc, uint8_t vxor, int32_t zvp, int sft, int32_t mul, int64_t* acc) {
  const __m256i off = _mm256_set1_epi32((int32_t(1) << (sft - 1)) - zvp), m = _mm256_set1_epi32(mul);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(vxor)), cnt = _mm_cvtsi32_si128(sft);
  int64_t c = 0;
  for (; c + 8 <= nc; c += 8) {
    const __m128i b = _mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vr + c)), flip);
    const __m256i t = _mm256_mullo_epi32(_mm256_sra_epi32(_mm256_add_epi32(_mm256_cvtepi8_epi32(b), off), cnt), m);
    __m256i* a = reinterpret_cast<__m256i*>(acc + c);
    _mm256_storeu_si256(a, _mm256_add_epi64(_mm256_loadu_si256(a), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(t))));
    _mm256_storeu_si256(a + 1, _mm256_add_epi64(_mm256_loadu_si256(a + 1),
                                                _mm256_cvtepi32_epi64(_mm256_extracti128_si256(t, 1))));
  }
  deep_add_impl(vr + c, nc - c, vxor, zvp, sft, mul, acc + c);
}

// shift_requant_one on 4 int64 lanes: vpmuldq forms A * M0 (A = the high dword, sign-extended by the
// instruction), vpmuludq forms B * M0; the arithmetic shift is ~((~x) >>> n) for negative x (AVX2 has no vpsraq).
void shift_requant_avx2(const int64_t* r, int64_t nc, const int32_t* mult, const int32_t* shift, int32_t zy, int32_t lo,
                        int32_t hi, bool s8, void* out) {
  const __m256i one = _mm256_set1_epi64x(1), zero = _mm256_setzero_si256();
  const __m256i c33 = _mm256_set1_epi64x(33), c32 = _mm256_set1_epi64x(32);
  const __m256i lo4 = _mm256_set1_epi64x(static_cast<int64_t>(lo) - zy), hi4 = _mm256_set1_epi64x(static_cast<int64_t>(hi) - zy);
  const __m256i zy4 = _mm256_set1_epi64x(zy);
  int64_t c = 0;
  alignas(32) int64_t y[4];
  for (; c + 4 <= nc; c += 4) {
    const __m256i rv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + c));
    const __m256i m = _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mult + c)));
    const __m256i s = _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(shift + c)));
    const __m256i p1 = _mm256_mul_epi32(_mm256_srli_epi64(rv, 32), m);
    const __m256i h0 = _mm256_srli_epi64(_mm256_mul_epu32(rv, m), 32);
    const __m256i x = _mm256_add_epi64(_mm256_add_epi64(p1, h0), _mm256_sllv_epi64(one, _mm256_sub_epi64(s, c33)));
    const __m256i sgn = _mm256_cmpgt_epi64(zero, x);
    __m256i q = _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(x, sgn), _mm256_sub_epi64(s, c32)), sgn);
    q = _mm256_blendv_epi8(q, lo4, _mm256_cmpgt_epi64(lo4, q));
    q = _mm256_blendv_epi8(q, hi4, _mm256_cmpgt_epi64(q, hi4));
    _mm256_store_si256(reinterpret_cast<__m256i*>(y), _mm256_add_epi64(q, zy4));
    if (s8)
      for (int i = 0; i < 4; ++i) static_cast<int8_t*>(out)[c + i] = static_cast<int8_t>(y[i]);
    else
      for (int i = 0; i < 4; ++i) static_cast<uint8_t*>(out)[c + i] = static_cast<uint8_t>(y[i]);
  }
  shift_requant_rows(r, c, nc, mult, shift, zy, lo, hi, s8, out);
}

}  // namespace

const KernelSet& avx2_kernels() {
  static const KernelSet ks = [] {
    KernelSet k{};
    k.isa = Isa::Avx2;
    k.ukr[0] = nullptr;
    k.ukr[1] = ukr_avx2<1>;
    k.ukr[2] = ukr_avx2<2>;
    k.ukr[3] = ukr_avx2<3>;
    k.ukr[4] = ukr_avx2<4>;
    k.epi = epi_avx2;
    k.unpack4 = unpack4_avx2;
    k.pack_a = pack_a_avx2;
    k.ukr4[1] = ukr4_avx2<1>;
    k.ukr4[2] = ukr4_avx2<2>;
    k.ukr4[3] = ukr4_avx2<3>;
    k.ukr4[4] = ukr4_avx2<4>;
    k.ukr4_nib[1] = ukr4_nib_avx2<1>;
    k.ukr4_nib[2] = ukr4_nib_avx2<2>;
    k.ukr4_nib[3] = ukr4_nib_avx2<3>;
    k.ukr4_nib[4] = ukr4_nib_avx2<4>;
    k.requant_run = requant_run_impl;
    k.profile_run = profile_run_impl;
    QSIM_MR_TABLE(k.ukr_shift, ukr_shift_avx2);
    k.shift_a = shift_a_avx2;
    k.shift_b = shift_b_avx2;
    k.shift_acc = shift_acc_avx2;
    k.deep_add = deep_add_avx2;
    k.shift_f32 = shift_f32_impl;
    k.shift_requant = shift_requant_avx2;
    return k;
  }();
  return ks;
}

}  // namespace detail
}  // namespace qsim
