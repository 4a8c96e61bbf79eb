// Shift-based log2 / log-sqrt2 attention times V (spec §7), batched over leading dimensions (§7.1): driver; the
// method is stated in §10.5.
//
// Method (exact, one integer GEMM per exponent band and class). A live code c with t = F - e(c) >= 0 adds
// 2^t * d_j to E (even class) or O (odd class). Exponents are grouped in bands of 8: band b holds e in
// [8b, 8b + 7], and with top = min(8b + 7, F), 2^t = 2^(F - top) * w with the uint8 weight w = 2^(top - e) <= 128.
// For each (band, class) present, the micro-kernel sums w_j * v'_j over j (v' = v - 128 for uint8 values, v for
// int8: an int8 operand), then  sum_j w_j d_j = sum_j w_j v'_j - zv' * sum_j w_j  with zv' the zero point mapped
// the same way. R = E * 2^16 + O * Q accumulates these sums times 2^(F - top) * (2^16 or Q) in int64: R is linear
// in the terms, and every partial sum is bounded by the §7 width precondition. Codes with t < 0 (rounded per
// term) are added one term at a time. Then the §7 output stage on R. Where no deep term must be added first,
// KernelSet::shift_out forms R from the passes' int32 tiles and applies the output stage in registers. On AMX
// (run_block_amx) the tiles are TDPBUSD tiles of the same sums.
//
// Threads: one task per (batch element, block of rows); each output row is computed inside one task with the
// same arithmetic, so the result does not depend on the thread count or the ISA.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kernels.h"
#include "threadpool.h"

#if !defined(__SIZEOF_INT128__)
#error "pyqsim's log2 attention output stage needs a compiler with __int128 (GCC or Clang)"
#endif

