// GEMM driver (§4, §6, §8): blocking, threading, output-stage preparation.
#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>

#include "driver.h"
#include "threadpool.h"

namespace qsim {
namespace detail {

namespace {
constexpr int64_t kMC = 64;          // rows per task (upper bound)
constexpr int64_t kABlockBytes = 160 * 1024;  // packed A block (x' and second half) kept within L2

// Rows per task: at most 64, fewer for long K so that the task's packed A block stays in L2 while
// the weight panels stream past it.
int64_t rows_per_task(const std::vector<GemmJob>& jobs) {
  int64_t kp = 0;
  for (const GemmJob& jb : jobs) {
    int64_t sum = 0;
    for (int b = 0; b < jb.nbranch; ++b) sum += jb.br[b].b->kp;
    kp = std::max(kp, sum);
  }
  const int64_t mc = kp > 0 ? kABlockBytes / (2 * kp) : kMC;
  return std::max<int64_t>(kMR, std::min<int64_t>(kMC, mc / kMR * kMR));
}

// Per-OS-thread scratch, grown on demand and kept (workers are persistent).
uint8_t* scratch(size_t bytes) {
  struct Buf {
    uint8_t* p = nullptr;
    size_t n = 0;
    ~Buf() {
      if (p) ::operator delete(p, std::align_val_t(64));
    }
  };
  thread_local Buf buf;
  if (buf.n < bytes) {
    if (buf.p) ::operator delete(buf.p, std::align_val_t(64));
    buf.n = std::max(bytes, buf.n * 2);
    buf.p = static_cast<uint8_t*>(::operator new(buf.n, std::align_val_t(64)));
  }
  return buf.p;
}

inline size_t align64(size_t v) { return (v + 63) & ~size_t(63); }
}  // namespace

bool fill_branch_consts(Isa isa, int64_t n, const PackedMatrix& pm, const int32_t* colsum, const int32_t* zw,
                        int32_t zx_mapped, int64_t k, const int32_t* bias, int32_t* colc, int32_t* zwe_out) {
  const bool u_tile = pm.format != WFormat::S8 || kernels_for(isa).s8_u;
  const uint32_t zx = static_cast<uint32_t>(zx_mapped);
  const uint32_t zxa = zx + (u_tile ? 128u : 0u);
  const uint32_t kk = static_cast<uint32_t>(k);  // mod 2^32 is enough (§4.1)
  bool any = false;
  for (int64_t c = 0; c < n; ++c) {
    const uint32_t zwe = static_cast<uint32_t>(zw[c]) + static_cast<uint32_t>(pm.code_offset);
    uint32_t v = bias ? static_cast<uint32_t>(bias[c]) : 0u;
    v -= zxa * static_cast<uint32_t>(colsum[c]);
    v += kk * zx * zwe;
    colc[c] = static_cast<int32_t>(v);
    if (zwe_out) zwe_out[c] = static_cast<int32_t>(zwe);
    any |= zwe != 0;
  }
  return any;
}

static void fill_requant(EpiStorage& st, int64_t n, const int32_t* m1, const int32_t* m2, const int32_t* shift) {
  const size_t np = static_cast<size_t>(round_up(n, kNR) + kNR);
  st.m1.assign(np, 0);
  if (m2) st.m2.assign(np, 0);
  st.sh.assign(np, 62);
  st.rnd.assign(np, int64_t(1) << 61);
  bool fast = true;
  for (int64_t c = 0; c < n; ++c) {
    int64_t s = shift[c];
    if (s > 62) {  // |acc * M0| < 2^62 <= 2^(S-1): the result is exactly 0 (§6); (0 + 2^61) >> 62 == 0
      st.m1[c] = 0;
      if (m2) st.m2[c] = 0;
      st.sh[c] = 62;
      st.rnd[c] = int64_t(1) << 61;
    } else {
      st.m1[c] = m1[c];
      if (m2) st.m2[c] = m2[c];
      st.sh[c] = s;
      st.rnd[c] = int64_t(1) << (s - 1);
      fast &= s >= 33;
    }
  }
  st.epi.fast32 = fast;
  if (fast) {
    st.m1_32.assign(np, 0);
    st.rnd32.assign(np, 0);
    st.shr32.assign(np, 1);
    if (m2) st.m2_32.assign(np, 0);
    for (int64_t c = 0; c < n; ++c) {
      st.m1_32[c] = static_cast<int32_t>(st.m1[c]);
      if (m2) st.m2_32[c] = static_cast<int32_t>(st.m2[c]);
      st.rnd32[c] = static_cast<int32_t>(int64_t(1) << (st.sh[c] - 33));
      st.shr32[c] = static_cast<int32_t>(st.sh[c] - 32);
    }
    st.epi.m1_32 = st.m1_32.data();
    st.epi.m2_32 = m2 ? st.m2_32.data() : nullptr;
    st.epi.rnd32 = st.rnd32.data();
    st.epi.shr32 = st.shr32.data();
  }
  st.epi.m1 = st.m1.data();
  st.epi.m2 = m2 ? st.m2.data() : nullptr;
  st.epi.sh = st.sh.data();
  st.epi.rnd = st.rnd.data();
}

void prepare_out(EpiStorage& st, int64_t n, const OutStage& out) {
  st.epi.type = out.type;
  st.epi.split = false;
  const size_t np = static_cast<size_t>(round_up(n, kNR) + kNR);
  if (is_requant(out.type)) {
    fill_requant(st, n, out.multiplier, nullptr, out.shift);
    st.epi.zy = out.zero_point;
    st.epi.lo = out_qmin(out.type);
    st.epi.hi = out_qmax(out.type);
  } else if (out.type == OutType::F32) {
    st.s1.assign(np, 0.f);
    std::copy(out.scale, out.scale + n, st.s1.begin());
    st.epi.s1 = st.s1.data();
  }
}

void prepare_split_out(EpiStorage& st, int64_t n, const SplitOutStage& out) {
  st.epi.type = out.type;
  st.epi.split = true;
  const size_t np = static_cast<size_t>(round_up(n, kNR) + kNR);
  if (is_requant(out.type)) {
    fill_requant(st, n, out.multiplier1, out.multiplier2, out.shift);
    st.epi.zy = out.zero_point;
    st.epi.lo = out_qmin(out.type);
    st.epi.hi = out_qmax(out.type);
  } else {
    st.s1.assign(np, 0.f);
    st.s2.assign(np, 0.f);
    std::copy(out.scale1, out.scale1 + n, st.s1.begin());
    std::copy(out.scale2, out.scale2 + n, st.s2.begin());
    st.epi.s1 = st.s1.data();
    st.epi.s2 = st.s2.data();
  }
}

// §10.2: each weight -128 of panel p entered the tile as -127; x' * -128 = x' * -127 - x' (mod 2^32). The A panel
// ([kg][2][mr][4]) holds x'[r, k] at (k / 4) * 8 * mr + 4 * r + k % 4.
inline void fix_min_codes(const PackedMatrix& pm, int64_t p, const int8_t* ap, int mr, int32_t* tile) {
  for (int64_t f = pm.fix_off[p]; f < pm.fix_off[p + 1]; ++f) {
    const int64_t k = pm.fix_k[f];
    const int8_t* xk = ap + (k >> 2) * 8 * mr + (k & 3);
    int32_t* col = tile + pm.fix_c[f];
    for (int r = 0; r < mr; ++r)
      col[r * kNR] = static_cast<int32_t>(static_cast<uint32_t>(col[r * kNR]) - static_cast<uint32_t>(int32_t{xk[4 * r]}));
  }
}

namespace {
// Tasks over all jobs: each job's rows in blocks of mc, times nsplit ranges of its weight panels (taken `step` at a
// time) when there are few row blocks for the threads. Task t -> (job, first row, mc rows, panels [p0, p1)).
struct TaskGrid {
  std::vector<int64_t> first;  // job j owns tasks [first[j], first[j + 1])
  int64_t mc = 1, step = 1, nsplit = 1;
  TaskGrid(const std::vector<GemmJob>& jobs, int64_t mc_, int64_t step_) : first(jobs.size() + 1, 0), mc(mc_), step(step_) {
    const int64_t nt = ThreadPool::instance().num_threads();
    int64_t total_mb = 0, max_units = 0;
    for (const GemmJob& jb : jobs)
      if (jb.m > 0 && jb.n > 0) {
        total_mb += ceil_div(jb.m, mc);
        max_units = std::max(max_units, ceil_div(ceil_div(jb.n, kNR), step));
      }
    if (total_mb > 0 && total_mb < 4 * nt) nsplit = std::min<int64_t>(max_units, ceil_div(4 * nt, total_mb));
    for (size_t j = 0; j < jobs.size(); ++j)
      first[j + 1] = first[j] + (jobs[j].m > 0 && jobs[j].n > 0 ? ceil_div(jobs[j].m, mc) * nsplit : 0);
  }
  int64_t tasks() const { return first.back(); }
  struct Task {
    size_t job;
    int64_t m0, mc, p0, p1;
  };
  Task at(const std::vector<GemmJob>& jobs, int64_t task) const {
    const size_t j = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1);
    const GemmJob& jb = jobs[j];
    const int64_t local = task - first[j], m0 = (local / nsplit) * mc, panels = ceil_div(jb.n, kNR);
    const int64_t per = step * ceil_div(ceil_div(panels, step), nsplit), p0 = (local % nsplit) * per;
    return Task{j, m0, std::min(mc, jb.m - m0), p0, std::min(panels, p0 + per)};
  }
};

// The AMX path takes one-branch jobs whose weights have AMX panels (GEMM and conv weights wide enough).
bool amx_eligible(const KernelSet& ks, const std::vector<GemmJob>& jobs) {
  if (!ks.amx_block) return false;
  for (const GemmJob& jb : jobs)
    for (int b = 0; b < (jb.m > 0 && jb.n > 0 ? jb.nbranch : 0); ++b)
      if (!jb.br[b].b->buf_amx) return false;
  return true;
}

// §10.8: tasks of kAmxMC rows (32-row AMX blocks) x a range of weight panels, taken two at a time. A task packs
// u = x' + 128 of its rows ([rows][ksteps * 64], zero padded) and the x' row sums, per branch (§8: a split job has
// two, each with its own tiles), then each 32 x 32 block of tiles goes through the VNNI output stage, 32 x 16 at a
// time where EpiFn allows it.
constexpr int64_t kAmxMC = 64;

void run_jobs_amx(const std::vector<GemmJob>& jobs, const KernelSet& ks) {
  int64_t kpad_max[2] = {0, 0};
  for (const GemmJob& jb : jobs)
    for (int b = 0; b < (jb.m > 0 && jb.n > 0 ? jb.nbranch : 0); ++b)
      kpad_max[b] = std::max(kpad_max[b], jb.br[b].b->kg_amx * 4);
  const TaskGrid grid(jobs, kAmxMC, 2);  // weight panels in pairs
  size_t a_bytes[2], br_bytes[2];  // per branch: A rows, then row sums and the 2 x 2 C tiles
  for (int b = 0; b < 2; ++b) {
    a_bytes[b] = align64(static_cast<size_t>(kAmxMC * kpad_max[b]));
    br_bytes[b] = a_bytes[b] + align64(kAmxMC * sizeof(int32_t)) + 2 * 32 * 16 * sizeof(int32_t);
  }
  ThreadPool::instance().run(grid.tasks(), [&](int64_t task, int) {
    const TaskGrid::Task tk = grid.at(jobs, task);
    const GemmJob& jb = jobs[tk.job];
    const int64_t m0 = tk.m0, mc = tk.mc, p0 = tk.p0, p1 = tk.p1;
    if (p0 >= p1) return;
    const int nb = jb.nbranch;
    const int64_t rows = round_up(mc, 32);
    uint8_t* ws = scratch(br_bytes[0] + br_bytes[1]);
    const PackedMatrix* pm[2];
    int64_t kpad[2], ksteps[2], pstride[2];
    uint8_t* abuf[2];
    int32_t *rs[2], *ctile[2];
    for (int b = 0; b < nb; ++b) {
      pm[b] = jb.br[b].b;
      kpad[b] = pm[b]->kg_amx * 4, ksteps[b] = pm[b]->kg_amx / 16, pstride[b] = pm[b]->kg_amx * 64;
      abuf[b] = ws + (b ? br_bytes[0] : 0);
      rs[b] = reinterpret_cast<int32_t*>(abuf[b] + a_bytes[b]);
      ctile[b] = reinterpret_cast<int32_t*>(abuf[b] + a_bytes[b] + align64(kAmxMC * sizeof(int32_t)));
      jb.br[b].a->amx_rows(ks, m0, static_cast<int>(mc), kpad[b], abuf[b], rs[b]);
      std::memset(abuf[b] + mc * kpad[b], 0, static_cast<size_t>((rows - mc) * kpad[b]));
    }
    const int64_t kp = kpad[0], ks0 = ksteps[0], pstride0 = pstride[0];
    uint8_t* const abuf0 = abuf[0];
    ks.amx_begin();
    for (int64_t p = p0; p < p1; p += 2) {
      const bool two = p + 1 < p1;
      const uint8_t* b0 = pm[0]->buf_amx.get() + p * pstride0;
      for (int64_t rb = 0; rb < mc; rb += 32) {
        if (nb == 1) {
          // the next block: the next 32 rows, else the first rows with the next panels (its tiles load meanwhile)
          const int64_t pn = rb + 32 < mc ? p : p + 2;
          const uint8_t* nb0 = pn < p1 ? pm[0]->buf_amx.get() + pn * pstride0 : nullptr;
          const uint8_t* na = abuf0 + (rb + 32 < mc ? rb + 32 : 0) * kp;
          const AmxNext next{na, na + 16 * kp, nb0, pn + 1 < p1 ? nb0 + pstride0 : nullptr, pn + 1 < p1};
          const uint8_t* a = abuf0 + rb * kp;
          ks.amx_block(a, a + 16 * kp, kp, b0, two ? b0 + pstride0 : nullptr, ks0, two, 32, ctile[0],
                       p > p0 || rb > 0, nb0 ? &next : nullptr);
        } else {
          for (int b = 0; b < 2; ++b) {
            const uint8_t* bb = pm[b]->buf_amx.get() + p * pstride[b];
            const uint8_t* a = abuf[b] + rb * kpad[b];
            ks.amx_block(a, a + 16 * kpad[b], kpad[b], bb, two ? bb + pstride[b] : nullptr, ksteps[b], two, 32,
                         ctile[b], false, nullptr);
          }
        }
        for (int jp = 0; jp < (two ? 2 : 1); ++jp) {
          const int64_t n0 = (p + jp) * kNR;
          const int nc = static_cast<int>(std::min<int64_t>(kNR, jb.n - n0));
          // whole rows of 16 channels, or rows that are adjacent elements (conv's NCHW pixels): the output stage
          // takes the 32 rows in one call (EpiFn), else 4 at a time
          const int step = (nc == kNR && jb.ldn == 1) || jb.ldm == 1 ? 32 : kMR;
          for (int64_t row = rb; row < rb + 32 && row < mc; row += step) {
            const int mr = static_cast<int>(std::min<int64_t>(step, mc - row));
            TileOut to{jb.out + ((m0 + row) * jb.ldm + n0 * jb.ldn) * jb.elem, jb.ldm, jb.ldn};
            const int64_t at = jp * 512 + (row - rb) * kNR;
            ks.epi(jb.epi, n0, mr, nc, ctile[0] + at, rs[0] + row, nb == 2 ? ctile[1] + at : nullptr,
                   nb == 2 ? rs[1] + row : nullptr, to);
          }
        }
      }
    }
    ks.amx_end();
  });
}
}  // namespace

void run_jobs(const std::vector<GemmJob>& jobs, Isa isa) {
  const KernelSet& ks = kernels_for(isa);
  if (amx_eligible(ks, jobs)) return run_jobs_amx(jobs, ks);
  const int64_t MC = rows_per_task(jobs);
  const int64_t W = ks.ukr_wide[1] ? kWideNP : 1;  // weight panels per micro-kernel call where the ISA has it
  size_t abytes[2] = {0, 0}, ubytes[2] = {0, 0};
  for (const GemmJob& jb : jobs) {
    if (jb.m <= 0 || jb.n <= 0) continue;
    for (int b = 0; b < jb.nbranch; ++b) {
      const PackedMatrix& pm = *jb.br[b].b;
      abytes[b] = std::max(abytes[b], align64(static_cast<size_t>(2 * MC * pm.kp)));
      if (pm.format != WFormat::S8) ubytes[b] = std::max(ubytes[b], align64(static_cast<size_t>(W * pm.kg * 64)));
    }
  }
  const TaskGrid grid(jobs, MC, 1);
  const size_t rs_bytes = align64(MC * sizeof(int32_t));
  const size_t ws_bytes = abytes[0] + abytes[1] + ubytes[0] + ubytes[1] + 2 * rs_bytes;

  ThreadPool::instance().run(grid.tasks(), [&](int64_t task, int) {
    const TaskGrid::Task tk = grid.at(jobs, task);
    const GemmJob& jb = jobs[tk.job];
    const int64_t m0 = tk.m0, mc = tk.mc, p0 = tk.p0, p1 = tk.p1;
    if (p0 >= p1) return;

    uint8_t* ws = scratch(ws_bytes);
    int8_t* abuf[2];
    uint8_t* ubuf[2];
    int32_t* rs[2];
    {
      uint8_t* q = ws;
      for (int b = 0; b < 2; ++b) {
        abuf[b] = reinterpret_cast<int8_t*>(q);
        q += abytes[b];
        ubuf[b] = q;
        q += ubytes[b];
        rs[b] = reinterpret_cast<int32_t*>(q);
        q += rs_bytes;
      }
    }
    const int64_t npan_a = ceil_div(mc, kMR);
    for (int b = 0; b < jb.nbranch; ++b) {
      const int64_t kp = jb.br[b].b->kp;
      for (int64_t i = 0; i < npan_a; ++i) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, mc - i * kMR));
        jb.br[b].a->pack(ks, m0 + i * kMR, mr, abuf[b] + 2 * i * kMR * kp, rs[b] + i * kMR);
      }
    }
    alignas(64) int32_t tile[2][kWideNP * kMR * kNR];
    bool nib = false;  // few rows: 4-bit panels are read as nibbles, one panel per kernel call
    for (int b = 0; b < jb.nbranch; ++b) nib |= jb.br[b].b->format != WFormat::S8 && mc <= 2 * kMR && ks.ukr4_nib[1];
    const int64_t step = nib ? 1 : W;
    for (int64_t p = p0; p < p1; p += step) {
      const int np = static_cast<int>(std::min<int64_t>(step, p1 - p));
      const uint8_t* bp[2];
      int64_t bstride[2];
      UkrFn const* ukr[2];
      for (int b = 0; b < jb.nbranch; ++b) {
        const PackedMatrix& pm = *jb.br[b].b;
        bstride[b] = pm.panel_bytes;
        if (pm.format == WFormat::S8) {
          // -128 weights were packed as -127 (§10.2, fixed after the sign-path kernel); the VNNI kernel takes the
          // copy with the true codes, made at packing on a VNNI CPU whenever there is a -128 (§10.7)
          bp[b] = ks.s8_u && pm.buf_exact ? pm.panel_exact(p) : pm.panel(p);
          ukr[b] = ks.ukr;
        } else if (nib) {
          bp[b] = pm.panel(p);
          ukr[b] = ks.ukr4_nib;
        } else {
          for (int j = 0; j < np; ++j)  // once per panel, reused by every row panel
            ks.unpack4(pm.panel(p + j), pm.kg, ubuf[b] + j * pm.kg * 64);
          bp[b] = ubuf[b];
          bstride[b] = pm.kg * 64;
          ukr[b] = ks.ukr4;
        }
      }
      for (int64_t i = 0; i < npan_a; ++i) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, mc - i * kMR));
        for (int b = 0; b < jb.nbranch; ++b) {
          const PackedMatrix& pm = *jb.br[b].b;
          const int8_t* ap = abuf[b] + 2 * i * kMR * pm.kp;
          if (step > 1) {
            ks.ukr_wide[mr](ap, bp[b], bstride[b], np, pm.kg, tile[b]);
          } else {
            ukr[b][mr](ap, bp[b], pm.kg, tile[b]);
            if (pm.format == WFormat::S8 && !ks.s8_u) fix_min_codes(pm, p, ap, mr, tile[b]);
          }
        }
        const int64_t row = m0 + i * kMR;
        for (int j = 0; j < np; ++j) {
          const int64_t n0 = (p + j) * kNR;
          const int nc = static_cast<int>(std::min<int64_t>(kNR, jb.n - n0));
          TileOut to{jb.out + (row * jb.ldm + n0 * jb.ldn) * jb.elem, jb.ldm, jb.ldn};
          ks.epi(jb.epi, n0, mr, nc, tile[0] + j * kMR * kNR, rs[0] + i * kMR,
                 jb.nbranch > 1 ? tile[1] + j * kMR * kNR : nullptr, jb.nbranch > 1 ? rs[1] + i * kMR : nullptr, to);
        }
      }
    }
  });
}

}  // namespace detail

