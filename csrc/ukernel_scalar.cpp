// Portable scalar kernels: the reference-shaped path every CPU can run (PYQSIM_CPU_ISA=scalar).
// Integer sums are computed in uint32 (two's-complement wrap-around, §4.1 allows it; no signed
// overflow UB); the float stage is fl32(fl32(acc) * scale) with no contraction (-ffp-contract=off).
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace qsim {
namespace detail {
namespace {

#include "generic_impl.h"

template <int MR>
void ukr_scalar(const int8_t* a, const uint8_t* bpanel, int64_t kg, int32_t* tile) {
  const int8_t* b = reinterpret_cast<const int8_t*>(bpanel);
  uint32_t acc[MR][kNR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kNR; ++c) acc[r][c] = 0;
  for (int64_t g = 0; g < kg; ++g) {
    const int8_t* ag = a + g * MR * 8;  // x' half
    const int8_t* bg = b + g * kNR * 4;
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < kNR; ++c) {
        int32_t s = 0;
        for (int q = 0; q < 4; ++q) s += static_cast<int32_t>(ag[r * 4 + q]) * static_cast<int32_t>(bg[c * 4 + q]);
        acc[r][c] += static_cast<uint32_t>(s);
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kNR; ++c) tile[r * kNR + c] = static_cast<int32_t>(acc[r][c]);
}

// §7 shift weights: tile = sum a * b, a uint8 in [0, 128] (A panel [kg][MR][4]), b int8.
template <int MR>
void ukr_shift_scalar(const int8_t* apanel, const uint8_t* bpanel, int64_t kg, int32_t* tile) {
  const uint8_t* a = reinterpret_cast<const uint8_t*>(apanel);
  const int8_t* b = reinterpret_cast<const int8_t*>(bpanel);
  int32_t acc[MR][kNR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kNR; ++c) acc[r][c] = 0;
  for (int64_t g = 0; g < kg; ++g) {
    const uint8_t* ag = a + g * MR * 4;
    const int8_t* bg = b + g * kNR * 4;
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < kNR; ++c) {
        int32_t s = 0;
        for (int q = 0; q < 4; ++q) s += static_cast<int32_t>(ag[r * 4 + q]) * static_cast<int32_t>(bg[c * 4 + q]);
        acc[r][c] += s;  // |sum| < 2^31 by the driver's L chunking
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kNR; ++c) tile[r * kNR + c] = acc[r][c];
}

void shift_a_scalar(const uint8_t* codes, int64_t ldc, int mr, int64_t lc, int64_t kg, const uint8_t* lut, int,
                    uint8_t* dst, int64_t* rowsum) {
  for (int r = 0; r < mr; ++r) rowsum[r] = 0;
  shift_a_rows(codes, ldc, mr, 0, lc, kg, lut, dst, rowsum);
}

void shift_b_scalar(const uint8_t* v, int64_t ldv, int64_t n, int64_t lc, int64_t kg, uint8_t vxor, int8_t* dst) {
  shift_b_rows(v, ldv, n, lc, 0, kg, vxor, dst);
}

void shift_requant_scalar(const int64_t* r, int64_t nc, const int32_t* mult, const int32_t* shift, int32_t zy,
                          int32_t lo, int32_t hi, bool s8, void* out) {
  shift_requant_rows(r, 0, nc, mult, shift, zy, lo, hi, s8, out);
}

// 4-bit weights: tile = sum u * c with u = x' + 128 (the A panel's second half) and stored codes c.
template <int MR>
void ukr4_scalar(const int8_t* a, const uint8_t* bpanel, int64_t kg, int32_t* tile) {
  uint32_t acc[MR][kNR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kNR; ++c) acc[r][c] = 0;
  for (int64_t g = 0; g < kg; ++g) {
    const uint8_t* ag = reinterpret_cast<const uint8_t*>(a) + g * MR * 8 + MR * 4;  // u half
    const uint8_t* bg = bpanel + g * kNR * 4;
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < kNR; ++c) {
        uint32_t s = 0;
        for (int q = 0; q < 4; ++q) s += static_cast<uint32_t>(ag[r * 4 + q]) * static_cast<uint32_t>(bg[c * 4 + q]);
        acc[r][c] += s;
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < kNR; ++c) tile[r * kNR + c] = static_cast<int32_t>(acc[r][c]);
}

inline int32_t corrected(const int32_t* t, const int32_t* colc, const int32_t* zw, const int32_t* rs, int r, int c,
                         int64_t n) {
  uint32_t v = static_cast<uint32_t>(t[r * kNR + c]) + static_cast<uint32_t>(colc[n]);
  if (zw) v -= static_cast<uint32_t>(zw[n]) * static_cast<uint32_t>(rs[r]);
  return static_cast<int32_t>(v);
}

void epi_scalar(const Epi& e, int64_t n0, int mr, int nc, const int32_t* t1, const int32_t* rs1, const int32_t* t2,
                const int32_t* rs2, const TileOut& o) {
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < nc; ++c) {
      const int64_t n = n0 + c;
      const int64_t off = r * o.ldm + c * o.ldn;
      const int32_t a1 = corrected(t1, e.colc1, e.zw1, rs1, r, c, n);
      const int32_t a2 = e.split ? corrected(t2, e.colc2, e.zw2, rs2, r, c, n) : 0;
      switch (e.type) {
        case OutType::I32:
          static_cast<int32_t*>(o.out)[off] = a1;
          break;
        case OutType::F32: {
          const float y1 = static_cast<float>(a1) * e.s1[n];
          if (e.split) {
            const float y2 = static_cast<float>(a2) * e.s2[n];
            static_cast<float*>(o.out)[off] = y1 + y2;
          } else {
            static_cast<float*>(o.out)[off] = y1;
          }
          break;
        }
        default: {
          int64_t p = static_cast<int64_t>(a1) * e.m1[n];
          if (e.split) p += static_cast<int64_t>(a2) * e.m2[n];
          const int32_t y = requant_one(p, e.rnd[n], e.sh[n], e.zy, e.lo, e.hi);
          if (e.type == OutType::S8 || e.type == OutType::S4)
            static_cast<int8_t*>(o.out)[off] = static_cast<int8_t>(y);
          else
            static_cast<uint8_t*>(o.out)[off] = static_cast<uint8_t>(y);
        }
      }
    }
}

void unpack4_scalar(const uint8_t* src, int64_t kg, uint8_t* dst) {
  for (int64_t g8 = 0; g8 < kg / 2; ++g8)
    for (int i = 0; i < 64; ++i) {
      const uint8_t v = src[g8 * 64 + i];
      dst[(2 * g8) * 64 + i] = static_cast<uint8_t>(v & 0xF);
      dst[(2 * g8 + 1) * 64 + i] = static_cast<uint8_t>(v >> 4);
    }
}

void fill_second_scalar(int8_t* panel, int64_t kg, int mr, bool u_half) {
  for (int64_t g = 0; g < kg; ++g) {
    int8_t* p = panel + g * 8 * mr;
    for (int i = 0; i < 4 * mr; ++i) {
      const int v = p[i];
      const int s = u_half ? v + 128 : (v < 0 ? -v : v);  // u = x' + 128, or |x'|
      p[4 * mr + i] = static_cast<int8_t>(static_cast<uint8_t>(s));
    }
  }
}

void pack_a_scalar(const uint8_t* x, int64_t ldx, int mr, int64_t k, int64_t kg, uint8_t mask, bool u_half,
                   int8_t* dst, int32_t* rowsum) {
  for (int r = 0; r < mr; ++r) {
    const uint8_t* row = x + r * ldx;
    int32_t s = 0;
    for (int64_t j = 0; j < kg * 4; ++j) {
      const int8_t v = j < k ? static_cast<int8_t>(row[j] ^ mask) : 0;
      dst[(j >> 2) * mr * 8 + r * 4 + (j & 3)] = v;
      s += v;  // |s| <= 128 * K: fits (K is bounded by §4.1)
    }
    rowsum[r] = s;
  }
  fill_second_scalar(dst, kg, mr, u_half);
}

}  // namespace

const KernelSet& scalar_kernels() {
  static const KernelSet ks = [] {
    KernelSet k{};
    k.isa = Isa::Scalar;
    k.ukr[0] = nullptr;
    k.ukr[1] = ukr_scalar<1>;
    k.ukr[2] = ukr_scalar<2>;
    k.ukr[3] = ukr_scalar<3>;
    k.ukr[4] = ukr_scalar<4>;
    k.epi = epi_scalar;
    k.unpack4 = unpack4_scalar;
    k.pack_a = pack_a_scalar;
    k.ukr4[1] = ukr4_scalar<1>;
    k.ukr4[2] = ukr4_scalar<2>;
    k.ukr4[3] = ukr4_scalar<3>;
    k.ukr4[4] = ukr4_scalar<4>;
    for (int i = 0; i <= kMR; ++i) k.ukr4_nib[i] = nullptr;
    k.requant_run = requant_run_impl;
    k.profile_run = profile_run_impl;
    QSIM_MR_TABLE(k.ukr_shift, ukr_shift_scalar);
    k.shift_a = shift_a_scalar;
    k.shift_b = shift_b_scalar;
    k.shift_acc = shift_acc_impl;
    k.deep_add = deep_add_impl;
    k.shift_f32 = shift_f32_impl;
    k.shift_requant = shift_requant_scalar;
    return k;
  }();
  return ks;
}

}  // namespace detail
}  // namespace qsim