namespace qsim {

using namespace detail;

namespace {

constexpr int kBands = 4;               // e <= F <= 24 for every exact term: bands 0..3
constexpr int kPasses = 2 * kBands;     // pass = 2 * band + odd
constexpr int64_t kMaxChunk = 65536;    // |sum w v'| <= chunk * 128 * 128 <= 2^30 stays in int32
constexpr int64_t kQ = 92682;           // round(sqrt(2) * 2^16)

// 64-byte aligned scratch, grown on demand.
struct Scratch {
  std::unique_ptr<uint8_t[]> raw;
  uint8_t* p = nullptr;
  size_t cap = 0;
  void reset(size_t n) {
    if (n > cap) {
      raw.reset(new uint8_t[n + 64]);
      p = raw.get() + ((64 - reinterpret_cast<uintptr_t>(raw.get()) % 64) % 64);
      cap = n;
    }
  }
};

struct CodeInfo {
  int8_t pass;   // -1: the zero code or a code whose terms are all 0, -2: a deep code (t < 0), else 2 * band + odd
  uint8_t w;     // 2^(top - e) for exact codes
  int8_t odd;    // class of a deep code
  int8_t sft;    // -t of a deep code, in [1, 8]
};

struct Problem {
  const uint8_t* codes;  // [B, M, L]
  RowBatch v;            // [B, L, N], int8 or uint8 bytes
  uint8_t vxor;          // 0x80 for uint8 values: v' = v ^ 0x80 = v - 128
  int64_t m, l, n;
  int32_t zvp;           // zv' (zero point mapped like v')
  CodeInfo info[256];
  uint8_t lut[kPasses][256 + 16];  // weight of each code in each pass (0 elsewhere; 16 zero bytes past the end)
  bool possible[kPasses];       // some code falls in the pass
  int npasses;
  int win[kPasses];             // the pass's non-zero weights lie in codes [win, win + 16), else -1
  uint8_t code_mask;            // 2^bits - 1: the codes' range
  bool deep;                    // some code has t < 0: the codes in [deep_lo, deep_hi]
  uint8_t deep_lo, deep_hi;
  bool all_wide_shifts;         // requantized output with every shift >= 33 (KernelSet::shift_requant)
  int frac_bits;
  int top[kPasses];             // R weight of a pass: 2^(F - top) * (2^16 or Q)
  OutStage out;
  OutRows y;
  ShiftStage so;                // out in shift_out's form (direct_out); R = R' * 2^so.fold
  ShiftStage so_r;              // R itself (int64), for the deep terms and out_span
  std::vector<int64_t> so_mult, so_sh32, so_rnd;
  std::vector<float> so_scale;
};

// §7 output stage of R for channels [c0, c0 + nc) of output row `row` of batch element bi.
void out_span(const Problem& pb, const KernelSet& ks, const int64_t* r, int64_t bi, int64_t row, int64_t c0, int64_t nc) {
  const OutStage& o = pb.out;
  void* const yb = pb.y.at(bi);
  const int64_t base = row * pb.y.ld + c0;
  if (o.type == OutType::I64) {
    std::memcpy(static_cast<int64_t*>(yb) + base, r, static_cast<size_t>(nc) * sizeof(int64_t));
  } else if (o.type == OutType::F32) {
    ks.shift_f32(r, nc, o.scale + c0, static_cast<float*>(yb) + base);
  } else {
    const int64_t lo = static_cast<int64_t>(out_qmin(o.type)) - o.zero_point;
    const int64_t hi = static_cast<int64_t>(out_qmax(o.type)) - o.zero_point;
    const bool s8 = o.type == OutType::S8 || o.type == OutType::S4;
    if (pb.all_wide_shifts) {
      ks.shift_requant(r, nc, o.multiplier + c0, o.shift + c0, o.zero_point, out_qmin(o.type), out_qmax(o.type), s8,
                       static_cast<uint8_t*>(yb) + base);
      return;
    }
    for (int64_t c = 0; c < nc; ++c) {
      const int s = o.shift[c0 + c];  // 1..94; |R * M0| < 2^94, so the sum fits in 128 bits
      __int128 p = static_cast<__int128>(r[c]) * o.multiplier[c0 + c] + (static_cast<__int128>(1) << (s - 1));
      p >>= s;
      const int64_t y = (p < lo ? lo : (p > hi ? hi : static_cast<int64_t>(p))) + o.zero_point;
      if (s8)
        static_cast<int8_t*>(yb)[base + c] = static_cast<int8_t>(y);
      else
        static_cast<uint8_t*>(yb)[base + c] = static_cast<uint8_t>(y);
    }
  }
}

// Whether the output stage can be applied to tiles as they come (KernelSet::shift_out): no deep term to add first,
// and an int64, float32 or wide-shift requantized output.
bool direct_out(const Problem& pb, const KernelSet& ks) {
  const OutType t = pb.out.type;
  return ks.shift_out != nullptr && !pb.deep && (t == OutType::I64 || t == OutType::F32 || pb.all_wide_shifts);
}

// The address of output (row, c0) of batch element bi.
void* out_at(const Problem& pb, int64_t bi, int64_t row, int64_t c0) {
  const OutType t = pb.out.type;
  const int64_t size = t == OutType::I64 ? 8 : t == OutType::F32 ? 4 : 1;
  return static_cast<char*>(pb.y.at(bi)) + (row * pb.y.ld + c0) * size;
}

// The live passes p (live[p]) as ShiftTiles terms, pass p's corrections at corr + p * stride; slot[i] is the pass of
// term i. The caller sets each term's tile.
ShiftTiles live_tiles(const Problem& pb, const bool* live, const int32_t* corr, int stride, int* slot) {
  ShiftTiles st;
  for (int p = 0; p < kPasses; ++p) {
    if (!live[p]) continue;
    slot[st.n] = p;
    st.corr[st.n] = corr + p * stride;
    // 2^(F - top - fold) * (2^16 or Q): as much of the power of two in the multiplier as stays below 2^31
    int64_t mul = (p & 1) ? kQ : 65536;
    int sh = pb.frac_bits - pb.top[p] - pb.so.fold;
    for (; sh > 0 && mul < (int64_t(1) << 30); --sh) mul <<= 1;
    st.mul[st.n] = mul;
    st.sh[st.n] = sh;
    ++st.n;
  }
  return st;
}

// Positions (relative to j0) of the deep codes (t < 0) in each row of a chunk: the codes in [deep_lo, deep_hi]
// (e = ceil(c / k) in [F + 1, F + 8]). pos[start[i] .. start[i + 1]) lists row i's, in order of j.
void deep_positions(const Problem& pb, const uint8_t* codes, int64_t rows, int64_t j0, int64_t lc,
                    std::vector<int32_t>& start, std::vector<int32_t>& pos) {
  start.assign(static_cast<size_t>(rows + 1), 0);
  int32_t np = 0;
  const uint8_t lo = pb.deep_lo, span = static_cast<uint8_t>(pb.deep_hi - pb.deep_lo);
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* cr = codes + i * pb.l + j0;
    if (pos.size() < static_cast<size_t>(np + lc))  // room for this row's
      pos.resize(std::max(2 * pos.size(), static_cast<size_t>(np + lc)));
    int32_t* const out = pos.data();
    int64_t j = 0;
#if defined(__SSE2__)
    const __m128i vlo = _mm_set1_epi8(static_cast<char>(lo)), vspan = _mm_set1_epi8(static_cast<char>(span));
    for (; j + 16 <= lc; j += 16) {  // a bit mask of the deep codes of 16 bytes, then its set bits in order
      const __m128i d = _mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cr + j)), vlo);
      for (unsigned mask = static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_min_epu8(d, vspan), d)));
           mask != 0; mask &= mask - 1)
        out[np++] = static_cast<int32_t>(j + __builtin_ctz(mask));
    }
