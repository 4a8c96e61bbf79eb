// conv2d (§5) and split conv2d (§8) as GEMMs over on-the-fly im2col panels.
//
// The input is first transposed to NHWC and mapped to x' (x - 128 for uint8, §10 step 1). Output
// row p = (oi, oj) of a (batch, group) GEMM reads, for every kernel tap (i, j), a contiguous run of the
// group's C/g channels (or the zero point x' for taps in the padding); the weights were packed with the
// same (i, j, c) k order, channels padded to a multiple of 4 per tap. Output channels are GEMM columns,
// written to NCHW with a column stride of OH*OW.
#include <algorithm>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "driver.h"
#include "threadpool.h"

namespace qsim {
namespace detail {
namespace {

struct ConvA final : ASource {
  const int8_t* xn = nullptr;  // [H][W][C] x' of one image
  int64_t h = 0, w = 0, c = 0;
  int64_t c0 = 0, cg = 0, cg4 = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, ow = 1;
  int64_t kg = 0;
  int8_t fill = 0;
  bool u_half = false;  // 4-bit weights: second half holds u = x' + 128

  // The im2col row of output pixel p (k order: tap, channel; channels padded to cg4 with 0), kg * 4 bytes of x'.
  void im2col_row(int64_t p, int8_t* row) const {
    std::memset(row, 0, static_cast<size_t>(kg * 4));
    const int64_t oi = p / ow, oj = p % ow;
    if (cg4 == 4) {  // 1-4 channels (an RGB input): one 4-byte move per tap, the bytes above cg cleared
      const uint32_t keep = cg == 4 ? 0xFFFFFFFFu : (1u << (8 * cg)) - 1u;
      const uint32_t pad = (0x01010101u * static_cast<uint8_t>(fill)) & keep;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t ih = oi * sh + i * dh - ph;
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t iw = oj * sw + j * dw - pw;
          uint32_t v = pad;
          if (ih >= 0 && ih < h && iw >= 0 && iw < w) {
            std::memcpy(&v, xn + (ih * w + iw) * c + c0, 4);  // may read past the image: to_nhwc's slack bytes
            v &= keep;
          }
          std::memcpy(row + (i * kw + j) * 4, &v, 4);
        }
      }
      return;
    }
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t ih = oi * sh + i * dh - ph;
      for (int64_t j = 0; j < kw; ++j) {
        const int64_t iw = oj * sw + j * dw - pw;
        int8_t* d = row + (i * kw + j) * cg4;
        if (ih < 0 || ih >= h || iw < 0 || iw >= w)
          std::memset(d, static_cast<uint8_t>(fill), static_cast<size_t>(cg));
        else
          std::memcpy(d, xn + (ih * w + iw) * c + c0, static_cast<size_t>(cg));
      }
    }
  }

  // Builds the mr im2col rows in a scratch buffer with memcpy runs, then lets the ISA's pack_a interleave them and
  // take the row sums.
  void pack(const KernelSet& ks, int64_t m0, int mr, int8_t* dst, int32_t* rowsum) const override {
    const int64_t kp = kg * 4;
    thread_local std::vector<int8_t> rows;
    if (rows.size() < static_cast<size_t>(kMR * kp)) rows.resize(static_cast<size_t>(kMR * kp));
    // Empty reduction (C/groups = 0, so kp = 0): no tap holds a channel; visiting KH x KW taps per output
    // pixel would be pure waste (and rows.data() may be null). The GEMM then gives bias + output stage.
    if (cg > 0)
      for (int r = 0; r < mr; ++r) im2col_row(m0 + r, rows.data() + r * kp);
    ks.pack_a(reinterpret_cast<const uint8_t*>(rows.data()), kp, mr, kp, kg, 0, u_half, dst, rowsum);
  }

