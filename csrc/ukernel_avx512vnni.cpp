// AVX-512 VNNI micro-kernels (compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vnni; entered only after the runtime
// CPU check in runtime.cpp). Everything else in this ISA's kernel table is the AVX2 one.
//
// Exactness (docs/spec.md §10.7): vpdpbusd adds four products u * w (u uint8, w int8) to an int32 lane with a
// wrapping add and no intermediate saturation: each product fits 17 bits and the four-product sum 19 bits, so the
// lane receives the exact sum modulo 2^32, which is §4.1's accumulator. The int8 sign path of §10.1 is therefore
// not needed: the tile is sum u * w with u = x' + 128 (the A panel's second half, which this ISA's pack_a always
// fills with u) and the driver's epilogue constants subtract 128 * colsum (fill_branch_consts with a u tile).
// A 16-channel k-group of the B panel is one 64-byte vector; a row's 4 bytes of u are broadcast.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace qsim {
namespace detail {
namespace {

inline __m512i bcast32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// tile[r][0..15] = sum over kg k-groups of u(a row r) . b, with a's k-group stride AStep bytes and row r's four
// bytes at offset AOff + 4 r. Even and odd k-groups go to separate accumulators (2 * MR in flight hide the
// instruction's latency) and are added at the end (mod 2^32, as every lane sum).
template <int MR, int AStep, int AOff>
inline void dp_tile(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile) {
  __m512i e0 = _mm512_setzero_si512(), e1 = e0, e2 = e0, e3 = e0, o0 = e0, o1 = e0, o2 = e0, o3 = e0;
  const int8_t* ag = a + AOff;
  int64_t g = 0;
  for (; g + 2 <= kg; g += 2) {
    const __m512i b0 = _mm512_loadu_si512(b);
    const __m512i b1 = _mm512_loadu_si512(b + 64);
    e0 = _mm512_dpbusd_epi32(e0, bcast32(ag), b0);
    if (MR > 1) e1 = _mm512_dpbusd_epi32(e1, bcast32(ag + 4), b0);
    if (MR > 2) e2 = _mm512_dpbusd_epi32(e2, bcast32(ag + 8), b0);
    if (MR > 3) e3 = _mm512_dpbusd_epi32(e3, bcast32(ag + 12), b0);
    o0 = _mm512_dpbusd_epi32(o0, bcast32(ag + AStep), b1);
    if (MR > 1) o1 = _mm512_dpbusd_epi32(o1, bcast32(ag + AStep + 4), b1);
    if (MR > 2) o2 = _mm512_dpbusd_epi32(o2, bcast32(ag + AStep + 8), b1);
    if (MR > 3) o3 = _mm512_dpbusd_epi32(o3, bcast32(ag + AStep + 12), b1);
    ag += 2 * AStep;
    b += 128;
  }
  if (g < kg) {
    const __m512i b0 = _mm512_loadu_si512(b);
    e0 = _mm512_dpbusd_epi32(e0, bcast32(ag), b0);
    if (MR > 1) e1 = _mm512_dpbusd_epi32(e1, bcast32(ag + 4), b0);
    if (MR > 2) e2 = _mm512_dpbusd_epi32(e2, bcast32(ag + 8), b0);
    if (MR > 3) e3 = _mm512_dpbusd_epi32(e3, bcast32(ag + 12), b0);
  }
  _mm512_storeu_si512(tile, _mm512_add_epi32(e0, o0));
  if (MR > 1) _mm512_storeu_si512(tile + 16, _mm512_add_epi32(e1, o1));
  if (MR > 2) _mm512_storeu_si512(tile + 32, _mm512_add_epi32(e2, o2));
  if (MR > 3) _mm512_storeu_si512(tile + 48, _mm512_add_epi32(e3, o3));
}

// int8 weights and 4-bit stored codes alike: tile = sum u * w over the A panel [kg][2][MR][4] (u in the second half).
template <int MR>
void ukr_vnni(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile) {
  dp_tile<MR, 8 * MR, 4 * MR>(a, b, kg, tile);
}

// NP panels at once: MR * NP accumulators (16 at most) share each broadcast row, and each B vector serves MR rows.
// A layout as dp_tile (k-group stride AStep, row r at AOff + 4 r).
template <int MR, int NP, int AStep, int AOff>
inline void dp_wide(const int8_t* a, const uint8_t* b, int64_t bstride, int64_t kg, int32_t* tiles) {
  __m512i acc[MR][NP];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_si512();
  const int8_t* ag = a + AOff;
  for (int64_t g = 0; g < kg; ++g) {
    __m512i bv[NP];
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) bv[j] = _mm512_loadu_si512(b + j * bstride + g * 64);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m512i av = bcast32(ag + 4 * r);
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, bv[j]);
    }
    ag += AStep;
  }
#pragma GCC unroll 4
  for (int j = 0; j < NP; ++j)
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) _mm512_storeu_si512(tiles + j * 64 + r * 16, acc[r][j]);
}