using namespace detail;

void int_gemm(const void* x, ActType xt, int64_t m, int32_t zx, const PackedWeight& w, const int32_t* zw,
              const int32_t* bias, const OutStage& out, void* y) {
  const int64_t n = w.n, k = w.k;
  if (m == 0 || n == 0) return;
  const Isa isa = resolve_isa();
  const PackedMatrix& pm = w.mats.at(0);
  EpiStorage st;
  prepare_out(st, n, out);
  const size_t np = static_cast<size_t>(round_up(n, kNR) + kNR);
  const int32_t zxm = mapped_zero_point(xt, zx);
  st.colc1.assign(np, 0);
  st.zw1.assign(np, 0);
  if (fill_branch_consts(isa, n, pm, pm.colsum.data(), zw, zxm, k, bias, st.colc1.data(), st.zw1.data()))
    st.epi.zw1 = st.zw1.data();
  st.epi.colc1 = st.colc1.data();
  MatrixA a(x, k, pm, xt);
  std::vector<GemmJob> jobs(1);
  GemmJob& jb = jobs[0];
  jb.m = m;
  jb.n = n;
  jb.br[0] = {&a, &pm};
  jb.epi = st.epi;
  jb.out = static_cast<char*>(y);
  jb.ldm = n;
  jb.ldn = 1;
  jb.elem = out_elem_size(out.type);
  run_jobs(jobs, isa);
}

