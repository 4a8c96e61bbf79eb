// AMX tiles for the int8 GEMM (spec §10.8): TDPBUSD sums u8 x s8 products into int32 tiles, exactly and mod 2^32
// like VPDPBUSD (§10.7), so the tile is the VNNI kernels' sum u * w (u = x' + 128) and the AVX-512 VNNI output
// stage applies unchanged. Entered only after the runtime check (cpu_has_amx: CPUID, XCR0 and the kernel's
// permission for the tile data state).
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace qsim {
namespace detail {
namespace {

// Palette 1: tiles 0-3 the 2 x 2 int32 C block (16 rows x 64 bytes), 4-5 A (16 rows x 64 u8), 6-7 B (16 k-groups x 64).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace

void amx_begin() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // The compiler does not see that LDTILECFG reads all 64 bytes: keep the stores above
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

void amx_end() { _tile_release(); }

uint32_t amx_pack_row(const uint8_t* src, int64_t k, uint8_t ux, uint8_t* dst, int64_t kpad) {
  const __m512i x = _mm512_set1_epi8(static_cast<char>(ux)), zero = _mm512_setzero_si512();
  __m512i sums = zero;  // eight 64-bit partial sums of u
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(src + i), x);
    _mm512_storeu_si512(dst + i, u);
    sums = _mm512_add_epi64(sums, _mm512_sad_epu8(u, zero));
  }
  for (; i < kpad; i += 64) {  // the tail of k, then zeros up to kpad (a multiple of 64)
    const int64_t left = k - i;
    const __mmask64 m = left >= 64 ? ~__mmask64(0) : left > 0 ? (__mmask64(1) << left) - 1 : 0;
    const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, src + i), _mm512_maskz_mov_epi8(m, x));
    _mm512_storeu_si512(dst + i, u);
    sums = _mm512_add_epi64(sums, _mm512_sad_epu8(u, zero));
  }
  return static_cast<uint32_t>(_mm512_reduce_add_epi64(sums));
}

namespace {

// amx_shift_rows for NP passes (0: np at run time), every one with a window: NP > 0 keeps the tables and sums in
// registers.
template <int NP>
uint8_t shift_rows_win(const uint8_t* codes, int64_t ldc, int mr, int64_t lc, int np_rt, const uint8_t* const* lut,
                       const int* win, uint8_t* const* dst, int64_t kpad, uint32_t* sum) {
  const int np = NP > 0 ? NP : np_rt;
  // codes - win in [0, 16) index the window; the saturating bias sends every other code to an index >= 0x80,
  // which VPSHUFB maps to 0
  __m512i tab[NP > 0 ? NP : kShiftTiles], base[NP > 0 ? NP : kShiftTiles];
  const __m512i bias = _mm512_set1_epi8(0x70), zero = _mm512_setzero_si512();
  __m512i seen = zero;  // the OR of the codes
  for (int i = 0; i < np; ++i) {
    tab[i] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut[i] + win[i])));
    base[i] = _mm512_set1_epi8(static_cast<char>(win[i]));
  }
  for (int r = 0; r < mr; ++r) {
    const uint8_t* cr = codes + r * ldc;
    __m512i sums[NP > 0 ? NP : kShiftTiles];
    for (int i = 0; i < np; ++i) sums[i] = zero;
    for (int64_t j = 0; j < kpad; j += 64) {
      const int64_t left = lc - j;
      const __mmask64 m = left >= 64 ? ~__mmask64(0) : left > 0 ? (__mmask64(1) << left) - 1 : 0;
      const __m512i c = _mm512_maskz_loadu_epi8(m, cr + j);
      seen = _mm512_or_si512(seen, c);
      for (int i = 0; i < np; ++i) {
        const __m512i w = _mm512_maskz_shuffle_epi8(m, tab[i], _mm512_adds_epu8(_mm512_sub_epi8(c, base[i]), bias));
        _mm512_storeu_si512(dst[i] + r * kpad + j, w);
        sums[i] = _mm512_add_epi64(sums[i], _mm512_sad_epu8(w, zero));
      }
    }
    for (int i = 0; i < np; ++i) sum[i * mr + r] = static_cast<uint32_t>(_mm512_reduce_add_epi64(sums[i]));
  }
  const uint64_t q = static_cast<uint64_t>(_mm512_reduce_or_epi64(seen));
  const uint32_t d = static_cast<uint32_t>(q | (q >> 32));
  const uint16_t h = static_cast<uint16_t>(d | (d >> 16));
  return static_cast<uint8_t>(h | (h >> 8));
}

}  // namespace