template <int MR, int AStep, int AOff>
inline void wide_np(const int8_t* a, const uint8_t* b, int64_t bstride, int np, int64_t kg, int32_t* tiles) {
  switch (np) {
    case 4: dp_wide<MR, 4, AStep, AOff>(a, b, bstride, kg, tiles); break;
    case 3: dp_wide<MR, 3, AStep, AOff>(a, b, bstride, kg, tiles); break;
    case 2: dp_wide<MR, 2, AStep, AOff>(a, b, bstride, kg, tiles); break;
    default: dp_tile<MR, AStep, AOff>(a, b, kg, tiles); break;
  }
}

template <int MR>
void ukr_wide_vnni(const int8_t* a, const uint8_t* b, int64_t bstride, int np, int64_t kg, int32_t* tiles) {
  wide_np<MR, 8 * MR, 4 * MR>(a, b, bstride, np, kg, tiles);
}

// §7 shift weights: tile = sum a * v with a in [0, 128] (A panel [kg][MR][4], no second half), v int8.
template <int MR>
void ukr_shift_wide_vnni(const int8_t* a, const uint8_t* b, int64_t bstride, int np, int64_t kg, int32_t* tiles) {
  wide_np<MR, 4 * MR, 0>(a, b, bstride, np, kg, tiles);
}

// §7 A panel of four rows: 64 codes per row at a time through the window's table (as shift_a_avx2), the 4 x 4
// transpose of 32-bit groups inside each 128-bit lane, then a 4 x 4 transpose of the lanes into [g][4 rows][4]
// order; masked loads and stores cover the tail and the zero padding up to kg groups. Other shapes: the AVX2 code.
void shift_a_vnni(const uint8_t* codes, int64_t ldc, int mr, int64_t lc, int64_t kg, const uint8_t* lut, int win,
                  uint8_t* dst, int64_t* rowsum) {
  if (win < 0 || mr != kMR) return avx2_kernels().shift_a(codes, ldc, mr, lc, kg, lut, win, dst, rowsum);
  const __m512i tab = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + win)));
  const __m512i base = _mm512_set1_epi8(static_cast<char>(win)), bias = _mm512_set1_epi8(0x70);
  const __m512i zero = _mm512_setzero_si512();
  __m512i s[4] = {zero, zero, zero, zero};
  for (int64_t j = 0; j < 4 * kg; j += 64) {
    const int64_t left = lc - j;
    const __mmask64 m = left >= 64 ? ~__mmask64(0) : left > 0 ? (__mmask64(1) << left) - 1 : 0;
    __m512i w[4];
    for (int r = 0; r < 4; ++r) {
      const __m512i c = _mm512_maskz_loadu_epi8(m, codes + r * ldc + j);
      w[r] = _mm512_maskz_shuffle_epi8(m, tab, _mm512_adds_epu8(_mm512_sub_epi8(c, base), bias));
      s[r] = _mm512_add_epi64(s[r], _mm512_sad_epu8(w[r], zero));
    }
    // lane k of d[q] holds group 4k + q of the four rows
    const __m512i t0 = _mm512_unpacklo_epi32(w[0], w[1]), t1 = _mm512_unpacklo_epi32(w[2], w[3]);
    const __m512i t2 = _mm512_unpackhi_epi32(w[0], w[1]), t3 = _mm512_unpackhi_epi32(w[2], w[3]);
    const __m512i d0 = _mm512_unpacklo_epi64(t0, t1), d1 = _mm512_unpackhi_epi64(t0, t1);
    const __m512i d2 = _mm512_unpacklo_epi64(t2, t3), d3 = _mm512_unpackhi_epi64(t2, t3);
    const __m512i u0 = _mm512_shuffle_i64x2(d0, d1, 0x44), u1 = _mm512_shuffle_i64x2(d0, d1, 0xEE);
    const __m512i u2 = _mm512_shuffle_i64x2(d2, d3, 0x44), u3 = _mm512_shuffle_i64x2(d2, d3, 0xEE);
    const __m512i out[4] = {_mm512_shuffle_i64x2(u0, u2, 0x88), _mm512_shuffle_i64x2(u0, u2, 0xDD),
                            _mm512_shuffle_i64x2(u1, u3, 0x88), _mm512_shuffle_i64x2(u1, u3, 0xDD)};
    for (int q = 0; q < 4; ++q) {  // groups j / 4 + 4q .. + 3, 64 bytes, of which those below kg are stored
      const int64_t bytes = (kg - (j / 4 + 4 * q)) * 16;
      if (bytes <= 0) break;
      const __mmask64 sm = bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
      _mm512_mask_storeu_epi8(dst + (j / 4 + 4 * q) * 16, sm, out[q]);
    }
  }
  // one store of the four sums: the caller's wider loads of them are then forwarded from it
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(rowsum),
                      _mm256_setr_epi64x(_mm512_reduce_add_epi64(s[0]), _mm512_reduce_add_epi64(s[1]),
                                         _mm512_reduce_add_epi64(s[2]), _mm512_reduce_add_epi64(s[3])));
}