#endif
    for (; j < lc; ++j)
      if (static_cast<uint8_t>(cr[j] - lo) <= span) out[np++] = static_cast<int32_t>(j);
    start[i + 1] = np;
  }
}

// Adds the deep terms (t < 0, rounded one by one: sh(d, t) = round_half_up(d / 2^-t), weighted 2^16 or Q) at the
// listed positions of one row of codes (values from row j0 of v) to R for channels [c0, c0 + nc).
void add_deep(const Problem& pb, const KernelSet& ks, const uint8_t* cr, const uint8_t* v, int64_t j0,
              const int32_t* p0, const int32_t* p1, int64_t c0, int64_t nc, int64_t* r) {
  for (const int32_t* p = p0; p < p1; ++p) {
    const CodeInfo& ci = pb.info[cr[*p]];
    ks.deep_add(v + (j0 + *p) * pb.v.ld + c0, nc, pb.vxor, pb.zvp, ci.sft, ci.odd ? kQ : 65536, r);
  }
}

// Rows [r0, r1) of batch element bi. With one chunk of L, each 4 x 16 tile of R goes straight to the output
// stage; with several, R is kept in an int64 buffer across chunks.
void run_block(const Problem& pb, const KernelSet& ks, int64_t bi, int64_t r0, int64_t r1, int64_t chunk) {
  const int64_t n = pb.n, l = pb.l, rows = r1 - r0;
  const int64_t npan = ceil_div(n, kNR), quads = ceil_div(rows, kMR);
  const bool single = l <= chunk;
  const uint8_t* codes = pb.codes + (bi * pb.m + r0) * l;
  const uint8_t* v = pb.v.at(bi);
  std::vector<int64_t> rbuf(single ? 0 : static_cast<size_t>(rows * n), 0);
  std::vector<int64_t> rowsum(static_cast<size_t>(kPasses * rows), 0);
  std::vector<int32_t> corr_all(static_cast<size_t>(kPasses * rows), 0);  // zv' * row sum, mod 2^32
  std::vector<char> live_all(static_cast<size_t>(kPasses * quads), 0);
  Scratch vpan, apan[kPasses];
  std::vector<int32_t> dstart, dpos;
  for (int64_t j0 = 0; j0 == 0 || j0 < l; j0 += chunk) {
    const int64_t lc = std::min(chunk, l - j0), kg = ceil_div(lc, 4);
    if (pb.deep) deep_positions(pb, codes, rows, j0, lc, dstart, dpos);
    if (pb.npasses) {
      vpan.reset(static_cast<size_t>(npan * kg * 64));
      ks.shift_b(v + j0 * pb.v.ld, pb.v.ld, n, lc, kg, pb.vxor, reinterpret_cast<int8_t*>(vpan.p));
      // A panels of the passes the code table can produce: quad q at q * kg * 16, layout [kg][mr][4]
      for (int p = 0; p < kPasses; ++p) {
        if (!pb.possible[p]) continue;
        apan[p].reset(static_cast<size_t>(quads * kg * 16));
        for (int64_t q = 0; q < quads; ++q) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - q * kMR));
          int64_t* rs = rowsum.data() + p * rows + q * kMR;
          ks.shift_a(codes + q * kMR * l + j0, l, mr, lc, kg, pb.lut[p], pb.win[p], apan[p].p + q * kg * 16, rs);
          int64_t any = 0;
          for (int ri = 0; ri < mr; ++ri) {
            any |= rs[ri];
            corr_all[p * rows + q * kMR + ri] = static_cast<int32_t>(static_cast<uint32_t>(pb.zvp) *
                                                                    static_cast<uint32_t>(rs[ri]));
          }
          live_all[p * quads + q] = any != 0;  // weights are >= 0: zero row sums mean all-zero rows
        }
      }
    }
    const int64_t W = ks.ukr_shift_wide[1] ? kWideNP : 1;  // v panels per micro-kernel call
    alignas(64) int32_t tile[kPasses][kWideNP * kMR * kNR];
    int64_t acc[kWideNP][kMR * kNR];
    const bool direct = single && direct_out(pb, ks);
    for (int64_t q = 0; q < quads; ++q) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - q * kMR));
      bool live[kPasses];
      int32_t corr[kPasses][kMR];  // rows < mr
      for (int p = 0; p < kPasses; ++p) {
        live[p] = pb.possible[p] && live_all[p * quads + q];
        if (live[p]) std::memcpy(corr[p], corr_all.data() + p * rows + q * kMR, static_cast<size_t>(mr) * 4);
      }
      int slot[kPasses];
      ShiftTiles st = live_tiles(pb, live, corr[0], kMR, slot);
      for (int64_t pn0 = 0; pn0 < npan; pn0 += W) {
        const int np = static_cast<int>(std::min<int64_t>(W, npan - pn0));
        if (direct) {  // the live passes' tiles, then the output stage on them
          for (int i = 0; i < st.n; ++i) {
            const int8_t* ap = reinterpret_cast<const int8_t*>(apan[slot[i]].p + q * kg * 16);
            if (W > 1)
              ks.ukr_shift_wide[mr](ap, vpan.p + pn0 * kg * 64, kg * 64, np, kg, tile[i]);
            else
              ks.ukr_shift[mr](ap, vpan.p + pn0 * kg * 64, kg, tile[i]);
          }
          for (int j = 0; j < np; ++j) {
            const int64_t c0 = (pn0 + j) * kNR;
            for (int i = 0; i < st.n; ++i) st.t[i] = tile[i] + j * kMR * kNR;
            ks.shift_out(st, mr, static_cast<int>(std::min<int64_t>(kNR, n - c0)), pb.so, c0,
                         out_at(pb, bi, r0 + q * kMR, c0), pb.y.ld);
          }
          continue;
        }
        std::memset(acc, 0, sizeof(acc));
        for (int j = 0; j < np && !single; ++j) {
          const int64_t pn = pn0 + j, nc = std::min<int64_t>(kNR, n - pn * kNR);
          for (int ri = 0; ri < mr; ++ri)
            std::memcpy(acc[j] + ri * kNR, rbuf.data() + (q * kMR + ri) * n + pn * kNR,
                        static_cast<size_t>(nc) * sizeof(int64_t));
        }
        for (int p = 0; p < kPasses; ++p) {
          if (!live[p]) continue;
          const int8_t* ap = reinterpret_cast<const int8_t*>(apan[p].p + q * kg * 16);
          if (W > 1)
            ks.ukr_shift_wide[mr](ap, vpan.p + pn0 * kg * 64, kg * 64, np, kg, tile[0]);
          else
            ks.ukr_shift[mr](ap, vpan.p + pn0 * kg * 64, kg, tile[0]);
          for (int j = 0; j < np; ++j)
            ks.shift_acc(tile[0] + j * kMR * kNR, mr, corr[p], (p & 1) ? kQ : 65536, pb.frac_bits - pb.top[p], acc[j]);
        }
        for (int j = 0; j < np; ++j) {
          const int64_t pn = pn0 + j, nc = std::min<int64_t>(kNR, n - pn * kNR);
          for (int ri = 0; ri < mr; ++ri) {
            const int64_t i = q * kMR + ri;
            if (pb.deep && dstart[i + 1] > dstart[i])
              add_deep(pb, ks, codes + i * l + j0, v, j0, dpos.data() + dstart[i], dpos.data() + dstart[i + 1],
                       pn * kNR, nc, acc[j] + ri * kNR);
            if (single)
              out_span(pb, ks, acc[j] + ri * kNR, bi, r0 + i, pn * kNR, nc);
            else
              std::memcpy(rbuf.data() + i * n + pn * kNR, acc[j] + ri * kNR, static_cast<size_t>(nc) * sizeof(int64_t));
          }
        }
      }
    }
  }
  if (!single)
    for (int64_t i = 0; i < rows; ++i) out_span(pb, ks, rbuf.data() + i * n, bi, r0 + i, 0, n);
}

