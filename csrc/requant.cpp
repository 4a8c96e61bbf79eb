// Standalone requantization (§6) of an int32 tensor viewed as [outer, N, inner], channel axis N.
#include <algorithm>
#include <vector>

#include "driver.h"
#include "threadpool.h"

namespace qsim {

using namespace detail;

void requantize(const int32_t* acc, int64_t outer, int64_t n, int64_t inner, const OutStage& out, void* y) {
  if (outer == 0 || n == 0 || inner == 0) return;
  const KernelSet& ks = kernels_for(resolve_isa());
  EpiStorage st;
  prepare_out(st, n, out);
  const Epi& e = st.epi;
  const int64_t esz = out_elem_size(out.type);
  char* yb = static_cast<char*>(y);
  if (inner == 1) {
    // channel-last rows: the GEMM epilogue over 16-channel tiles (partial tiles padded)
    std::vector<int32_t> zeros(static_cast<size_t>(round_up(n, kNR) + kNR), 0);
    Epi ee = e;
    ee.colc1 = zeros.data();
    ee.zw1 = nullptr;
    const int64_t rows_per_task = std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1));
    ThreadPool::instance().run(ceil_div(outer, rows_per_task), [&](int64_t task, int) {
      alignas(64) int32_t tile[kNR];
      const int64_t r0 = task * rows_per_task, r1 = std::min(outer, r0 + rows_per_task);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t n0 = 0; n0 < n; n0 += kNR) {
          const int nc = static_cast<int>(std::min<int64_t>(kNR, n - n0));
          const int32_t* src = acc + r * n + n0;
          if (nc < kNR) {
            std::fill(tile, tile + kNR, 0);
            std::copy(src, src + nc, tile);
            src = tile;
          }
          TileOut to{yb + (r * n + n0) * esz, 0, 1};
          ks.epi(ee, n0, 1, nc, src, nullptr, nullptr, nullptr, to);
        }
    });
    return;
  }
  ThreadPool::instance().run(outer * n, [&](int64_t task, int) {
    const int64_t c = task % n;
    ks.requant_run(acc + task * inner, inner, e.m1[c], e.sh[c], e.rnd[c], e.zy, e.lo, e.hi, out.type,
                   yb + task * inner * esz);
  });
}

}  // namespace qsim

namespace qsim {

void requantize_profile(const int32_t* acc, int64_t outer, int64_t n, int64_t inner, Numerics p, const OutStage& out,
                        void* y) {
  if (outer == 0 || n == 0 || inner == 0) return;
  const KernelSet& ks = detail::kernels_for(resolve_isa());
  const int32_t lo = out_qmin(out.type), hi = out_qmax(out.type);
  const bool fixed = p == Numerics::Tflite || p == Numerics::TfliteSingle;
  const int64_t esz = detail::out_elem_size(out.type);
  char* yb = static_cast<char*>(y);
  const int64_t per_task = std::max<int64_t>(1, 65536 / inner);  // whole channel runs per task
  ThreadPool::instance().run(detail::ceil_div(outer * n, per_task), [&](int64_t task, int) {
    const int64_t r0 = task * per_task, r1 = std::min(outer * n, r0 + per_task);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % n;
      ks.profile_run(acc + r * inner, inner, p, fixed ? out.multiplier[c] : 0, fixed ? out.shift[c] : 0,
                     fixed ? 0.f : out.scale[c], out.zero_point, lo, hi, out.type, yb + r * inner * esz);
    }
  });
}

}  // namespace qsim