// 16 rows x 64 bytes at a time: a 16 x 16 transpose of 32-bit groups (unpack within lanes, then two lane
// shuffles) gives the 16 k-groups' panel rows; vpsadbw of the bytes ^ 0x80 gives each row's int8 sum plus 128 per
// byte (padding bytes, 0, count 128 - 128).
void pack_rows16_vnni(const uint8_t* src, int64_t ld, int64_t k, uint8_t xor_mask, int64_t kg, uint8_t* pan,
                      int32_t* colsum) {
  const __m512i x = _mm512_set1_epi8(static_cast<char>(xor_mask)), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i zero = _mm512_setzero_si512();
  __m512i sums[16];
  for (int r = 0; r < 16; ++r) sums[r] = zero;
  int64_t chunks = 0;
  for (int64_t j = 0; j < 4 * kg; j += 64, ++chunks) {
    const int64_t left = k - j;
    const __mmask64 m = left >= 64 ? ~__mmask64(0) : left > 0 ? (__mmask64(1) << left) - 1 : 0;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      r[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, src + i * ld + j), _mm512_maskz_mov_epi8(m, x));
      sums[i] = _mm512_add_epi64(sums[i], _mm512_sad_epu8(_mm512_xor_si512(r[i], flip), zero));
    }
    // 4 x 4 transposes of dwords inside each 128-bit lane, for row groups 0-3, 4-7, 8-11, 12-15
    __m512i t[16];
    for (int q = 0; q < 16; q += 4) {
      const __m512i a0 = _mm512_unpacklo_epi32(r[q], r[q + 1]), a1 = _mm512_unpackhi_epi32(r[q], r[q + 1]);
      const __m512i a2 = _mm512_unpacklo_epi32(r[q + 2], r[q + 3]), a3 = _mm512_unpackhi_epi32(r[q + 2], r[q + 3]);
      t[q] = _mm512_unpacklo_epi64(a0, a2);      // lane L: group 4L of rows q..q+3
      t[q + 1] = _mm512_unpackhi_epi64(a0, a2);  // group 4L + 1
      t[q + 2] = _mm512_unpacklo_epi64(a1, a3);  // group 4L + 2
      t[q + 3] = _mm512_unpackhi_epi64(a1, a3);  // group 4L + 3
    }
    // output vector for group 4L + s: lane q of it = lane L of t[4q + s]
    for (int s = 0; s < 4; ++s) {
      const __m512i u0 = _mm512_shuffle_i32x4(t[s], t[4 + s], 0x44);        // L0 of rows 0-3, L1 of 0-3, L0/L1 of 4-7
      const __m512i u1 = _mm512_shuffle_i32x4(t[8 + s], t[12 + s], 0x44);   // the same for rows 8-15
      const __m512i u2 = _mm512_shuffle_i32x4(t[s], t[4 + s], 0xEE);        // L2, L3
      const __m512i u3 = _mm512_shuffle_i32x4(t[8 + s], t[12 + s], 0xEE);
      const __m512i g[4] = {_mm512_shuffle_i32x4(u0, u1, 0x88), _mm512_shuffle_i32x4(u0, u1, 0xDD),
                            _mm512_shuffle_i32x4(u2, u3, 0x88), _mm512_shuffle_i32x4(u2, u3, 0xDD)};
      for (int L = 0; L < 4; ++L) {
        const int64_t grp = j / 4 + 4 * L + s;
        if (grp < kg) _mm512_storeu_si512(pan + grp * 64, g[L]);
      }
    }
  }
  for (int i = 0; i < 16; ++i)
    colsum[i] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi64(sums[i])) -
                                     static_cast<uint32_t>(128 * 64 * chunks));
}

// §7: acc[r * 16 + c] += int64(tile - corr[r]) * mul * 2^sh, one row of 16 per pair of 8-lane int64 vectors.
void shift_acc_vnni(const int32_t* tile, int mr, const int32_t* corr, int64_t mul, int sh, int64_t* acc) {
  const __m512i m = _mm512_set1_epi64(mul);
  const __m128i cnt = _mm_cvtsi32_si128(sh);
  for (int r = 0; r < mr; ++r) {
    const __m512i d = _mm512_sub_epi32(_mm512_loadu_si512(tile + r * 16), _mm512_set1_epi32(corr[r]));
    const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(d));
    const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(d, 1));
    int64_t* a = acc + r * 16;
    _mm512_storeu_si512(a, _mm512_add_epi64(_mm512_loadu_si512(a), _mm512_sll_epi64(_mm512_mul_epi32(lo, m), cnt)));
    _mm512_storeu_si512(a + 8,
                        _mm512_add_epi64(_mm512_loadu_si512(a + 8), _mm512_sll_epi64(_mm512_mul_epi32(hi, m), cnt)));
  }
}