// run_block on AMX tiles (§10.8), for L within one chunk: per 16 rows, each pass's weights as byte rows (zero
// padded to kpad, a multiple of 64) against the v' panels, zero padded to kg k-groups (a multiple of 16), in
// TDPBUSD tiles. A tile is the same int32 sum as the VNNI micro-kernel's (u8 weights times int8 values, exact). The
// live passes go through amx_block two at a time (its two A tiles: one call per pair of panels for the usual two
// passes). shift_out combines the live passes' tiles into R and applies the output stage (direct_out), or stores R
// in an int64 buffer for the deep terms and out_span, kGroup channels at a time.
bool run_block_amx(const Problem& pb, const KernelSet& ks, int64_t bi, int64_t r0, int64_t r1) {
  constexpr int kRows = 16;  // rows of an AMX block: one A tile per pass
  constexpr int64_t kGroup = 256;
  const int64_t n = pb.n, l = pb.l, rows = r1 - r0, npan = ceil_div(n, kNR);
  const int64_t kg = round_up(std::max<int64_t>(1, ceil_div(l, 4)), 16), kpad = 4 * kg;
  const int64_t lda = std::min(kGroup, npan * kNR);
  const bool direct = direct_out(pb, ks);
  const uint8_t* codes = pb.codes + (bi * pb.m + r0) * l;
  const uint8_t* v = pb.v.at(bi);
  Scratch vpan, abuf, accb, tiles;
  vpan.reset(static_cast<size_t>(npan * kg * 64));
  if (pb.npasses) ks.shift_b(v, pb.v.ld, n, l, kg, pb.vxor, reinterpret_cast<int8_t*>(vpan.p));
  if (!direct) accb.reset(static_cast<size_t>(kRows * lda) * sizeof(int64_t));
  int64_t* const acc = reinterpret_cast<int64_t*>(accb.p);
  constexpr int64_t kCallTiles = 2 * 2 * kRows * kNR;  // one call's tiles: [panel][2 passes x 16 rows][16]
  tiles.reset(static_cast<size_t>(kPasses / 2 * kCallTiles) * sizeof(int32_t));
  int32_t* const tile = reinterpret_cast<int32_t*>(tiles.p);
  int32_t corr[kPasses][kRows];
  bool live[kPasses];
  int np = 0, pass[kPasses], wins[kPasses], at[kPasses];  // the passes the code table can produce; at: pass -> i
  const uint8_t* luts[kPasses];
  uint8_t* dst[kPasses];
  for (int p = 0; p < kPasses; ++p)
    if (pb.possible[p]) {
      luts[np] = pb.lut[p];
      wins[np] = pb.win[p];
      at[p] = np;
      pass[np++] = p;
    }
  // the weights of groups of blocks are mapped before the group's tiles run, not each block's just before them:
  // tile loads wait for the stores before them (measured: mapping each block's weights just before its tiles
  // made them about 1.5x slower), and a group of up to 64 KiB of weights comes back from L2
  const int64_t grp = std::min(round_up(rows, kRows),
                               std::max<int64_t>(kRows, 65536 / std::max<int64_t>(1, np * kpad) / kRows * kRows));
  abuf.reset(static_cast<size_t>(std::max(np, 1) * grp * kpad));
  for (int i = 0; i < np; ++i) dst[i] = abuf.p + i * grp * kpad;
  std::vector<uint32_t> rsum(static_cast<size_t>(std::max(np, 1) * grp));
  std::vector<int32_t> dstart, dpos;
  ks.amx_begin();
  for (int64_t rb = 0; rb < rows; rb += kRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kRows, rows - rb));
    const int64_t g0 = rb / grp * grp, gr = std::min(grp, rows - g0), ro = rb - g0;  // the group, row in it
    if (rb == g0) {
      for (int i = 0; i < np && gr < round_up(gr, kRows); ++i)  // rows the tiles read and nothing stores
        std::memset(dst[i] + gr * kpad, 0, static_cast<size_t>((round_up(gr, kRows) - gr) * kpad));
      const uint8_t seen = ks.amx_shift_rows(codes + g0 * l, l, static_cast<int>(gr), l, np, luts, wins, dst, kpad,
                                             rsum.data());
      if (seen & ~pb.code_mask) {  // a code above 2^bits - 1: this and the later rows are not written
        ks.amx_end();
        return false;
      }
      if (pb.deep) deep_positions(pb, codes + g0 * l, gr, 0, l, dstart, dpos);
    }
    const uint8_t* cb = codes + rb * l;
    std::fill(live, live + kPasses, false);
    for (int i = 0; i < np; ++i) {
      const int p = pass[i];
      for (int ri = 0; ri < mr; ++ri) {
        const uint32_t rs = rsum[i * gr + ro + ri];
        corr[p][ri] = static_cast<int32_t>(static_cast<uint32_t>(pb.zvp) * rs);  // zv' * row sum, mod 2^32
        live[p] |= rs != 0;  // weights are >= 0: a zero sum is an all-zero row
      }
    }
    int slot[kPasses];
    ShiftTiles st = live_tiles(pb, live, corr[0], kRows, slot);
    const uint8_t* a[kPasses];  // term t's weights
    for (int t = 0; t < st.n; ++t) a[t] = dst[at[slot[t]]] + ro * kpad;
    for (int64_t c0 = 0; c0 < n; c0 += lda) {
      const int64_t gc = std::min(lda, n - c0);
      for (int64_t pn = c0 / kNR; pn * kNR < c0 + gc; pn += 2) {
        const bool two = (pn + 1) * kNR < c0 + gc;
        const uint8_t* b0 = vpan.p + pn * kg * 64;
        const uint8_t* b1 = two ? b0 + kg * 64 : nullptr;
        // the next pair of panels in this group, whose first call's tiles the last call here loads
        const int64_t pq = pn + 2;
        const bool more = pq * kNR < c0 + gc, two_q = (pq + 1) * kNR < c0 + gc;
        const uint8_t* q0 = vpan.p + pq * kg * 64;
        for (int t = 0; t < st.n; t += 2) {  // terms t and t + 1 in one call's two A tiles
          const bool pair = t + 1 < st.n;
          const AmxNext next = t + 2 < st.n ? AmxNext{a[t + 2], t + 3 < st.n ? a[t + 3] : a[0], b0, b1, two}
                                            : AmxNext{more ? a[0] : nullptr, st.n > 1 ? a[1] : a[0], q0,
                                                      two_q ? q0 + kg * 64 : nullptr, two_q};
          ks.amx_block(a[t], pair ? a[t + 1] : a[t], kpad, b0, b1, kg / 16, two, pair ? 32 : 16,
                       tile + t / 2 * kCallTiles, t > 0 || pn > c0 / kNR, next.a0 ? &next : nullptr);
        }
        for (int j = 0; j < (two ? 2 : 1); ++j) {
          const int64_t cj = (pn + j) * kNR;
          const int nc = static_cast<int>(std::min<int64_t>(kNR, n - cj));
          for (int t = 0; t < st.n; ++t)  // term t: call t / 2, panel j, A tile t % 2
            st.t[t] = tile + t / 2 * kCallTiles + (j * 2 + (t & 1)) * kRows * kNR;
          if (direct)
            ks.shift_out(st, mr, nc, pb.so, cj, out_at(pb, bi, r0 + rb, cj), pb.y.ld);
          else
            ks.shift_out(st, mr, nc, pb.so_r, 0, acc + cj - c0, lda);  // R, for the deep terms
        }
      }
      if (!direct)
        for (int ri = 0; ri < mr; ++ri) {
          int64_t* ar = acc + ri * lda;
          const int64_t gi = ro + ri;
          if (pb.deep && dstart[gi + 1] > dstart[gi])
            add_deep(pb, ks, cb + ri * l, v, 0, dpos.data() + dstart[gi], dpos.data() + dstart[gi + 1], c0, gc, ar);
          out_span(pb, ks, ar, bi, r0 + rb + ri, c0, gc);
        }
    }
  }
  ks.amx_end();
  return true;
}

