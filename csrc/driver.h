// The blocked, threaded GEMM driver shared by the GEMM and conv ops.
//
// Blocking: a task owns MC (<= 64) output rows and a range of 16-channel weight panels. It packs its
// rows of A once (full K: K is not blocked; a 4 x K A panel and a 16 x K B panel are streamed from
// L1/L2 by the micro-kernel), then for each weight panel runs the 4x16 micro-kernel down its rows and
// applies the output stage to each register tile straight away (no int32 C buffer).
// Threads: tasks go to the pool; each output element is computed by exactly one task with the same
// arithmetic, so the result does not depend on the number of threads.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"
#include "qsim.h"

namespace qsim {
namespace detail {

// Produces packed A panels ([kg][2][mr][4]: x', |x'|) and x' row sums for rows [m0, m0 + mr).
struct ASource {
  virtual ~ASource() = default;
  virtual void pack(const KernelSet& ks, int64_t m0, int mr, int8_t* dst, int32_t* rowsum) const = 0;
  // §10.8 (ks.amx_pack_row): rows [m0, m0 + mr) as u = x' + 128, kpad bytes each (zero padded), and their x' sums;
  // false when this source has no such form
  virtual bool amx_rows(const KernelSet& ks, int64_t m0, int mr, int64_t kpad, uint8_t* dst, int32_t* rowsum) const {
    return false;
  }
};

// Row-major activations [M, K], rows ld >= K bytes apart (ld = K: a plain matrix).
struct MatrixA final : ASource {
  const uint8_t* x;
  int64_t k, kg, ld;
  uint8_t xor_mask;
  bool u_half;
  MatrixA(const void* x_, int64_t k_, const PackedMatrix& pm, ActType t, int64_t ld_ = -1)
      : x(static_cast<const uint8_t*>(x_)),
        k(k_),
        kg(pm.kg),
        ld(ld_ < 0 ? k_ : ld_),
        xor_mask(t == ActType::U8 ? 0x80 : 0),
        u_half(pm.format != WFormat::S8) {}
  void pack(const KernelSet& ks, int64_t m0, int mr, int8_t* dst, int32_t* rowsum) const override {
    ks.pack_a(x + m0 * ld, ld, mr, k, kg, xor_mask, u_half, dst, rowsum);
  }
  bool amx_rows(const KernelSet& ks, int64_t m0, int mr, int64_t kpad, uint8_t* dst, int32_t* rowsum) const override {
    const uint8_t ux = static_cast<uint8_t>(xor_mask ^ 0x80);  // u = x' + 128 = x ^ ux
    for (int r = 0; r < mr; ++r)
      rowsum[r] = static_cast<int32_t>(ks.amx_pack_row(x + (m0 + r) * ld, k, ux, dst + r * kpad, kpad) -
                                       128u * static_cast<uint32_t>(k));
    return true;
  }
};

struct Branch {
  const ASource* a = nullptr;
  const PackedMatrix* b = nullptr;
};

struct GemmJob {
  int64_t m = 0, n = 0;
  int nbranch = 1;
  Branch br[2];
  Epi epi;        // per-channel pointers already offset to this job's first channel
  char* out = nullptr;  // element (0, 0)
  int64_t ldm = 0, ldn = 1;  // in elements
  int64_t elem = 4;          // bytes per output element
};

// Owns the per-channel vectors an Epi points to.
struct EpiStorage {
  std::vector<int32_t> colc1, zw1, colc2, zw2;
  std::vector<int64_t> m1, m2, sh, rnd;
  std::vector<int32_t> m1_32, m2_32, rnd32, shr32;
  std::vector<float> s1, s2;
  Epi epi;
};

// Per-branch epilogue constants for n channels of packed matrix `pm` (mod 2^32, §4 expansion):
//   int8 weights : tile = sum x' w            acc = tile + colc - zw * rs,  colc = bias - zx' cs + K zx' zw
//   4-bit weights: tile = sum (x' + 128) c,   w = c - off, zwe = zw + off,
//                  acc = tile + colc - zwe * rs,  colc = bias - (zx' + 128) cs + K zx' zwe
// with rs = sum x' (rows) and cs = sum of the stored codes (columns). Writes colc[n] and zwe[n]
// (zwe_out may be null when every zwe is 0); returns whether any zwe is non-zero.
// The 4-bit form also holds for int8 weights (off = 0) under a kernel set whose int8 tile is sum u * w (s8_u).
bool fill_branch_consts(Isa isa, int64_t n, const PackedMatrix& pm, const int32_t* colsum, const int32_t* zw,
                        int32_t zx_mapped, int64_t k, const int32_t* bias, int32_t* colc, int32_t* zwe_out);

// Builds the output-stage part of the Epi for `n` channels (padded by 16).
void prepare_out(EpiStorage& st, int64_t n, const OutStage& out);
void prepare_split_out(EpiStorage& st, int64_t n, const SplitOutStage& out);

inline int32_t mapped_zero_point(ActType t, int32_t z) { return t == ActType::U8 ? z - 128 : z; }
inline int64_t out_elem_size(OutType t) {
  switch (t) {
    case OutType::I32:
    case OutType::F32: return 4;
    case OutType::I64: return 8;
    default: return 1;
  }
}

void run_jobs(const std::vector<GemmJob>& jobs, Isa isa);

}  // namespace detail
}  // namespace qsim