// §7 float32 output on 8 lanes: VCVTQQ2PS rounds to nearest even (MXCSR default, as the scalar conversion), then
// one multiply.
void shift_f32_vnni(const int64_t* r, int64_t nc, const float* scale, float* y) {
  int64_t c = 0;
  for (; c + 8 <= nc; c += 8) {
    const __m256 f = _mm512_cvtepi64_ps(_mm512_loadu_si512(r + c));
    _mm256_storeu_ps(y + c, _mm256_mul_ps(f, _mm256_loadu_ps(scale + c)));
  }
  for (; c < nc; ++c) {
    const float fr = static_cast<float>(r[c]);
    y[c] = fr * scale[c];
  }
}

// shift_requant_one (kernels.h) on 8 int64 lanes R, before the clamp: vpmuldq forms A * M0 (A = the high dword),
// vpmuludq B * M0; rnd = 2^(S-33) and sh32 = S - 32 per lane.
inline __m512i requant_wide(__m512i r, __m512i m, __m512i sh32, __m512i rnd) {
  const __m512i p1 = _mm512_mul_epi32(_mm512_srli_epi64(r, 32), m);
  const __m512i h0 = _mm512_srli_epi64(_mm512_mul_epu32(r, m), 32);
  return _mm512_srav_epi64(_mm512_add_epi64(_mm512_add_epi64(p1, h0), rnd), sh32);
}

enum ShiftKind { kToI64, kToF32, kToRequant };

// shift_out_vnni for NP passes (0: st.n at run time) and one kind of output stage. A tile row's 16 channels are
// taken as two sets of 8 int64 lanes, the even channels (the low dword of each 64-bit lane, as VPMULDQ reads it) and
// the odd ones (shifted down), and put back in channel order after the output stage.
template <int NP, int Kind>
void shift_out_rows(const ShiftTiles& st, int mr, int nc, const ShiftStage& so, int64_t c0, void* y, int64_t ldy) {
  const int np = NP > 0 ? NP : st.n;
  __m512i mul[kShiftTiles];
  __m128i cnt[kShiftTiles];
  bool any_sh = false;
  for (int i = 0; i < np; ++i) {
    mul[i] = _mm512_set1_epi64(st.mul[i]);
    cnt[i] = _mm_cvtsi32_si128(st.sh[i]);
    any_sh = any_sh || st.sh[i] != 0;
  }
  const __mmask16 m16 = nc >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << nc) - 1);
  // even channels 0, 2, .., 14 then odd 1, .., 15 -> channel order: of dwords, of two qword halves, and of the low
  // dwords of two qword vectors
  const __m512i to_order32 = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i to_order_lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i to_order_hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512i low_dwords = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  const __m512i zero = _mm512_setzero_si512();
  __m512i mv[2] = {zero, zero}, sv[2] = {zero, zero}, rv[2] = {zero, zero}, lo8 = zero, hi8 = zero, zy16 = zero;
  __m512 fs = _mm512_setzero_ps();
  __m128i fold = _mm_setzero_si128();
  if (Kind == kToRequant) {
    for (int h = 0; h < 2; ++h) {
      mv[h] = _mm512_loadu_si512(so.mult + c0 + 8 * h);
      sv[h] = _mm512_loadu_si512(so.sh32 + c0 + 8 * h);
      rv[h] = _mm512_loadu_si512(so.rnd + c0 + 8 * h);
    }
    lo8 = _mm512_set1_epi64(so.lo);
    hi8 = _mm512_set1_epi64(so.hi);
    zy16 = _mm512_set1_epi32(so.zy);
  } else if (Kind == kToF32) {
    fs = _mm512_maskz_loadu_ps(m16, so.scale + c0);
  } else {
    fold = _mm_cvtsi32_si128(so.fold);
  }
  for (int r = 0; r < mr; ++r) {
    __m512i acc[2] = {zero, zero};  // R' of the even and the odd channels
    for (int i = 0; i < np; ++i) {
      const __m512i d = _mm512_sub_epi32(_mm512_loadu_si512(st.t[i] + r * 16), _mm512_set1_epi32(st.corr[i][r]));
      __m512i pe = _mm512_mul_epi32(d, mul[i]), po = _mm512_mul_epi32(_mm512_srli_epi64(d, 32), mul[i]);
      if (any_sh) {
        pe = _mm512_sll_epi64(pe, cnt[i]);
        po = _mm512_sll_epi64(po, cnt[i]);
      }
      acc[0] = i ? _mm512_add_epi64(acc[0], pe) : pe;
      acc[1] = i ? _mm512_add_epi64(acc[1], po) : po;
    }
    if (Kind == kToI64) {
      const __m512i e = _mm512_sll_epi64(acc[0], fold), o = _mm512_sll_epi64(acc[1], fold);
      int64_t* yr = static_cast<int64_t*>(y) + r * ldy;
      _mm512_mask_storeu_epi64(yr, static_cast<__mmask8>(m16), _mm512_permutex2var_epi64(e, to_order_lo, o));
      _mm512_mask_storeu_epi64(yr + 8, static_cast<__mmask8>(m16 >> 8), _mm512_permutex2var_epi64(e, to_order_hi, o));
    } else if (Kind == kToF32) {
      // VCVTQQ2PS rounds to nearest even (MXCSR default, as the scalar conversion); then one multiply
      const __m512 f =
          _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(acc[0])), _mm512_cvtepi64_ps(acc[1]), 1);
      _mm512_mask_storeu_ps(static_cast<float*>(y) + r * ldy, m16,
                            _mm512_mul_ps(_mm512_permutexvar_ps(to_order32, f), fs));
    } else {
      __m512i q[2];
      for (int h = 0; h < 2; ++h)
        q[h] = _mm512_min_epi64(_mm512_max_epi64(requant_wide(acc[h], mv[h], sv[h], rv[h]), lo8), hi8);
      // the clamped values fit in 32 bits: their low dwords, in channel order, plus zy
      const __m512i d = _mm512_add_epi32(_mm512_permutex2var_epi32(q[0], low_dwords, q[1]), zy16);
      uint8_t* yr = static_cast<uint8_t*>(y) + r * ldy;
      if (nc >= 16)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(yr), _mm512_cvtepi32_epi8(d));
      else
        _mm512_mask_cvtepi32_storeu_epi8(yr, m16, d);
    }
  }
}