// The output stage in shift_out's form (pb.so, pb.so_r); its fold is the smallest F - top of the passes the
// codes can produce (every R is a multiple of 2^fold), less where the stage needs it: every shift S >= fold + 33
// for a requantized output, scale * 2^fold finite for float32.
void shift_stage(Problem& pb) {
  const OutStage& out = pb.out;
  const int64_t n = pb.n, npad = round_up(n, kNR);
  int fold = pb.frac_bits;
  for (int p = 0; p < kPasses; ++p)
    if (pb.possible[p]) fold = std::min(fold, pb.frac_bits - pb.top[p]);
  if (pb.all_wide_shifts)
    for (int64_t c = 0; c < n; ++c) fold = std::min(fold, out.shift[c] - 33);
  if (out.type == OutType::F32) {
    for (int64_t c = 0; c < n && fold > 0; ++c)
      if (!std::isfinite(std::ldexp(out.scale[c], fold))) fold = 0;
    pb.so_scale.assign(static_cast<size_t>(npad), 0.0f);
    for (int64_t c = 0; c < n; ++c) pb.so_scale[c] = std::ldexp(out.scale[c], fold);
  }
  pb.so_r.fold = fold;
  pb.so.type = out.type;
  pb.so.fold = fold;
  pb.so.scale = pb.so_scale.data();
  if (pb.all_wide_shifts) {
    pb.so_mult.assign(static_cast<size_t>(npad), 0);  // padded channels: M0 = 0
    pb.so_sh32.assign(static_cast<size_t>(npad), 1);
    pb.so_rnd.assign(static_cast<size_t>(npad), 0);
    for (int64_t c = 0; c < n; ++c) {
      const int64_t at = c / kNR * kNR + (c % 2) * 8 + (c % kNR) / 2;  // the panel's even channels, then its odd
      const int s = out.shift[c] - fold;
      pb.so_mult[at] = out.multiplier[c];
      pb.so_sh32[at] = s - 32;
      pb.so_rnd[at] = int64_t(1) << (s - 33);
    }
    pb.so.mult = pb.so_mult.data();
    pb.so.sh32 = pb.so_sh32.data();
    pb.so.rnd = pb.so_rnd.data();
    pb.so.zy = out.zero_point;
    pb.so.lo = static_cast<int64_t>(out_qmin(out.type)) - out.zero_point;
    pb.so.hi = static_cast<int64_t>(out_qmax(out.type)) - out.zero_point;
  }
}

}  // namespace

