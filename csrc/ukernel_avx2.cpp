// AVX2 kernels (compiled with -mavx2 only: no FMA, -ffp-contract=off). Entered only after the
// runtime CPU check in runtime.cpp. No std:: templates in this TU (see generic_impl.h).
//
// Exactness without VNNI (docs/spec.md §10): activations arrive as x' in [-128, 127] (uint8 shifted
// by -128 in packing). The sign-path micro-kernel computes, per 4-byte k-group,
//     vpmaddubsw(|x'|, sign(w, x'))      |x'| <= 128 read as unsigned; sign(w, x') = w * sgn(x')
// which equals x'*w pairwise; with w in [-127, 127] every pair sum is at most 2*128*127 = 32512, so
// the int16 saturation of vpmaddubsw never triggers. vpmaddwd with ones widens pairs to int32 exactly
// and vpaddd accumulates modulo 2^32 (§4.1). Weight panels that contain -128 use ukr_wide: bytes are
// sign-extended to int16 and multiplied by vpmaddwd (int16 x int16 -> int32, exact for all codes).
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

// ------------------------------------------------------------------------------ sign-path micro-kernel
template <int MR>
void ukr_avx2(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_si256();
  for (int64_t g = 0; g < kg; ++g) {
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + 32));
    for (int r = 0; r < MR; ++r) {
      const __m256i x = bcast32(a + 4 * r);
      const __m256i ax = _mm256_abs_epi8(x);
      const __m256i p0 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(b0, x));
      const __m256i p1 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(b1, x));
      c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(p0, ones));
      c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(p1, ones));
    }
    a += 4 * MR;
    b += 64;
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(tile + r * kNR), c0[r]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(tile + r * kNR + 8), c1[r]);
  }
}

// ------------------------------------------------------------------------------ exact int16 path (-128)
// B bytes [c][k0..k3] for 4 channels -> 16 int16; A's 4 codes as int16 broadcast to every 64-bit
// lane; vpmaddwd gives, per channel, (k0,k1) and (k2,k3) partial sums in adjacent int32 lanes.
template <int MR>
void ukr_wide_half(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile, int half) {
  __m256i lo[MR], hi[MR];  // channels 8h+0..3 and 8h+4..7
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  b += 32 * half;
  for (int64_t g = 0; g < kg; ++g) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    for (int r = 0; r < MR; ++r) {
      int32_t v;
      std::memcpy(&v, a + 4 * r, 4);
      const __m128i x16 = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(v));
      const __m256i x = _mm256_broadcastq_epi64(x16);
      lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(w0, x));
      hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(w1, x));
    }
    a += 4 * MR;
    b += 64;
  }
  for (int r = 0; r < MR; ++r) {
    // hadd -> [c0 c1 c4 c5 | c2 c3 c6 c7]; permute 64-bit lanes (0,2,1,3) -> c0..c7
    const __m256i h = _mm256_hadd_epi32(lo[r], hi[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * kNR + 8 * half), _mm256_permute4x64_epi64(h, 0xD8));
  }
}