template <int Kind>
void shift_out_kind(const ShiftTiles& st, int mr, int nc, const ShiftStage& so, int64_t c0, void* y, int64_t ldy) {
  switch (st.n) {  // one and two passes (one exponent band of each class) are the usual cases
    case 1: return shift_out_rows<1, Kind>(st, mr, nc, so, c0, y, ldy);
    case 2: return shift_out_rows<2, Kind>(st, mr, nc, so, c0, y, ldy);
    default: return shift_out_rows<0, Kind>(st, mr, nc, so, c0, y, ldy);
  }
}

// §7: the ShiftTiles sums through the output stage, a 16-channel tile row at a time (KernelSet::shift_out).
void shift_out_vnni(const ShiftTiles& st, int mr, int nc, const ShiftStage& so, int64_t c0, void* y, int64_t ldy) {
  if (so.type == OutType::I64)
    shift_out_kind<kToI64>(st, mr, nc, so, c0, y, ldy);
  else if (so.type == OutType::F32)
    shift_out_kind<kToF32>(st, mr, nc, so, c0, y, ldy);
  else
    shift_out_kind<kToRequant>(st, mr, nc, so, c0, y, ldy);
}

// shift_requant_one (kernels.h) on 8 int64 lanes (requant_wide; AVX-512 has the 64-bit min/max).
void shift_requant_vnni(const int64_t* r, int64_t nc, const int32_t* mult, const int32_t* shift, int32_t zy, int32_t lo,
                        int32_t hi, bool s8, void* out) {
  const __m512i one = _mm512_set1_epi64(1), c33 = _mm512_set1_epi64(33), c32 = _mm512_set1_epi64(32);
  const __m512i lo8 = _mm512_set1_epi64(static_cast<int64_t>(lo) - zy), hi8 = _mm512_set1_epi64(static_cast<int64_t>(hi) - zy);
  const __m512i zy8 = _mm512_set1_epi64(zy);
  int64_t c = 0;
  for (; c + 8 <= nc; c += 8) {
    const __m512i rv = _mm512_loadu_si512(r + c);
    const __m512i m = _mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mult + c)));
    const __m512i s = _mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(shift + c)));
    __m512i q = requant_wide(rv, m, _mm512_sub_epi64(s, c32), _mm512_sllv_epi64(one, _mm512_sub_epi64(s, c33)));
    q = _mm512_add_epi64(_mm512_min_epi64(_mm512_max_epi64(q, lo8), hi8), zy8);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(out) + c), _mm512_cvtepi64_epi8(q));
  }
  if (c < nc)
    avx2_kernels().shift_requant(r + c, nc - c, mult + c, shift + c, zy, lo, hi, s8, static_cast<uint8_t*>(out) + c);
}

// The output stage (§6, §8, §10.4) on 16 channels per vector: int32, float32 (one conversion, one multiply [, one
// multiply and one add]: the AVX2 order of operations) and the int32 form of the requantization (every shift in
// [33, 62]); other cases go to the AVX2 stage. Whole tiles stored row by row (GEMM) store each row's vector; outputs
// whose rows are adjacent elements (o.ldm == 1: conv's NCHW pixels) are transposed in registers, 16 rows at a time,
// and each channel stores one run of up to 16 pixels. The per-channel constants are loaded once per call, and the
// output kind and split are template parameters, so a row is only its arithmetic.
enum class Kind { I32, F32, U8, S8, Q4 };  // Q4: int4 / uint4 codes (clamped in lanes; 8-bit codes saturate as stored)