bool log2_attn_matmul(const uint8_t* codes, const RowBatch& v, ActType vt, int64_t batch, int64_t m, int64_t l,
                      int64_t n, int32_t zv, int bits, int k, int frac_bits, const OutStage& out, const OutRows& y) {
  const uint8_t code_mask = static_cast<uint8_t>((1 << bits) - 1);
  if (batch == 0 || m == 0 || n == 0) return !bytes_exceed(codes, batch * m * l, code_mask);
  const KernelSet& ks = kernels_for(resolve_isa());
  auto pb = std::make_unique<Problem>();
  pb->codes = codes;
  pb->code_mask = code_mask;
  pb->v = v;
  pb->vxor = vt == ActType::U8 ? 0x80 : 0;
  pb->m = m;
  pb->l = l;
  pb->n = n;
  pb->zvp = vt == ActType::U8 ? zv - 128 : zv;
  pb->out = out;
  pb->y = y;
  pb->all_wide_shifts = is_requant(out.type);
  for (int64_t c = 0; c < n && pb->all_wide_shifts; ++c) pb->all_wide_shifts = out.shift[c] >= 33;
  const int zero_code = (1 << bits) - 1;
  for (int c = 0; c < 256; ++c) {
    CodeInfo& ci = pb->info[c];
    ci = CodeInfo{-1, 0, 0, 0};
    if (c >= zero_code) continue;  // the zero code (larger codes were rejected by the caller)
    const int e = (c + k - 1) / k;  // ceil(c / k)
    ci.odd = static_cast<int8_t>(k == 2 && (c & 1));
    if (e > frac_bits) {
      // a deep term round_half_up(d / 2^sft) with |d| <= 255 is 0 once sft >= 9: such codes add nothing
      if (e - frac_bits < 9) {
        ci.pass = -2;
        ci.sft = static_cast<int8_t>(e - frac_bits);
      }
      continue;
    }
    const int band = e / 8, top = std::min(8 * band + 7, frac_bits);
    ci.pass = static_cast<int8_t>(2 * band + ci.odd);
    ci.w = static_cast<uint8_t>(1u << (top - e));
  }
  std::memset(pb->lut, 0, sizeof(pb->lut));
  std::fill(pb->possible, pb->possible + kPasses, false);
  int dlo = 256, dhi = -1;
  for (int c = 0; c < 256; ++c) {
    const CodeInfo& ci = pb->info[c];
    if (ci.pass >= 0) {
      pb->lut[ci.pass][c] = ci.w;
      pb->possible[ci.pass] = true;
    }
    if (ci.pass == -2) dlo = std::min(dlo, c), dhi = std::max(dhi, c);
  }
  pb->deep = dhi >= 0;  // e(c) is monotone in c, so the deep codes are one range
  pb->deep_lo = static_cast<uint8_t>(pb->deep ? dlo : 0);
  pb->deep_hi = static_cast<uint8_t>(pb->deep ? dhi : 0);
  pb->npasses = static_cast<int>(std::count(pb->possible, pb->possible + kPasses, true));
  for (int p = 0; p < kPasses; ++p) {
    int lo = 256, hi = -1;
    for (int c = 0; c < 256; ++c)
      if (pb->lut[p][c]) lo = std::min(lo, c), hi = std::max(hi, c);
    pb->win[p] = hi < 0 ? 0 : (hi - lo < 16 ? lo : -1);
  }
  pb->frac_bits = frac_bits;
  for (int p = 0; p < kPasses; ++p) pb->top[p] = std::min(8 * (p / 2) + 7, frac_bits);
  shift_stage(*pb);
  // chunk of L: int32 sums stay exact and the B panel stays within about 4 MiB
  const int64_t npan = ceil_div(n, kNR);
  const int64_t chunk = std::min(kMaxChunk, 4 * std::max<int64_t>(1, (int64_t(1) << 16) / npan));
  // rows per task: all of M (the B panel is packed once per task), fewer when N is wide (R scratch) or when
  // there are few tasks for the threads
  const int64_t threads = ThreadPool::instance().num_threads();
  int64_t mb = std::max<int64_t>(kMR, std::min<int64_t>(round_up(m, kMR), ((int64_t(1) << 20) / n) / kMR * kMR));
  while (mb > kMR && batch * ceil_div(m, mb) < 4 * threads) mb = round_up(mb / 2, kMR);
  const int64_t blocks = ceil_div(m, mb);
  const bool amx = ks.amx_block != nullptr && l <= chunk;
  // each task checks its codes as it first reads them (AMX: while mapping them to weights) and skips its rows if
  // one is out of range
  std::atomic<bool> valid{true};
  ThreadPool::instance().run(batch * blocks, [&](int64_t task, int) {
    if (!valid.load(std::memory_order_relaxed)) return;
    const int64_t bi = task / blocks, r0 = (task % blocks) * mb, r1 = std::min(m, r0 + mb);
    bool ok;
    if (amx) {
      ok = run_block_amx(*pb, ks, bi, r0, r1);
    } else {
      ok = !bytes_exceed(codes + (bi * m + r0) * l, (r1 - r0) * l, code_mask);
      if (ok) run_block(*pb, ks, bi, r0, r1, chunk);
    }
    if (!ok) valid.store(false, std::memory_order_relaxed);
  });
  return valid.load();
}

}  // namespace qsim
