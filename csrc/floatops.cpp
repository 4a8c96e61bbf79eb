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

}  // namespace

void softmax(const float* x, float* y, int64_t rows, int64_t n) {
  if (rows == 0 || n == 0) return;
  const FloatKernels& fk = float_kernels();
  const int64_t per = rows_per_task(n);
  ThreadPool::instance().run(ceil_div(rows, per), [&](int64_t t, int) {
    const int64_t r0 = t * per, r1 = std::min(rows, r0 + per);
    fk.softmax_rows(x + r0 * n, y + r0 * n, r1 - r0, n);
  });
}

void layer_norm(const float* x, float* y, int64_t rows, int64_t n, const float* w, const float* b, float eps) {
  if (rows == 0 || n == 0) return;
  const FloatKernels& fk = float_kernels();
  const int64_t per = rows_per_task(n);
  ThreadPool::instance().run(ceil_div(rows, per), [&](int64_t t, int) {
    const int64_t r0 = t * per, r1 = std::min(rows, r0 + per);
    fk.layer_norm_rows(x + r0 * n, y + r0 * n, r1 - r0, n, w, b, eps);
  });
}

void group_norm(const float* x, float* y, int64_t batch, int64_t c, int64_t spatial, int64_t groups, const float* w,
                const float* b, float eps) {
  if (batch == 0 || c == 0 || spatial == 0) return;
  const FloatKernels& fk = float_kernels();
  const int64_t cg = c / groups, seg = cg * spatial;
  ThreadPool::instance().run(batch * groups, [&](int64_t t, int) {
    const int64_t off = t * seg, c0 = (t % groups) * cg;
    float mean, rstd;
    fk.moments(x + off, seg, eps, &mean, &rstd);
    for (int64_t j = 0; j < cg; ++j)
      fk.normalize_run(x + off + j * spatial, y + off + j * spatial, spatial, mean, rstd, w[c0 + j], b[c0 + j]);
  });
}

void unary(UnaryOp op, const float* x, float* y, int64_t n) {
  if (n == 0) return;
  const FloatKernels& fk = float_kernels();
  ThreadPool::instance().run(ceil_div(n, kTaskElems), [&](int64_t t, int) {
    const int64_t i0 = t * kTaskElems;
    fk.unary(op, x + i0, y + i0, std::min(kTaskElems, n - i0));
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