struct Lanes16 {  // one 16-channel slice of the Epi
  __m512i colc1, zw1, colc2, zw2, m1, m1_odd, m2, m2_odd, rnd, shr, zy, lo, hi;
  __m512 s1, s2;
  bool has_zw1, has_zw2;
  Lanes16(const Epi& e, int64_t n0) {
    const __m512i zero = _mm512_setzero_si512();
    auto ld = [n0, zero](const int32_t* p) { return p ? _mm512_loadu_si512(p + n0) : zero; };
    colc1 = ld(e.colc1);
    zw1 = ld(e.zw1);
    has_zw1 = e.zw1 != nullptr;
    colc2 = e.split ? ld(e.colc2) : zero;
    zw2 = e.split ? ld(e.zw2) : zero;
    has_zw2 = e.split && e.zw2 != nullptr;
    const bool q = is_requant(e.type) && e.fast32;
    m1 = q ? ld(e.m1_32) : zero;
    m2 = q && e.split ? ld(e.m2_32) : zero;
    m1_odd = _mm512_srli_epi64(m1, 32);
    m2_odd = _mm512_srli_epi64(m2, 32);
    rnd = q ? ld(e.rnd32) : zero;
    shr = q ? ld(e.shr32) : zero;
    zy = _mm512_set1_epi32(e.zy);
    lo = _mm512_set1_epi32(e.lo);
    hi = _mm512_set1_epi32(e.hi);
    s1 = e.type == OutType::F32 ? _mm512_loadu_ps(e.s1 + n0) : _mm512_setzero_ps();
    s2 = e.type == OutType::F32 && e.split ? _mm512_loadu_ps(e.s2 + n0) : _mm512_setzero_ps();
  }
};

// tile + colc - zw * rs (mod 2^32)
inline __m512i corrected16(const int32_t* t, __m512i colc, bool has_zw, __m512i zw, int32_t rs) {
  __m512i v = _mm512_add_epi32(_mm512_loadu_si512(t), colc);
  if (has_zw) v = _mm512_sub_epi32(v, _mm512_mullo_epi32(zw, _mm512_set1_epi32(rs)));
  return v;
}

// Row t1/t2 of the output stage: int32 sums, float32 bits, or requantized codes plus zy (clamped for Q4 only: 8-bit
// codes are clamped by the saturating narrowing that stores them). The one definition both store forms use.
template <Kind K, bool Split>
inline __m512i stage_row(const Lanes16& l, const int32_t* t1, int32_t rs1, const int32_t* t2, int32_t rs2) {
  const __m512i v = corrected16(t1, l.colc1, l.has_zw1, l.zw1, rs1);
  __m512i w = _mm512_setzero_si512();
  if (Split) w = corrected16(t2, l.colc2, l.has_zw2, l.zw2, rs2);
  if (K == Kind::I32) return v;
  if (K == Kind::F32) {
    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(v), l.s1);
    if (Split) f = _mm512_add_ps(f, _mm512_mul_ps(_mm512_cvtepi32_ps(w), l.s2));
    return _mm512_castps_si512(f);
  }
  // the high dword of each exact product v * m1 [+ w * m2] (64-bit products of even and odd lanes; the odd dwords
  // move down by a dword shuffle, which leaves the shift port to the multiplies)
  constexpr _MM_PERM_ENUM kOdd = _MM_PERM_DDBB;
  __m512i pe = _mm512_mul_epi32(v, l.m1);
  __m512i po = _mm512_mul_epi32(_mm512_shuffle_epi32(v, kOdd), l.m1_odd);
  if (Split) {
    pe = _mm512_add_epi64(pe, _mm512_mul_epi32(w, l.m2));
    po = _mm512_add_epi64(po, _mm512_mul_epi32(_mm512_shuffle_epi32(w, kOdd), l.m2_odd));
  }
  const __m512i h = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(pe, kOdd), po);
  const __m512i y = _mm512_add_epi32(_mm512_srav_epi32(_mm512_add_epi32(h, l.rnd), l.shr), l.zy);
  return K == Kind::Q4 ? _mm512_min_epi32(_mm512_max_epi32(y, l.lo), l.hi) : y;
}

// mr rows stored in place (o.ldn == 1, 16 channels).
template <Kind K, bool Split>
void store_rows(const Epi& e, int64_t n0, int mr, const int32_t* t1, const int32_t* rs1, const int32_t* t2,
                const int32_t* rs2, const TileOut& o) {
  const Lanes16 l(e, n0);
  const __m512i zero = _mm512_setzero_si512();
  for (int r = 0; r < mr; ++r) {
    const __m512i y = stage_row<K, Split>(l, t1 + r * kNR, rs1 ? rs1[r] : 0, t2 + r * kNR * Split, rs2 ? rs2[r] : 0);
    __m128i* b = reinterpret_cast<__m128i*>(static_cast<uint8_t*>(o.out) + r * o.ldm);
    if (K == Kind::U8)
      _mm_storeu_si128(b, _mm512_cvtusepi32_epi8(_mm512_max_epi32(y, zero)));  // [0, 255], like clamp(y, 0, 255)
    else if (K == Kind::S8)
      _mm_storeu_si128(b, _mm512_cvtsepi32_epi8(y));  // [-128, 127]
    else if (K == Kind::Q4)
      _mm_storeu_si128(b, _mm512_cvtepi32_epi8(y));
    else
      _mm512_storeu_si512(static_cast<int32_t*>(o.out) + r * o.ldm, y);
  }
}

