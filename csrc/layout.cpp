// Layout stages (spec §15.10): concatenation and nearest-neighbour resampling move bytes and compute nothing, so
// every backend gives the same result; threaded copies.
#include <algorithm>
#include <cstring>

#include "kernels.h"
#include "threadpool.h"

namespace qsim {

using namespace detail;

namespace {
constexpr int64_t kPiece = int64_t(1) << 18;  // bytes per copy task
}  // namespace

void concat_bytes(const uint8_t* const* src, const int64_t* inner, int64_t inputs, int64_t outer, uint8_t* dst) {
  int64_t row = 0;  // bytes of one output row (all inputs' blocks of one outer index)
  for (int64_t k = 0; k < inputs; ++k) row += inner[k];
  if (outer == 0 || row == 0) return;
  if (row <= kPiece) {  // whole output rows per task
    const int64_t per = std::max<int64_t>(1, kPiece / row), tasks = ceil_div(outer, per);
    ThreadPool::instance().run(tasks, [&](int64_t t, int) {
      for (int64_t o = t * per; o < std::min(outer, (t + 1) * per); ++o) {
        uint8_t* d = dst + o * row;
        for (int64_t k = 0; k < inputs; ++k) {
          std::memcpy(d, src[k] + o * inner[k], static_cast<size_t>(inner[k]));
          d += inner[k];
        }
      }
    });
    return;
  }
  const int64_t per_row = ceil_div(row, kPiece);  // pieces of one output row
  ThreadPool::instance().run(outer * per_row, [&](int64_t t, int) {
    const int64_t o = t / per_row, b0 = (t % per_row) * kPiece, b1 = std::min(row, b0 + kPiece);
    int64_t at = 0;  // the row's byte range [b0, b1) across the inputs' blocks
    for (int64_t k = 0; k < inputs && at < b1; at += inner[k], ++k) {
      const int64_t lo = std::max(b0, at), hi = std::min(b1, at + inner[k]);
      if (lo < hi) std::memcpy(dst + o * row + lo, src[k] + o * inner[k] + (lo - at), static_cast<size_t>(hi - lo));
    }
  });
}

namespace {

// d[j] = s[cols[j]] for items of sizeof(T) bytes (fixed-size moves: no alignment is assumed)
template <typename T>
void gather_row(const uint8_t* s, const int64_t* cols, int64_t n, uint8_t* d) {
  for (int64_t j = 0; j < n; ++j) std::memcpy(d + j * sizeof(T), s + cols[j] * sizeof(T), sizeof(T));
}

}  // namespace

void resample_bytes(const uint8_t* x, int64_t planes, int64_t h, int64_t w, int64_t item, const int64_t* rows,
                    int64_t oh, const int64_t* cols, int64_t ow, uint8_t* y) {
  if (planes == 0 || oh == 0 || ow == 0) return;
  const int64_t orow = ow * item, per = std::max<int64_t>(1, std::min(oh, kPiece / std::max<int64_t>(orow, 1)));
  const int64_t blocks = ceil_div(oh, per);
  ThreadPool::instance().run(planes * blocks, [&](int64_t t, int) {
    const int64_t p = t / blocks, i0 = (t % blocks) * per, i1 = std::min(oh, i0 + per);
    for (int64_t i = i0; i < i1; ++i) {
      uint8_t* d = y + (p * oh + i) * orow;
      if (i > i0 && rows[i] == rows[i - 1]) {  // a repeated source row: copy the row just made
        std::memcpy(d, d - orow, static_cast<size_t>(orow));
        continue;
      }
      const uint8_t* s = x + (p * h + rows[i]) * w * item;
      switch (item) {
        case 1: gather_row<uint8_t>(s, cols, ow, d); break;
        case 2: gather_row<uint16_t>(s, cols, ow, d); break;
        case 4: gather_row<uint32_t>(s, cols, ow, d); break;
        case 8: gather_row<uint64_t>(s, cols, ow, d); break;
        default:
          for (int64_t j = 0; j < ow; ++j) std::memcpy(d + j * item, s + cols[j] * item, static_cast<size_t>(item));
      }
    }
  });
}

}  // namespace qsim
