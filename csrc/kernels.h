// Internal interface between the ISA-independent drivers (gemm.cpp, conv.cpp, ...) and the
// per-ISA kernels (ukernel_scalar.cpp, ukernel_avx2.cpp). Nothing here allocates or threads.
//
// Data layouts (see also qsim.h):
//   A panel  (activations): [kg][2][mr][4]: per k-group, mr x 4 bytes of x' (x - 128 for uint8
//                           activations, §10 step 1), then the "second half": |x'| (uint8, |-128| =
//                           128) for int8 weights, or u = x' + 128 (uint8, = x for uint8 inputs) for
//                           4-bit weights.
//   B panel  (weights):     [kg][16][4] int8 codes (PackedMatrix int8 format), or unpacked 4-bit
//                           stored codes in [0, 15] (see PackedMatrix::code_offset).
//   tile:                   int32 [4][16], row r / column c = sum_k A[r, k] * B[c, k] (mod 2^32).
#pragma once

#include <cstdint>

#include "qsim.h"

namespace qsim {
namespace detail {

// Output-stage parameters prepared once per call, one entry per output channel (padded with zeros
// to a multiple of 16 so vector code may read whole tiles).
struct Epi {
  OutType type = OutType::I32;
  bool split = false;
  // acc_i[m, n] = tile_i[m, n] + colc_i[n] - zw_i[n] * rowsum_i[m]   (mod 2^32, §4 expansion)
  const int32_t* colc1 = nullptr;
  const int32_t* zw1 = nullptr;  // null when every zero point is 0
  const int32_t* colc2 = nullptr;
  const int32_t* zw2 = nullptr;
  // requantize: y = clamp(((acc1*m1 [+ acc2*m2] + rnd) >> sh) + zy, lo, hi). Shifts > 62 are
  // normalized to (m = 0, sh = 62), which yields 0 exactly as §6 prescribes ((0 + 2^61) >> 62 == 0).
  const int64_t* m1 = nullptr;
  const int64_t* m2 = nullptr;
  const int64_t* sh = nullptr;
  const int64_t* rnd = nullptr;  // 2^(sh-1)
  int32_t zy = 0, lo = 0, hi = 0;
  // Every normalized shift is >= 33: then (p + 2^(S-1)) >> S == (hi32(p) + 2^(S-33)) >> (S-32) with
  // hi32(p) = floor(p / 2^32), all in int32 (see ukernel_avx2.cpp). Same multipliers as int32.
  bool fast32 = false;
  const int32_t* m1_32 = nullptr;
  const int32_t* m2_32 = nullptr;
  const int32_t* rnd32 = nullptr;  // 2^(S-33)
  const int32_t* shr32 = nullptr;  // S - 32
  // float32: y = fl32(fl32(acc1) * s1) [+ fl32(fl32(acc2) * s2)]
  const float* s1 = nullptr;
  const float* s2 = nullptr;
};

// Output of one tile: rows are `mr` consecutive output rows, columns `nc` consecutive channels
// starting at channel n0. Element (r, c) goes to out + r*ldm + c*ldn (in elements of the out type).
struct TileOut {
  void* out;
  int64_t ldm, ldn;
};

using UkrFn = void (*)(const int8_t* a, const uint8_t* b, int64_t kg, int32_t* tile);
// np (1..kWideNP) consecutive B panels, panel j at b + j * bstride (bytes), against one A panel: tiles + j * 64 is
// panel j's [4][16] tile, as UkrFn would write it.
constexpr int kWideNP = 4;
using UkrWideFn = void (*)(const int8_t* a, const uint8_t* b, int64_t bstride, int np, int64_t kg, int32_t* tiles);
// t1/t2: int32 tiles with row stride 16; reads whole 16-wide rows (pad partial tiles). mr <= kMR, or any mr when
// nc == kNR and o.ldn == 1 (whole rows stored in place); the AVX-512 VNNI and AMX sets' epi also takes any mr when
// o.ldm == 1 (rows are adjacent elements, as conv's NCHW pixels: each channel's mr results form one run).
using EpiFn = void (*)(const Epi& e, int64_t n0, int mr, int nc, const int32_t* t1, const int32_t* rs1,
                       const int32_t* t2, const int32_t* rs2, const TileOut& o);
// nibble panel (kg/2 x 64 bytes) -> byte panel (kg x 64 bytes) of stored codes 0..15
using UnpackFn = void (*)(const uint8_t* src, int64_t kg, uint8_t* dst);
// rows of x (row stride ldx bytes) -> A panel (x' and the second half: |x'|, or u when u_half), plus
// x' row sums over the first k entries
using PackAFn = void (*)(const uint8_t* x, int64_t ldx, int mr, int64_t k, int64_t kg, uint8_t xor_mask, bool u_half,
                         int8_t* dst, int32_t* rowsum);

// §10.8: the A rows and B panels of the AMX block after the current one (amx_block).
struct AmxNext {
  const uint8_t* a0;
  const uint8_t* a1;
  const uint8_t* b0;
  const uint8_t* b1;
  bool two_panels;
};

// §7 (log2attn.cpp): R[r][c] = 2^fold * R'[r][c] (fold: ShiftStage) with R'[r][c] = sum over i < n of
// int64(t[i][r * 16 + c] - corr[i][r]) * mul[i] * 2^sh[i], the int32 differences taken mod 2^32 (as shift_acc);
// t[i]: int32 tiles with row stride 16; mul[i] in [1, 2^31).
constexpr int kShiftTiles = 8;
struct ShiftTiles {
  int n = 0;
  const int32_t* t[kShiftTiles];
  const int32_t* corr[kShiftTiles];
  int64_t mul[kShiftTiles];
  int sh[kShiftTiles];
};

// §7 output stage in the form shift_out reads it. R = R' * 2^fold (R' what the ShiftTiles terms sum to). Per
// channel, in whole 16-channel panels (the last one padded): for a requantized type whose every shift S is
// >= fold + 33, M0, S' - 32 and 2^(S' - 33) with S' = S - fold (shift_requant_one on R', the same result as on R),
// each panel's 8 even channels then its 8 odd ones; the clamp range relative to zy; for float32, scale * 2^fold
// (finite: fl32(R) * scale = fl32(R') * scale * 2^fold exactly), in channel order.
struct ShiftStage {
  OutType type = OutType::I64;
  int fold = 0;
  const int64_t* mult = nullptr;
  const int64_t* sh32 = nullptr;
  const int64_t* rnd = nullptr;
  const float* scale = nullptr;
  int64_t lo = 0, hi = 0;
  int32_t zy = 0;
};

struct KernelSet {
  Isa isa;
  // The int8-weight tile is sum u * w with u = x' + 128 (the A panel's second half, which pack_a then always
  // fills with u) instead of sum x' * w: the epilogue constants account for the 128, and int8 panels with a -128
  // come from PackedMatrix::buf_exact (true codes, no §10.2 fix-up).
  bool s8_u = false;
  UkrFn ukr[kMR + 1];       // sign path (§10 steps 1-3); index = mr (1..4)
  UkrFn ukr4[kMR + 1];      // 4-bit weights, unpacked panel: sum u * c (u = x' + 128, c in [0, 15])
  UkrFn ukr4_nib[kMR + 1];  // same, reading the nibble panel directly (may be null)
  // s8_u kernel sets: the ukr / ukr4 tile over up to kWideNP panels at once (may be null)
  UkrWideFn ukr_wide[kMR + 1];
  EpiFn epi;
  UnpackFn unpack4;
  PackAFn pack_a;
  // requantize `count` int32 values sharing one channel's (m, sh, rnd) (§6)
  void (*requant_run)(const int32_t* acc, int64_t count, int64_t m, int64_t sh, int64_t rnd, int32_t zy, int32_t lo,
                      int32_t hi, OutType t, void* out);
  // requantize `count` int32 values of one channel under a runtime profile (§14, numerics.h)
  void (*profile_run)(const int32_t* acc, int64_t count, Numerics p, int32_t m, int32_t sh, float scale, int32_t zy,
                      int32_t lo, int32_t hi, OutType t, void* out);
  // §7 shift weights (log2attn.cpp): tile = sum a * b over kg groups with a = uint8 weights in [0, 128]
  // (A panel [kg][mr][4], no second half) and b = int8 values (B panel [kg][16][4]); every pair sum
  // a0*b0 + a1*b1 lies in [-32768, 32512], so an int16 pairwise product is exact.
  UkrFn ukr_shift[kMR + 1];
  // the same over up to kWideNP panels of v; where present, log2attn.cpp calls it instead of ukr_shift (may be null)
  UkrWideFn ukr_shift_wide[kMR + 1];
  // §7: the A panel ([kg][mr][4], zero padded to 4 * kg) of weights lut[code] for mr rows of codes (row stride
  // ldc, lc codes each), and the weight sum of each row. win >= 0: lut is zero outside [win, win + 16), and lut has
  // 16 readable entries from win on; win < 0: no such window.
  void (*shift_a)(const uint8_t* codes, int64_t ldc, int mr, int64_t lc, int64_t kg, const uint8_t* lut, int win,
                  uint8_t* dst, int64_t* rowsum);
  // §7: the B panels [npan][kg][16][4] of v' = v ^ vxor for lc rows of n values of v (row stride ldv), zero padded.
  void (*shift_b)(const uint8_t* v, int64_t ldv, int64_t n, int64_t lc, int64_t kg, uint8_t vxor, int8_t* dst);
  // §7: acc[r * 16 + c] += int64(tile[r * 16 + c] - corr[r]) * mul * 2^sh for r < mr, c < 16, with the int32
  // difference taken mod 2^32 (it is the exact sum_j w_j d_j, |.| < 2^31).
  void (*shift_acc)(const int32_t* tile, int mr, const int32_t* corr, int64_t mul, int sh, int64_t* acc);
  // §7 deep terms of one row of v (deep_add_impl in generic_impl.h states the arithmetic)
  void (*deep_add)(const uint8_t* vr, int64_t nc, uint8_t vxor, int32_t zvp, int sft, int32_t mul, int64_t* acc);
  // §4.3 activation weights: the panel [kg][16][4] of 16 rows of k bytes (row stride ld), each byte ^ xor_mask,
  // zero padded to 4 * kg, and the int8 sum of each row (mod 2^32). May be null.
  void (*pack_rows16)(const uint8_t* src, int64_t ld, int64_t k, uint8_t xor_mask, int64_t kg, uint8_t* pan,
                      int32_t* colsum) = nullptr;
  // §7: the ShiftTiles sums R of rows r < mr, channels c0 + c for c < nc (<= 16), through the output stage into row
  // r of y (row stride ldy elements, pointing at channel c0): I64 stores R; F32 stores fl32(fl32(R) * scale[c0 +
  // c]); a requantized type stores shift_requant_one of R. May be null.
  void (*shift_out)(const ShiftTiles& st, int mr, int nc, const ShiftStage& so, int64_t c0, void* y,
                    int64_t ldy) = nullptr;
  // §7 float32 output: y[c] = fl32(fl32(R[c]) * scale[c]) for c < nc (round to nearest even, no fused multiply-add)
  void (*shift_f32)(const int64_t* r, int64_t nc, const float* scale, float* y);
  // §7 requantization of nc int64 sums R whose shifts are all in [33, 94]: out[c] = clamp(floor((R * M0 +
  // 2^(S-1)) / 2^S) + zy, lo, hi) as int8 (s8) or uint8, exactly (see shift_requant_one).
  void (*shift_requant)(const int64_t* r, int64_t nc, const int32_t* mult, const int32_t* shift, int32_t zy, int32_t lo,
                        int32_t hi, bool s8, void* out);
  // §10.8 AMX (null without it): amx_begin/amx_end configure and release this thread's tiles around amx_block,
  // which writes c[j][r][16] = sum_k u[r, k] * B_j[c, k] (mod 2^32) for rows r of u: 16 at a0, then, when rows > 16,
  // 16 at a1 (row stride lda bytes, ksteps * 64 bytes each; both readable), and the PackedMatrix::buf_amx panels b0
  // and, when two_panels, b1. With `next`, it also loads the first k-step's tiles of the next block (same lda and
  // ksteps), whose call then passes preloaded = true.
  void (*amx_begin)() = nullptr;
  // one row of u = x ^ ux for k bytes, zero padded to kpad (a multiple of 64); returns sum u mod 2^32
  uint32_t (*amx_pack_row)(const uint8_t* src, int64_t k, uint8_t ux, uint8_t* dst, int64_t kpad) = nullptr;
  void (*amx_end)() = nullptr;
  // §7 on AMX (log2attn.cpp): for rows r < mr of codes (row stride ldc, lc codes each) and passes i < np, the
  // weights dst[i][r * kpad + j] = lut[i][codes[r][j]] for j < lc, zero padded to kpad (a multiple of 64), and their
  // sums sum[i * mr + r]. win[i] as in shift_a. Returns the OR of the codes (for the range check).
  uint8_t (*amx_shift_rows)(const uint8_t* codes, int64_t ldc, int mr, int64_t lc, int np, const uint8_t* const* lut,
                            const int* win, uint8_t* const* dst, int64_t kpad, uint32_t* sum) = nullptr;
  void (*amx_block)(const uint8_t* a0, const uint8_t* a1, int64_t lda, const uint8_t* b0, const uint8_t* b1,
                    int64_t ksteps, bool two_panels, int rows, int32_t* c, bool preloaded,
                    const AmxNext* next) = nullptr;
};

// §7 requantization for S in [33, 94] without 128-bit arithmetic: R = A * 2^32 + B (B in [0, 2^32)), so
// R * M0 = P1 * 2^32 + P0 with P1 = A * M0 (|.| < 2^62) and P0 = B * M0 = H0 * 2^32 + L0 (< 2^63). With
// 2^(S-1) = 2^(S-33) * 2^32:  floor((R * M0 + 2^(S-1)) / 2^S) = floor((X * 2^32 + L0) / 2^S) = X >> (S - 32),
// X = P1 + 2^(S-33) + H0 (|X| < 2^63), since 0 <= L0 < 2^32 and S - 32 >= 1.
inline int64_t shift_requant_one(int64_t r, int64_t mult, int s) {
  const int64_t a = r >> 32;
  const uint64_t b = static_cast<uint64_t>(r) & 0xFFFFFFFFu;
  const int64_t x = a * mult + (int64_t(1) << (s - 33)) + static_cast<int64_t>((b * static_cast<uint64_t>(mult)) >> 32);
  return x >> (s - 32);
}

// Fills a KernelSet micro-kernel table (index = mr) from a template over MR.
#define QSIM_MR_TABLE(table, fn) \
  ((table)[0] = nullptr, (table)[1] = fn<1>, (table)[2] = fn<2>, (table)[3] = fn<3>, (table)[4] = fn<4>)

const KernelSet& scalar_kernels();
#if defined(PYQSIM_HAVE_AVX2_TU)
const KernelSet& avx2_kernels();
#endif
#if defined(PYQSIM_HAVE_VNNI_TU)
const KernelSet& avx512vnni_kernels();
#endif
#if defined(PYQSIM_HAVE_AMX_TU)
const KernelSet& amx_kernels();  // the VNNI set with the AMX entries
void amx_begin();
void amx_end();
uint32_t amx_pack_row(const uint8_t* src, int64_t k, uint8_t ux, uint8_t* dst, int64_t kpad);
uint8_t amx_shift_rows(const uint8_t* codes, int64_t ldc, int mr, int64_t lc, int np, const uint8_t* const* lut,
                       const int* win, uint8_t* const* dst, int64_t kpad, uint32_t* sum);
void amx_block(const uint8_t* a0, const uint8_t* a1, int64_t lda, const uint8_t* b0, const uint8_t* b1, int64_t ksteps,
               bool two_panels, int rows, int32_t* c, bool preloaded, const AmxNext* next);
#endif
const KernelSet& kernels_for(Isa isa);

// Portable helpers shared by the drivers.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// §6 requantization of one exact int64 product sum (|p| < 2^62), with normalized (sh <= 62).
inline int32_t requant_one(int64_t p, int64_t rnd, int64_t sh, int32_t zy, int32_t lo, int32_t hi) {
  int64_t y = ((p + rnd) >> sh) + zy;
  return static_cast<int32_t>(y < lo ? lo : (y > hi ? hi : y));
}

}  // namespace detail
}  // namespace qsim