// 16 x 16 dwords: on return r[c] holds column c (r[c] lane i = old r[i] lane c).
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // t[2i], t[2i + 1]: rows 2i, 2i + 1 interleaved, columns 4L, 4L + 1 / 4L + 2, 4L + 3
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // 4 x 4 transpose of 128-bit lanes over r[j], r[4 + j], r[8 + j], r[12 + j]
    const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(a, c, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(b, d, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
  for (int c = 0; c < 16; ++c) r[c] = t[c];
}

inline __m128i lane128(__m512i v, int l) {
  switch (l) {
    case 0: return _mm512_castsi512_si128(v);
    case 1: return _mm512_extracti32x4_epi32(v, 1);
    case 2: return _mm512_extracti32x4_epi32(v, 2);
    default: return _mm512_extracti32x4_epi32(v, 3);
  }
}

// Up to 16 rows (mr) of nc channels to an output with o.ldm == 1: channel c's rows are the mr elements from
// out + c * o.ldn.
template <Kind K, bool Split>
void store_cols16(const Lanes16& l, int mr, int nc, const int32_t* t1, const int32_t* rs1, const int32_t* t2,
                  const int32_t* rs2, const TileOut& o) {
  __m512i y[16];
  for (int r = 0; r < 16; ++r)
    y[r] = r < mr ? stage_row<K, Split>(l, t1 + r * kNR, rs1 ? rs1[r] : 0, t2 + r * kNR * Split, rs2 ? rs2[r] : 0)
                  : _mm512_setzero_si512();
  const __mmask16 rows = static_cast<__mmask16>((1u << mr) - 1);
  if (K == Kind::I32 || K == Kind::F32) {  // int32 / float32 bits: 16 pixels (64 bytes) per channel
    transpose16x16(y);
    int32_t* out = static_cast<int32_t*>(o.out);
    for (int c = 0; c < nc; ++c) _mm512_mask_storeu_epi32(out + c * o.ldn, rows, y[c]);
    return;
  }
  // Bytes: four rows narrow into one vector with signed saturation to int16, then to uint8 (U8) or int8 (S8, and Q4,
  // already in range), i.e. clamp(y, lo, hi); its 128-bit lane L then holds rows 4q..4q+3 of channels 4L..4L+3
  // row-major; a byte shuffle makes each dword one channel's four rows, and two dword/qword interleaves give w[j]
  // lane L = channel 4L + j, all 16 rows.
  const __m512i by_channel = _mm512_set4_epi32(0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400);
  __m512i z[4];
  for (int q = 0; q < 4; ++q) {
    const __m512i p01 = _mm512_packs_epi32(y[4 * q], y[4 * q + 1]);
    const __m512i p23 = _mm512_packs_epi32(y[4 * q + 2], y[4 * q + 3]);
    z[q] = _mm512_shuffle_epi8(K == Kind::U8 ? _mm512_packus_epi16(p01, p23) : _mm512_packs_epi16(p01, p23),
                               by_channel);
  }
  const __m512i a0 = _mm512_unpacklo_epi32(z[0], z[1]), a1 = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i b0 = _mm512_unpacklo_epi32(z[2], z[3]), b1 = _mm512_unpackhi_epi32(z[2], z[3]);
  const __m512i w[4] = {_mm512_unpacklo_epi64(a0, b0), _mm512_unpackhi_epi64(a0, b0), _mm512_unpacklo_epi64(a1, b1),
                        _mm512_unpackhi_epi64(a1, b1)};
  uint8_t* out = static_cast<uint8_t*>(o.out);
  for (int c = 0; c < nc; ++c)  // (no AVX-512 VL: a 64-byte masked store of the lane)
    _mm512_mask_storeu_epi8(out + c * o.ldn, rows, _mm512_castsi128_si512(lane128(w[c & 3], c >> 2)));
}

template <Kind K, bool Split>
void store_cols(const Epi& e, int64_t n0, int mr, int nc, const int32_t* t1, const int32_t* rs1, const int32_t* t2,
                const int32_t* rs2, const TileOut& o) {
  const Lanes16 l(e, n0);
  const int64_t esz = K == Kind::I32 || K == Kind::F32 ? 4 : 1;
  for (int r = 0; r < mr; r += 16) {
    const TileOut part{static_cast<char*>(o.out) + r * esz, o.ldm, o.ldn};
    store_cols16<K, Split>(l, std::min(16, mr - r), nc, t1 + r * kNR, rs1 ? rs1 + r : nullptr,
                           Split ? t2 + r * kNR : nullptr, rs2 ? rs2 + r : nullptr, part);
  }
}

template <Kind K, bool Split>
void epi_kind(bool cols, const Epi& e, int64_t n0, int mr, int nc, const int32_t* t1, const int32_t* rs1,
              const int32_t* t2, const int32_t* rs2, const TileOut& o) {
  if (cols)
    store_cols<K, Split>(e, n0, mr, nc, t1, rs1, t2, rs2, o);
  else
    store_rows<K, Split>(e, n0, mr, t1, rs1, t2, rs2, o);
}

template <Kind K>
void epi_split(bool cols, const Epi& e, int64_t n0, int mr, int nc, const int32_t* t1, const int32_t* rs1,
               const int32_t* t2, const int32_t* rs2, const TileOut& o) {
  if (e.split)
    epi_kind<K, true>(cols, e, n0, mr, nc, t1, rs1, t2, rs2, o);
  else
    epi_kind<K, false>(cols, e, n0, mr, nc, t1, rs1, t2, rs2, o);
}

void epi_vnni(const Epi& e, int64_t n0, int mr, int nc, const int32_t* t1, const int32_t* rs1, const int32_t* t2,
              const int32_t* rs2, const TileOut& o) {
  const bool requant = is_requant(e.type);
  const bool rows = nc == kNR && o.ldn == 1, cols = !rows && o.ldm == 1;
  if ((!rows && !cols) || (requant && !e.fast32) || (e.type != OutType::I32 && e.type != OutType::F32 && !requant)) {
    // the AVX2 stage takes kMR rows at a time unless whole rows are stored in place (EpiFn)
    const int step = rows ? mr : kMR;
    for (int r = 0; r < mr; r += step) {
      const TileOut part{static_cast<char*>(o.out) + r * o.ldm * (requant ? 1 : 4), o.ldm, o.ldn};
      avx2_kernels().epi(e, n0, std::min(step, mr - r), nc, t1 + r * kNR, rs1 ? rs1 + r : nullptr,
                         t2 ? t2 + r * kNR : nullptr, rs2 ? rs2 + r : nullptr, part);
    }
    return;
  }
  switch (e.type) {
    case OutType::I32: return epi_split<Kind::I32>(cols, e, n0, mr, nc, t1, rs1, t2, rs2, o);
    case OutType::F32: return epi_split<Kind::F32>(cols, e, n0, mr, nc, t1, rs1, t2, rs2, o);
    case OutType::U8: return epi_split<Kind::U8>(cols, e, n0, mr, nc, t1, rs1, t2, rs2, o);
    case OutType::S8: return epi_split<Kind::S8>(cols, e, n0, mr, nc, t1, rs1, t2, rs2, o);
    default: return epi_split<Kind::Q4>(cols, e, n0, mr, nc, t1, rs1, t2, rs2, o);
  }
}

// The AVX2 packer with the second half always u = x' + 128 (the only half the kernels above read).
void pack_a_vnni(const uint8_t* x, int64_t ldx, int mr, int64_t k, int64_t kg, uint8_t xor_mask, bool, int8_t* dst,
                 int32_t* rowsum) {
  avx2_kernels().pack_a(x, ldx, mr, k, kg, xor_mask, true, dst, rowsum);
}

}  // namespace

