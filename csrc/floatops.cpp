// Float stages (docs/spec.md §15) and float -> code quantization (§2): threaded drivers. Each row,
// segment or run is computed by one task with the per-ISA kernels of float_kernels.h, so results do
// not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <vector>

#include "float_kernels.h"
#include "kernels.h"
#include "threadpool.h"

namespace qsim {

using namespace detail;

namespace {

const FloatKernels& float_kernels() {
#if defined(PYQSIM_HAVE_VNNI_TU)
  const Isa isa = resolve_isa();
  if (isa == Isa::Avx512Vnni || isa == Isa::Amx) return float_kernels_avx512();
#endif
#if defined(PYQSIM_HAVE_AVX2_TU)
  if (resolve_isa() != Isa::Scalar) return float_kernels_avx2();
#endif
  return float_kernels_scalar();
}

constexpr int64_t kTaskElems = 16384;  // elements per task for row-wise and elementwise work

int64_t rows_per_task(int64_t n) { return std::max<int64_t>(1, kTaskElems / std::max<int64_t>(n, 1)); }

// One task's span [off, off + count) of a stage's result: `stage(dst)` writes its floats to the output, or, with
// codes (§15.9), to this thread's buffer, whose codes then go to the output. False when those codes are undefined.
template <class F>
bool emit(const FloatKernels& fk, void* y, int64_t off, int64_t count, const CodesOut* codes, F stage) {
  if (!codes) {
    stage(static_cast<float*>(y) + off);
    return true;
  }
  thread_local std::vector<float> buf;
  if (buf.size() < static_cast<size_t>(count)) buf.resize(static_cast<size_t>(count));
  stage(buf.data());
  uint8_t* out = static_cast<uint8_t*>(y) + off;
  if (codes->log) return fk.log_codes(buf.data(), count, static_cast<double>(codes->delta), codes->k, codes->zero_code, out);
  // clamp bounds lo - z and hi - z, exact small integers in float32 (§2)
  const float lo = static_cast<float>(codes->lo - codes->zero_point), hi = static_cast<float>(codes->hi - codes->zero_point);
  return fk.quantize_run(buf.data(), count, &codes->scale, &lo, &hi, &codes->zero_point, 0, out);
}

// Runs `tasks` tasks of `body(t) -> bool`; false when one of them returned false.
template <class F>
bool run_all(int64_t tasks, F body) {
  std::atomic<bool> ok{true};
  ThreadPool::instance().run(tasks, [&](int64_t t, int) {
    if (!body(t)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

}  // namespace

bool softmax(const float* x, void* y, int64_t rows, int64_t n, const CodesOut* codes) {
  if (rows == 0 || n == 0) return true;
  const FloatKernels& fk = float_kernels();
  const int64_t per = rows_per_task(n);
  return run_all(ceil_div(rows, per), [&](int64_t t) {
    const int64_t r0 = t * per, r1 = std::min(rows, r0 + per);
    return emit(fk, y, r0 * n, (r1 - r0) * n, codes, [&](float* dst) { fk.softmax_rows(x + r0 * n, dst, r1 - r0, n); });
  });
}

bool layer_norm(const float* x, void* y, int64_t rows, int64_t n, const float* w, const float* b, float eps,
                const CodesOut* codes) {
  if (rows == 0 || n == 0) return true;
  const FloatKernels& fk = float_kernels();
  const int64_t per = rows_per_task(n);
  return run_all(ceil_div(rows, per), [&](int64_t t) {
    const int64_t r0 = t * per, r1 = std::min(rows, r0 + per);
    return emit(fk, y, r0 * n, (r1 - r0) * n, codes,
                [&](float* dst) { fk.layer_norm_rows(x + r0 * n, dst, r1 - r0, n, w, b, eps); });
  });
}

bool group_norm(const float* x, void* y, int64_t batch, int64_t c, int64_t spatial, int64_t groups, const float* w,
                const float* b, float eps, const CodesOut* codes) {
  if (batch == 0 || c == 0 || spatial == 0) return true;
  const FloatKernels& fk = float_kernels();
  const int64_t cg = c / groups, seg = cg * spatial;
  return run_all(batch * groups, [&](int64_t t) {
    const int64_t off = t * seg, c0 = (t % groups) * cg;
    float mean, rstd;
    fk.moments(x + off, seg, eps, &mean, &rstd);
    return emit(fk, y, off, seg, codes, [&](float* dst) {
      for (int64_t j = 0; j < cg; ++j)
        fk.normalize_run(x + off + j * spatial, dst + j * spatial, spatial, mean, rstd, w[c0 + j], b[c0 + j]);
    });
  });
}

bool unary(UnaryOp op, const float* x, void* y, int64_t n, const CodesOut* codes) {
  if (n == 0) return true;
  const FloatKernels& fk = float_kernels();
  return run_all(ceil_div(n, kTaskElems), [&](int64_t t) {
    const int64_t i0 = t * kTaskElems, count = std::min(kTaskElems, n - i0);
    return emit(fk, y, i0, count, codes, [&](float* dst) { fk.unary(op, x + i0, dst, count); });
  });
}

void add(const float* a, const float* b, float* y, int64_t n, int64_t m, int64_t inner) {
  if (n == 0) return;
  const FloatKernels& fk = float_kernels();
  ThreadPool::instance().run(ceil_div(n, kTaskElems), [&](int64_t t, int) {
    const int64_t end = std::min(n, (t + 1) * kTaskElems);
    for (int64_t i = t * kTaskElems; i < end;) {
      if (inner == 1) {  // b repeats every m values
        const int64_t j = i % m, len = std::min(end - i, m - j);
        fk.add(a + i, b + j, y + i, len);
        i += len;
      } else {  // one b value per run of inner values
        const int64_t r = i / inner, len = std::min(end - i, (r + 1) * inner - i);
        fk.add_scalar(a + i, b[r % m], y + i, len);
        i += len;
      }
    }
  });
}

bool quantize(const float* x, int64_t outer, int64_t ldo, int64_t n, int64_t inner, const float* scale,
              const int32_t* z, int32_t lo, int32_t hi, uint8_t* out) {
  if (outer == 0 || n == 0 || inner == 0) return true;
  const FloatKernels& fk = float_kernels();
  // clamp bounds lo - z and hi - z, exact small integers in float32 (§2)
  std::vector<float> lo_f(static_cast<size_t>(n)), hi_f(static_cast<size_t>(n));
  for (int64_t c = 0; c < n; ++c) {
    lo_f[c] = static_cast<float>(lo - z[c]);
    hi_f[c] = static_cast<float>(hi - z[c]);
  }
  std::atomic<bool> finite{true};
  if (inner == 1) {  // channel-last: runs of n channels with per-element parameters
    const int64_t per = rows_per_task(n);
    ThreadPool::instance().run(ceil_div(outer, per), [&](int64_t t, int) {
      bool ok = true;
      for (int64_t r = t * per; r < std::min(outer, (t + 1) * per); ++r)
        ok &= fk.quantize_run(x + r * ldo, n, scale, lo_f.data(), hi_f.data(), z, 1, out + r * n);
      if (!ok) finite.store(false, std::memory_order_relaxed);
    });
    return finite.load();
  }
  const int64_t chunks = ceil_div(inner, kTaskElems);
  if (chunks == 1) {  // short runs (rows of a strided view): several (row, channel) runs per task
    const int64_t runs = outer * n, per = rows_per_task(inner);
    ThreadPool::instance().run(ceil_div(runs, per), [&](int64_t t, int) {
      bool ok = true;
      for (int64_t r = t * per; r < std::min(runs, (t + 1) * per); ++r) {
        const int64_t c = r % n;
        ok &= fk.quantize_run(x + (r / n) * ldo + c * inner, inner, scale + c, lo_f.data() + c, hi_f.data() + c, z + c,
                              0, out + r * inner);
      }
      if (!ok) finite.store(false, std::memory_order_relaxed);
    });
    return finite.load();
  }
  ThreadPool::instance().run(outer * n * chunks, [&](int64_t t, int) {
    const int64_t row = t / chunks, c = row % n, i0 = (t % chunks) * kTaskElems;
    const int64_t off = row * inner + i0;
    if (!fk.quantize_run(x + (row / n) * ldo + c * inner + i0, std::min(kTaskElems, inner - i0), scale + c,
                         lo_f.data() + c, hi_f.data() + c, z + c, 0, out + off))
      finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

bool quantize_log(const float* p, int64_t n, float delta, int k, int zero_code, uint8_t* out) {
  if (n == 0) return true;
  const FloatKernels& fk = float_kernels();
  std::atomic<bool> valid{true};
  ThreadPool::instance().run(ceil_div(n, kTaskElems), [&](int64_t t, int) {
    const int64_t i0 = t * kTaskElems;
    if (!fk.log_codes(p + i0, std::min(kTaskElems, n - i0), static_cast<double>(delta), k, zero_code, out + i0))
      valid.store(false, std::memory_order_relaxed);
  });
  return valid.load();
}

}  // namespace qsim