  // §10.8: each im2col row (x', int8) then u = x' ^ 0x80 = x' + 128, zero padded to kpad
  bool amx_rows(const KernelSet& ks, int64_t m0, int mr, int64_t kpad, uint8_t* dst, int32_t* rowsum) const override {
    const int64_t kp = kg * 4;
    thread_local std::vector<int8_t> row;
    if (row.size() < static_cast<size_t>(kp)) row.resize(static_cast<size_t>(kp));
    for (int r = 0; r < mr; ++r) {
      im2col_row(m0 + r, row.data());
      rowsum[r] = static_cast<int32_t>(ks.amx_pack_row(reinterpret_cast<const uint8_t*>(row.data()), kp, 0x80,
                                                       dst + r * kpad, kpad) - 128u * static_cast<uint32_t>(kp));
    }
    return true;
  }
};

#if defined(__SSE2__)
// 16 x 16 byte transpose (rows of src -> columns of dst) with the x' mapping (XOR mask), SSE2 only
// (baseline x86-64): unpack bytes, words, dwords, qwords.
inline void transpose16(const uint8_t* src, int64_t ss, int8_t* dst, int64_t ds, __m128i mask) {
  __m128i a[16], s1[8][2], s2[4][4], s3[2][8];
  for (int i = 0; i < 16; ++i)
    a[i] = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ss)), mask);
  for (int g = 0; g < 8; ++g) {
    s1[g][0] = _mm_unpacklo_epi8(a[2 * g], a[2 * g + 1]);  // columns 0..7, rows 2g, 2g+1
    s1[g][1] = _mm_unpackhi_epi8(a[2 * g], a[2 * g + 1]);  // columns 8..15
  }
  for (int q = 0; q < 4; ++q)
    for (int h = 0; h < 2; ++h) {
      s2[q][2 * h] = _mm_unpacklo_epi16(s1[2 * q][h], s1[2 * q + 1][h]);      // columns 8h..8h+3
      s2[q][2 * h + 1] = _mm_unpackhi_epi16(s1[2 * q][h], s1[2 * q + 1][h]);  // columns 8h+4..8h+7
    }
  for (int o = 0; o < 2; ++o)
    for (int j = 0; j < 4; ++j) {
      s3[o][2 * j] = _mm_unpacklo_epi32(s2[2 * o][j], s2[2 * o + 1][j]);      // columns 4j, 4j+1
      s3[o][2 * j + 1] = _mm_unpackhi_epi32(s2[2 * o][j], s2[2 * o + 1][j]);  // columns 4j+2, 4j+3
    }
  for (int i = 0; i < 8; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i) * ds), _mm_unpacklo_epi64(s3[0][i], s3[1][i]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i + 1) * ds), _mm_unpackhi_epi64(s3[0][i], s3[1][i]));
  }
}
#endif

// d[p][ci] = s[ci * ld + p] ^ mask for p in [p0, p1), ci in [0, c): 16 x 16 byte tiles (SSE2), scalar edges.
void transpose_block(const uint8_t* s, int64_t ld, int64_t c, int64_t p0, int64_t p1, int8_t* d, uint8_t mask) {
  int64_t pf = p0;
#if defined(__SSE2__)
  const __m128i vm = _mm_set1_epi8(static_cast<char>(mask));
  const int64_t c16 = c / 16 * 16;
  for (; pf + 16 <= p1; pf += 16)
    for (int64_t ci = 0; ci < c16; ci += 16) transpose16(s + ci * ld + pf, ld, d + pf * c + ci, c, vm);
  for (int64_t p = p0; p < pf; ++p)
    for (int64_t ci = c16; ci < c; ++ci) d[p * c + ci] = static_cast<int8_t>(s[ci * ld + p] ^ mask);
#endif
  for (int64_t ci = 0; ci < c; ++ci)
    for (int64_t p = pf; p < p1; ++p) d[p * c + ci] = static_cast<int8_t>(s[ci * ld + p] ^ mask);
}

constexpr int64_t kTransposeTask = 64;  // positions (output rows) per task

}  // namespace
}  // namespace detail

void transpose_batches(const RowBatch& src, int64_t batch, int64_t rows, int64_t cols, uint8_t* dst) {
  if (batch == 0 || rows == 0 || cols == 0) return;
  const int64_t blocks = detail::ceil_div(rows, detail::kTransposeTask);
  ThreadPool::instance().run(batch * blocks, [&](int64_t task, int) {
    const int64_t bi = task / blocks, p0 = (task % blocks) * detail::kTransposeTask;
    detail::transpose_block(src.at(bi), src.ld, cols, p0, std::min(rows, p0 + detail::kTransposeTask),
                            reinterpret_cast<int8_t*>(dst + bi * rows * cols), 0);
  });
}