#if defined(PYQSIM_HAVE_AMX_TU)
const KernelSet& amx_kernels() {
  static const KernelSet ks = [] {
    KernelSet k = avx512vnni_kernels();
    k.isa = Isa::Amx;
    k.amx_begin = amx_begin;
    k.amx_pack_row = amx_pack_row;
    k.amx_end = amx_end;
    k.amx_shift_rows = amx_shift_rows;
    k.amx_block = amx_block;
    return k;
  }();
  return ks;
}
#endif

const KernelSet& avx512vnni_kernels() {
  static const KernelSet ks = [] {
    KernelSet k = avx2_kernels();
    k.isa = Isa::Avx512Vnni;
    k.s8_u = true;
    k.pack_a = pack_a_vnni;
    QSIM_MR_TABLE(k.ukr, ukr_vnni);
    QSIM_MR_TABLE(k.ukr4, ukr_vnni);
    QSIM_MR_TABLE(k.ukr_wide, ukr_wide_vnni);
    QSIM_MR_TABLE(k.ukr_shift_wide, ukr_shift_wide_vnni);
    k.shift_acc = shift_acc_vnni;
    k.shift_a = shift_a_vnni;
    k.pack_rows16 = pack_rows16_vnni;
    k.epi = epi_vnni;
    k.shift_requant = shift_requant_vnni;
    k.shift_f32 = shift_f32_vnni;
    k.shift_out = shift_out_vnni;
    return k;
  }();
  return ks;
}

}  // namespace detail

// 12 independent vpdpbusd zmm chains (the machine-peak line of benchmarks/, peak_avx2.cpp).
__attribute__((noinline)) void vnni_peak_loop(int64_t n) {
  __asm__ volatile(
      "vpternlogd $0xff, %%zmm12, %%zmm12, %%zmm12\n\t"
      "vpabsb %%zmm12, %%zmm12\n\t"
#define Z(i) "vpxord %%zmm" #i ", %%zmm" #i ", %%zmm" #i "\n\t"
      Z(0) Z(1) Z(2) Z(3) Z(4) Z(5) Z(6) Z(7) Z(8) Z(9) Z(10) Z(11)
#undef Z
      "1:\n\t"
#define M(i) "vpdpbusd %%zmm12, %%zmm12, %%zmm" #i "\n\t"
      M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
#undef M
      "dec %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(n)
      :
      : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12");
}

}  // namespace qsim