void split_gemm(const void* x1, ActType xt1, int32_t zx1, const PackedWeight& w1, const int32_t* zw1,
                const void* x2, ActType xt2, int32_t zx2, const PackedWeight& w2, const int32_t* zw2,
                int64_t m, const int32_t* bias, const SplitOutStage& out, void* y) {
  const int64_t n = w1.n;
  if (m == 0 || n == 0) return;
  const Isa isa = resolve_isa();
  const PackedMatrix& p1 = w1.mats.at(0);
  const PackedMatrix& p2 = w2.mats.at(0);
  EpiStorage st;
  prepare_split_out(st, n, out);
  const size_t np = static_cast<size_t>(round_up(n, kNR) + kNR);
  st.colc1.assign(np, 0);
  st.colc2.assign(np, 0);
  st.zw1.assign(np, 0);
  st.zw2.assign(np, 0);
  if (fill_branch_consts(isa, n, p1, p1.colsum.data(), zw1, mapped_zero_point(xt1, zx1), w1.k, bias, st.colc1.data(),
                         st.zw1.data()))
    st.epi.zw1 = st.zw1.data();
  if (fill_branch_consts(isa, n, p2, p2.colsum.data(), zw2, mapped_zero_point(xt2, zx2), w2.k, nullptr, st.colc2.data(),
                         st.zw2.data()))
    st.epi.zw2 = st.zw2.data();
  st.epi.colc1 = st.colc1.data();
  st.epi.colc2 = st.colc2.data();
  MatrixA a1(x1, w1.k, p1, xt1), a2(x2, w2.k, p2, xt2);
  std::vector<GemmJob> jobs(1);
  GemmJob& jb = jobs[0];
  jb.m = m;
  jb.n = n;
  jb.nbranch = 2;
  jb.br[0] = {&a1, &p1};
  jb.br[1] = {&a2, &p2};
  jb.epi = st.epi;
  jb.out = static_cast<char*>(y);
  jb.ldm = n;
  jb.ldn = 1;
  jb.elem = out_elem_size(out.type);
  run_jobs(jobs, isa);
}

}  // namespace qsim