uint8_t amx_shift_rows(const uint8_t* codes, int64_t ldc, int mr, int64_t lc, int np, const uint8_t* const* lut,
                       const int* win, uint8_t* const* dst, int64_t kpad, uint32_t* sum) {
  bool windows = true;
  for (int i = 0; i < np; ++i) windows = windows && win[i] >= 0;
  if (windows) switch (np) {  // up to three bands of each class (8-bit codes with F = 16: six passes)
      case 1: return shift_rows_win<1>(codes, ldc, mr, lc, np, lut, win, dst, kpad, sum);
      case 2: return shift_rows_win<2>(codes, ldc, mr, lc, np, lut, win, dst, kpad, sum);
      case 3: return shift_rows_win<3>(codes, ldc, mr, lc, np, lut, win, dst, kpad, sum);
      case 4: return shift_rows_win<4>(codes, ldc, mr, lc, np, lut, win, dst, kpad, sum);
      case 5: return shift_rows_win<5>(codes, ldc, mr, lc, np, lut, win, dst, kpad, sum);
      case 6: return shift_rows_win<6>(codes, ldc, mr, lc, np, lut, win, dst, kpad, sum);
      default: return shift_rows_win<0>(codes, ldc, mr, lc, np, lut, win, dst, kpad, sum);
    }
  uint8_t seen = 0;
  for (int r = 0; r < mr; ++r)
    for (int64_t j = 0; j < lc; ++j) seen |= codes[r * ldc + j];
  for (int i = 0; i < np; ++i)  // some pass without a window: one look-up per code
    for (int r = 0; r < mr; ++r) {
      const uint8_t* cr = codes + r * ldc;
      uint32_t s = 0;
      for (int64_t j = 0; j < kpad; ++j) {
        const uint8_t w = j < lc ? lut[i][cr[j]] : 0;
        dst[i][r * kpad + j] = w;
        s += w;
      }
      sum[i * mr + r] = s;
    }
  return seen;
}

namespace {
// The first k-step's tiles of a block: the two A tiles and the B panels.
inline void load_first(const uint8_t* a0, const uint8_t* a1, int64_t lda, const uint8_t* b0, const uint8_t* b1,
                       bool two_panels) {
  _tile_loadd(4, a0, lda);
  _tile_loadd(6, b0, 64);
  _tile_loadd(5, a1, lda);
  if (two_panels) _tile_loadd(7, b1, 64);
}

// ksteps >= 1 steps of 64 k into the zeroed C tiles, the first step's tiles loaded: C0 = A0 B0, C1 = A0 B1 (Two),
// C2 = A1 B0 and C3 = A1 B1 (Rows32). Each A or B tile of the next step is loaded right after the last TDPBUSD of
// this step that reads its register, not all of them before the step, so the loads overlap the step's remaining
// TDPBUSDs (measured faster, benchmarks/ DeiT-S shapes).
template <bool Two, bool Rows32>
inline void steps(const uint8_t* a0, const uint8_t* a1, int64_t lda, const uint8_t* b0, const uint8_t* b1,
                  int64_t ksteps) {
  for (int64_t s = 1; s < ksteps; ++s) {
    _tile_dpbusd(0, 4, 6);
    if (Two) _tile_dpbusd(1, 4, 7);
    _tile_loadd(4, a0 + s * 64, lda);
    if (Rows32) _tile_dpbusd(2, 5, 6);
    _tile_loadd(6, b0 + s * 1024, 64);
    if (Rows32 && Two) _tile_dpbusd(3, 5, 7);
    if (Rows32) _tile_loadd(5, a1 + s * 64, lda);
    if (Two) _tile_loadd(7, b1 + s * 1024, 64);
  }
  _tile_dpbusd(0, 4, 6);
  if (Two) _tile_dpbusd(1, 4, 7);
  if (Rows32) _tile_dpbusd(2, 5, 6);
  if (Rows32 && Two) _tile_dpbusd(3, 5, 7);
}
}  // namespace

// C[2][2] 16 x 16 int32 tiles of the 16 rows at a0 and, when rows > 16, the 16 at a1 (row stride lda bytes) with two
// B panels (b0, b1: [ksteps * 16][64]) over ksteps steps of 64 k; c: [panel][32 rows][16] (rows 16-31 those of a1;
// neither computed nor stored when rows <= 16), with two_panels false: panel 0 only. The first step's tiles of the
// next block (`next`, when not null) are loaded before this block's tiles are stored, and that block's call then
// passes preloaded = true.
void amx_block(const uint8_t* a0, const uint8_t* a1, int64_t lda, const uint8_t* b0, const uint8_t* b1, int64_t ksteps,
               bool two_panels, int rows, int32_t* c, bool preloaded, const AmxNext* next) {
  const bool rows32 = rows > 16;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  if (ksteps > 0) {  // else an empty sum (K = 0)
    if (!preloaded) load_first(a0, a1, lda, b0, b1, two_panels);
    if (two_panels)
      rows32 ? steps<true, true>(a0, a1, lda, b0, b1, ksteps) : steps<true, false>(a0, a1, lda, b0, b1, ksteps);
    else
      rows32 ? steps<false, true>(a0, a1, lda, b0, b1, ksteps) : steps<false, false>(a0, a1, lda, b0, b1, ksteps);
    if (next) load_first(next->a0, next->a1, lda, next->b0, next->b1, next->two_panels);
  }
  _tile_stored(0, c, 64);
  if (rows32) _tile_stored(2, c + 256, 64);
  if (two_panels) {
    _tile_stored(1, c + 512, 64);
    if (rows32) _tile_stored(3, c + 512 + 256, 64);
  }
}

}  // namespace detail

// Tile registers only: four independent C tiles, each TDPBUSD 16 x 16 x 64 multiply-adds (the AMX peak line of
// benchmarks/, peak_avx2.cpp). The tiles hold whatever the zeroed A and B give; nothing is read back.
void amx_peak_loop(int64_t n) {
  detail::amx_begin();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t i = 0; i < n; ++i) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  detail::amx_end();
}

}  // namespace qsim