namespace detail {
namespace {

// x [B, C, H, W] -> x' [B, H, W, C]; 4 zero bytes past the end (the 4-byte reads of im2col_row)
std::vector<int8_t> to_nhwc(const void* x, ActType t, int64_t b, int64_t c, int64_t h, int64_t w) {
  // An empty input has nothing to transpose (with C = 0, B * H * W alone may be huge).
  if (b == 0 || c == 0 || h == 0 || w == 0) return {};
  std::vector<int8_t> out(static_cast<size_t>(b * c * h * w + 4), 0);
  const uint8_t* src = static_cast<const uint8_t*>(x);
  const uint8_t mask = t == ActType::U8 ? 0x80 : 0;
  const int64_t hw = h * w;
  const int64_t pblocks = ceil_div(hw, kTransposeTask);
  ThreadPool::instance().run(b * pblocks, [&](int64_t task, int) {
    const int64_t bi = task / pblocks, p0 = (task % pblocks) * kTransposeTask;
    transpose_block(src + bi * c * hw, hw, c, p0, std::min(hw, p0 + kTransposeTask), out.data() + bi * hw * c, mask);
  });
  return out;
}

Epi offset_epi(const Epi& e, int64_t off) {
  Epi r = e;
  auto adv = [off](auto*& p) {
    if (p) p += off;
  };
  adv(r.colc1);
  adv(r.zw1);
  adv(r.colc2);
  adv(r.zw2);
  adv(r.m1);
  adv(r.m2);
  adv(r.sh);
  adv(r.rnd);
  adv(r.s1);
  adv(r.s2);
  adv(r.m1_32);
  adv(r.m2_32);
  adv(r.rnd32);
  adv(r.shr32);
  return r;
}


ConvA make_conv_a(const std::vector<int8_t>& xn, int64_t bi, int64_t c, int64_t c0, int64_t cg, const ConvGeom& g,
                  const PackedWeight& w, const PackedMatrix& pm, ActType t, int32_t zx) {
  ConvA a;
  a.xn = xn.data() + bi * g.h * g.w * c;
  a.h = g.h;
  a.w = g.w;
  a.c = c;
  a.c0 = c0;
  a.cg = cg;
  a.cg4 = round_up(cg, 4);
  a.kh = w.kh;
  a.kw = w.kw;
  a.sh = g.sh;
  a.sw = g.sw;
  a.ph = g.ph;
  a.pw = g.pw;
  a.dh = g.dh;
  a.dw = g.dw;
  a.ow = g.ow;
  a.kg = pm.kg;
  a.fill = static_cast<int8_t>(mapped_zero_point(t, zx));
  a.u_half = pm.format != WFormat::S8;
  return a;
}

}  // namespace
}  // namespace detail

using namespace detail;

