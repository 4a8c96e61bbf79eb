// Shift-based log2 / log-sqrt2 attention times V (§7): driver.
#include <algorithm>
#include <vector>

#include "driver.h"
#include "threadpool.h"

namespace qsim {

using namespace detail;

void log2_attn_matmul(const uint8_t* codes, const void* v, ActType vt, int64_t m, int64_t l, int64_t n, int32_t zv,
                      int bits, int k, int frac_bits, const OutStage& out, void* y) {
  if (m == 0 || n == 0) return;
  const KernelSet& ks = kernels_for(resolve_isa());
  // d = v - zv, exact in int32
  std::vector<int32_t> d(static_cast<size_t>(l * n));
  if (vt == ActType::U8) {
    const uint8_t* s = static_cast<const uint8_t*>(v);
    for (int64_t i = 0; i < l * n; ++i) d[i] = static_cast<int32_t>(s[i]) - zv;
  } else {
    const int8_t* s = static_cast<const int8_t*>(v);
    for (int64_t i = 0; i < l * n; ++i) d[i] = static_cast<int32_t>(s[i]) - zv;
  }
  Log2Job jb;
  jb.codes = codes;
  jb.d = d.data();
  jb.m = m;
  jb.l = l;
  jb.n = n;
  jb.zero_code = (1 << bits) - 1;
  jb.k = k;
  jb.frac_bits = frac_bits;
  jb.type = out.type;
  jb.multiplier = out.multiplier;
  jb.shift = out.shift;
  jb.zy = out.zero_point;
  jb.lo = out_qmin(out.type);
  jb.hi = out_qmax(out.type);
  jb.scale = out.scale;
  jb.out = y;
  const int64_t rows_per_task = std::max<int64_t>(1, 16384 / std::max<int64_t>(l * n / 64 + 1, 1));
  ThreadPool::instance().run(ceil_div(m, rows_per_task), [&](int64_t task, int) {
    std::vector<int64_t> scratch(static_cast<size_t>(2 * n));
    const int64_t m0 = task * rows_per_task;
    ks.log2_rows(jb, m0, std::min(m, m0 + rows_per_task), scratch.data());
  });
}

}  // namespace qsim