template <int MR>
void ukr_wide(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile) {
  ukr_wide_half<MR>(a, b, kg, tile, 0);
  ukr_wide_half<MR>(a, b, kg, tile, 1);
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

// requantize 8 channels starting at n (per-channel m/sh/rnd as int64)
inline __m256i requant8(const Epi& e, int64_t n, __m256i a1, const __m256i* a2) {
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

void epi_avx2(const Epi& e, int64_t n0, int mr, int nc, const int32_t* t1, const int32_t* rs1, const int32_t* t2,
              const int32_t* rs2, const TileOut& o) {
  alignas(32) int32_t ibuf[kMR * kNR];
  alignas(32) float fbuf[kMR * kNR];
  alignas(16) uint8_t bbuf[kMR * kNR];
  const bool requant = is_requant(e.type);
  const bool is_signed8 = e.type == OutType::S8 || e.type == OutType::S4;
  for (int r = 0; r < mr; ++r) {
    __m256i v[2], w[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t n = n0 + 8 * h;
      v[h] = corrected(t1 + r * kNR + 8 * h, e.colc1 + n, e.zw1 ? e.zw1 + n : nullptr, rs1 ? rs1[r] : 0);
      if (e.split)
        w[h] = corrected(t2 + r * kNR + 8 * h, e.colc2 + n, e.zw2 ? e.zw2 + n : nullptr, rs2 ? rs2[r] : 0);
    }
    if (e.type == OutType::I32) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(ibuf + r * kNR), v[0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ibuf + r * kNR + 8), v[1]);
    } else if (e.type == OutType::F32) {
      for (int h = 0; h < 2; ++h) {
        const int64_t n = n0 + 8 * h;
        __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(v[h]), _mm256_loadu_ps(e.s1 + n));
        if (e.split) f = _mm256_add_ps(f, _mm256_mul_ps(_mm256_cvtepi32_ps(w[h]), _mm256_loadu_ps(e.s2 + n)));
        _mm256_store_ps(fbuf + r * kNR + 8 * h, f);
      }
    } else if (requant) {
      __m256i y[2];
      for (int h = 0; h < 2; ++h) y[h] = requant8(e, n0 + 8 * h, v[h], e.split ? &w[h] : nullptr);
      // values are already inside the output range: the saturating packs are plain narrowing
      const __m256i s16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(y[0], y[1]), 0xD8);
      const __m128i l = _mm256_castsi256_si128(s16), hh = _mm256_extracti128_si256(s16, 1);
      const __m128i bytes = is_signed8 ? _mm_packs_epi16(l, hh) : _mm_packus_epi16(l, hh);
      _mm_store_si128(reinterpret_cast<__m128i*>(bbuf + r * kNR), bytes);
    }
  }
  // write out: contiguous channels (GEMM) or contiguous rows (conv, NCHW)
  const int64_t esz = requant ? 1 : 4;
  const uint8_t* src = requant ? bbuf : (e.type == OutType::F32 ? reinterpret_cast<const uint8_t*>(fbuf)
                                                                 : reinterpret_cast<const uint8_t*>(ibuf));
  uint8_t* dst = static_cast<uint8_t*>(o.out);
  if (o.ldn == 1) {
    for (int r = 0; r < mr; ++r)
      std::memcpy(dst + r * o.ldm * esz, src + r * kNR * esz, static_cast<size_t>(nc * esz));
  } else {
    for (int c = 0; c < nc; ++c)
      for (int r = 0; r < mr; ++r)
        std::memcpy(dst + (r * o.ldm + c * o.ldn) * esz, src + (r * kNR + c) * esz, static_cast<size_t>(esz));
  }
}

// ------------------------------------------------------------------------------ packing helpers
void unpack4_avx2(const uint8_t* src, int64_t kg, bool is_signed, uint8_t* dst) {
  const __m256i m = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  for (int64_t g8 = 0; g8 < kg / 2; ++g8) {
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(src + g8 * 64 + 32 * h));
      __m256i lo = _mm256_and_si256(v, m);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
      if (is_signed) {
        lo = _mm256_sub_epi8(_mm256_xor_si256(lo, eight), eight);
        hi = _mm256_sub_epi8(_mm256_xor_si256(hi, eight), eight);
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (2 * g8) * 64 + 32 * h), lo);
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + (2 * g8 + 1) * 64 + 32 * h), hi);
    }
  }
}

void pack_a_avx2(const uint8_t* x, int64_t ldx, int mr, int64_t k, int64_t kg, uint8_t mask, int8_t* dst,
                 int32_t* rowsum) {
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
      __m256i* d = reinterpret_cast<__m256i*>(dst + j0 * kMR);
      _mm256_storeu_si256(d + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
      _mm256_storeu_si256(d + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
      _mm256_storeu_si256(d + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
      _mm256_storeu_si256(d + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
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
      dst[(j >> 2) * mr * 4 + r * 4 + (j & 3)] = v;
      s += v;
    }
    rowsum[r] = static_cast<int32_t>(s);
  }
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
    k.ukr_wide[0] = nullptr;
    k.ukr_wide[1] = ukr_wide<1>;
    k.ukr_wide[2] = ukr_wide<2>;
    k.ukr_wide[3] = ukr_wide<3>;
    k.ukr_wide[4] = ukr_wide<4>;
    k.epi = epi_avx2;
    k.unpack4 = unpack4_avx2;
    k.pack_a = pack_a_avx2;
    k.requant_run = requant_run_impl;
    k.log2_rows = log2_rows_impl;
    return k;
  }();
  return ks;
}

}  // namespace detail
}  // namespace qsim
