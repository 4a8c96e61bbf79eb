// §4.3 batched integer matmul of two activation tensors: driver over the GEMM machinery (driver.h).
//
// b[i] ([N, K], uint8 or int8) is packed as an int8 weight per batch element (uint8 codes shifted by -128 with
// the zero point shifted alike, so every b - zb is unchanged), then one GemmJob per batch element goes to
// run_jobs, which spreads the row blocks of all of them over the threads.
#include <algorithm>
#include <vector>

#include "driver.h"
#include "threadpool.h"

namespace qsim {

using namespace detail;

void int_bmm(const RowBatch& a, ActType at, int32_t za, const RowBatch& b, ActType bt, int32_t zb, int64_t batch,
             int64_t m, int64_t n, int64_t k, const OutStage& out, void* y) {
  if (batch == 0 || m == 0 || n == 0) return;
  const Isa isa = resolve_isa();
  const uint8_t bxor = bt == ActType::U8 ? 0x80 : 0;
  const int32_t zbm = mapped_zero_point(bt, zb);
  const int32_t zam = mapped_zero_point(at, za);
  std::vector<PackedMatrix> pms(static_cast<size_t>(batch));
  const bool true_only = kernels_for(isa).s8_u;  // packed for this call's kernels only
  ThreadPool::instance().run(batch, [&](int64_t i, int) {
    pms[i] = pack_s8_rows(b.at(i), b.ld, n, k, bxor, true_only, isa);
  });
  const std::vector<int32_t> zw(static_cast<size_t>(n), zbm);
  const size_t np = static_cast<size_t>(round_up(n, kNR) + kNR);
  EpiStorage base;
  prepare_out(base, n, out);
  std::vector<EpiStorage> sts(static_cast<size_t>(batch));
  std::vector<MatrixA> as;
  as.reserve(static_cast<size_t>(batch));
  std::vector<GemmJob> jobs(static_cast<size_t>(batch));
  const int64_t elem = out_elem_size(out.type);
  for (int64_t i = 0; i < batch; ++i) {
    EpiStorage& st = sts[i];
    st.epi = base.epi;  // output-stage vectors are shared (owned by base)
    st.colc1.assign(np, 0);
    st.zw1.assign(np, 0);
    if (fill_branch_consts(isa, n, pms[i], pms[i].colsum.data(), zw.data(), zam, k, nullptr, st.colc1.data(),
                           st.zw1.data()))
      st.epi.zw1 = st.zw1.data();
    st.epi.colc1 = st.colc1.data();
    as.emplace_back(a.at(i), k, pms[i], at, a.ld);
    GemmJob& jb = jobs[i];
    jb.m = m;
    jb.n = n;
    jb.br[0] = {&as[i], &pms[i]};
    jb.epi = st.epi;
    jb.out = static_cast<char*>(y) + i * m * n * elem;
    jb.ldm = n;
    jb.ldn = 1;
    jb.elem = elem;
  }
  run_jobs(jobs, isa);
}

}  // namespace qsim