void int_conv2d(const void* x, ActType xt, int32_t zx, const ConvGeom& g, const PackedWeight& w, const int32_t* zw,
                const int32_t* bias, const OutStage& out, void* y) {
  const int64_t o = w.n, groups = w.groups, og = groups ? o / groups : 0, cg = w.cin_g;
  const int64_t ohw = g.oh * g.ow;
  if (g.batch == 0 || o == 0 || ohw == 0) return;
  const Isa isa = resolve_isa();
  EpiStorage st;
  prepare_out(st, o, out);
  const size_t np = static_cast<size_t>(round_up(o, kNR) + kNR);
  st.colc1.assign(np, 0);
  st.zw1.assign(np, 0);
  const int32_t zxm = mapped_zero_point(xt, zx);
  bool any_zw = false;
  for (int64_t gi = 0; gi < groups; ++gi)
    any_zw |= fill_branch_consts(isa, og, w.mats[gi], w.mats[gi].colsum.data(), zw + gi * og, zxm, w.k,
                                 bias ? bias + gi * og : nullptr, st.colc1.data() + gi * og, st.zw1.data() + gi * og);
  st.epi.colc1 = st.colc1.data();
  if (any_zw) st.epi.zw1 = st.zw1.data();

  std::vector<int8_t> xn = to_nhwc(x, xt, g.batch, g.cin, g.h, g.w);
  std::vector<ConvA> as;
  as.reserve(static_cast<size_t>(g.batch * groups));
  std::vector<GemmJob> jobs;
  const int64_t esz = out_elem_size(out.type);
  for (int64_t bi = 0; bi < g.batch; ++bi)
    for (int64_t gi = 0; gi < groups; ++gi) {
      as.push_back(make_conv_a(xn, bi, g.cin, gi * cg, cg, g, w, w.mats[gi], xt, zx));
      GemmJob jb;
      jb.m = ohw;
      jb.n = og;
      jb.br[0] = {&as.back(), &w.mats[gi]};
      jb.epi = offset_epi(st.epi, gi * og);
      jb.out = static_cast<char*>(y) + (bi * o + gi * og) * ohw * esz;
      jb.ldm = 1;
      jb.ldn = ohw;
      jb.elem = esz;
      jobs.push_back(jb);
    }
  run_jobs(jobs, isa);
}

void split_conv2d(const void* x1, ActType xt1, int32_t zx1, int64_t c1, const PackedWeight& w1, const int32_t* zw1,
                  const void* x2, ActType xt2, int32_t zx2, int64_t c2, const PackedWeight& w2, const int32_t* zw2,
                  const ConvGeom& g, const int32_t* bias, const SplitOutStage& out, void* y) {
  const int64_t o = w1.n, ohw = g.oh * g.ow;
  if (g.batch == 0 || o == 0 || ohw == 0) return;
  const Isa isa = resolve_isa();
  EpiStorage st;
  prepare_split_out(st, o, out);
  const size_t np = static_cast<size_t>(round_up(o, kNR) + kNR);
  st.colc1.assign(np, 0);
  st.colc2.assign(np, 0);
  st.zw1.assign(np, 0);
  st.zw2.assign(np, 0);
  if (fill_branch_consts(isa, o, w1.mats[0], w1.mats[0].colsum.data(), zw1, mapped_zero_point(xt1, zx1), w1.k, bias,
                         st.colc1.data(), st.zw1.data()))
    st.epi.zw1 = st.zw1.data();
  if (fill_branch_consts(isa, o, w2.mats[0], w2.mats[0].colsum.data(), zw2, mapped_zero_point(xt2, zx2), w2.k, nullptr,
                         st.colc2.data(), st.zw2.data()))
    st.epi.zw2 = st.zw2.data();
  st.epi.colc1 = st.colc1.data();
  st.epi.colc2 = st.colc2.data();

  std::vector<int8_t> xn1 = to_nhwc(x1, xt1, g.batch, c1, g.h, g.w);
  std::vector<int8_t> xn2 = to_nhwc(x2, xt2, g.batch, c2, g.h, g.w);
  std::vector<ConvA> as;
  as.reserve(static_cast<size_t>(2 * g.batch));
  std::vector<GemmJob> jobs;
  const int64_t esz = out_elem_size(out.type);
  for (int64_t bi = 0; bi < g.batch; ++bi) {
    as.push_back(make_conv_a(xn1, bi, c1, 0, c1, g, w1, w1.mats[0], xt1, zx1));
    const ConvA* a1 = &as.back();
    as.push_back(make_conv_a(xn2, bi, c2, 0, c2, g, w2, w2.mats[0], xt2, zx2));
    const ConvA* a2 = &as.back();
    GemmJob jb;
    jb.m = ohw;
    jb.n = o;
    jb.nbranch = 2;
    jb.br[0] = {a1, &w1.mats[0]};
    jb.br[1] = {a2, &w2.mats[0]};
    jb.epi = st.epi;
    jb.out = static_cast<char*>(y) + bi * o * ohw * esz;
    jb.ldm = 1;
    jb.ldn = ohw;
    jb.elem = esz;
    jobs.push_back(jb);
  }
  run_jobs(jobs, isa);
}

}  // namespace qsim
