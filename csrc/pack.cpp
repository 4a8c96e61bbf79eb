// Weight packing into micro-kernel panels (layouts in qsim.h / kernels.h).
#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>

#include "kernels.h"
#include "qsim.h"

namespace qsim {

namespace {
// A request for a large block is tried without throwing first: a throwing operator new that fails is fatal
// under some allocators (AddressSanitizer), a nothrow one returns null, reported here as std::bad_alloc
// (MemoryError in Python). Small requests go straight through.
void require_allocatable(size_t bytes) {
  if (bytes < (size_t(1) << 30)) return;
  void* p = ::operator new(bytes, std::nothrow);
  if (!p) throw std::bad_alloc();
  ::operator delete(p);
}

std::shared_ptr<uint8_t> aligned_bytes(size_t n) {
  if (n == 0) n = 64;
  auto* p = static_cast<uint8_t*>(::operator new(n, std::align_val_t(64), std::nothrow));
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, n);
  return std::shared_ptr<uint8_t>(p, [](uint8_t* q) { ::operator delete(q, std::align_val_t(64)); });
}

// stored 4-bit code: int4 c -> c + 8 (== nibble ^ 8), uint4 c -> c; both in [0, 15]
inline int8_t nibble_stored(const uint8_t* row, int64_t j, bool is_signed) {
  int v = (row[j >> 1] >> ((j & 1) * 4)) & 0xF;
  return static_cast<int8_t>(is_signed ? (v ^ 8) : v);
}
}  // namespace

namespace {
PackedMatrix empty_packed(int64_t n, int64_t kp, WFormat fmt) {
  PackedMatrix pm;
  pm.n = n;
  pm.kp = kp;
  pm.kg = kp / 4;
  pm.format = fmt;
  pm.panels = detail::ceil_div(n, kNR);
  pm.panel_bytes = fmt != WFormat::S8 ? (pm.kg / 2) * 64 : pm.kg * 64;
  pm.buf = aligned_bytes(static_cast<size_t>(pm.panels * pm.panel_bytes));
  require_allocatable(static_cast<size_t>(pm.panels * kNR) * sizeof(int32_t));
  pm.colsum.assign(static_cast<size_t>(pm.panels * kNR), 0);
  pm.fix_off.assign(static_cast<size_t>(pm.panels + 1), 0);
  return pm;
}

// 0x80 in each byte lane of w that equals 0x80 (-128), 0 in the others: t = w ^ 0x80 per lane is zero exactly
// there; (t & 0x7F) + 0x7F sets bit 7 iff the low 7 bits are not all zero, and never carries out of its lane
inline uint32_t min_lanes(uint32_t w) {
  const uint32_t t = w ^ 0x80808080u;
  return ~(((t & 0x7F7F7F7Fu) + 0x7F7F7F7Fu) | t | 0x7F7F7F7Fu);
}
}  // namespace

PackedMatrix pack_s8_rows(const uint8_t* src, int64_t ld, int64_t n, int64_t k, uint8_t xor_mask, bool true_only,
                          Isa isa) {
  const int64_t kp = detail::round_up(k, 4);
  PackedMatrix pm = empty_packed(n, kp, WFormat::S8);
  if (kp == 0) return pm;  // empty reduction: nothing to pack, every column sum is 0
  const uint32_t x4 = 0x01010101u * xor_mask;
  uint8_t* base = pm.buf.get();
  int64_t c0 = 0;  // columns packed 16 at a time by the kernel set (true codes only: no §10.2 fix-up to record)
  if (const auto pack16 = true_only ? detail::kernels_for(isa).pack_rows16 : nullptr)
    for (; c0 + kNR <= n; c0 += kNR)
      pack16(src + c0 * ld, ld, k, xor_mask, pm.kg, base + (c0 / kNR) * pm.panel_bytes, pm.colsum.data() + c0);
  for (int64_t c = c0; c < n; ++c) {
    const uint8_t* row = src + c * ld;
    uint8_t* pan = base + (c / kNR) * pm.panel_bytes + (c % kNR) * 4;
    const int32_t cc = static_cast<int32_t>(c % kNR);
    uint32_t s = 0;  // mod 2^32
    for (int64_t g = 0; g < pm.kg; ++g) {
      uint32_t w = 0;
      const int64_t nb = std::min<int64_t>(4, k - 4 * g);
      if (nb == 4) {
        std::memcpy(&w, row + 4 * g, 4);
        w ^= x4;
      } else {
        for (int64_t b = 0; b < nb; ++b) w |= static_cast<uint32_t>(row[4 * g + b] ^ xor_mask) << (8 * b);
      }
      for (int b = 0; b < 4; ++b) s += static_cast<uint32_t>(static_cast<int32_t>(static_cast<int8_t>(w >> (8 * b))));
      if (const uint32_t m = true_only ? 0u : min_lanes(w)) {  // §10.2: -128 packed as -127, the tile gets -x'
        for (int b = 0; b < 4; ++b)
          if (m >> (8 * b + 7) & 1) {
            pm.fix_k.push_back(4 * g + b);
            pm.fix_c.push_back(cc);
          }
        w += m >> 7;  // 0x80 -> 0x81 in those lanes (no carry out of a lane)
        pm.has_min = true;
      }
      std::memcpy(pan + g * 64, &w, 4);
    }
    pm.colsum[c] = static_cast<int32_t>(s);
    pm.fix_off[static_cast<size_t>(c / kNR) + 1] = static_cast<int64_t>(pm.fix_k.size());
  }
  for (int64_t p = 1; p <= pm.panels; ++p) pm.fix_off[p] = std::max(pm.fix_off[p], pm.fix_off[p - 1]);
  if (true_only) {  // the panels hold the true codes: the s8_u kernels read them as buf_exact
    pm.buf_exact = pm.buf;
    return pm;
  }
  if (pm.has_min && cpu_has_avx512vnni()) {
    const size_t bytes = static_cast<size_t>(pm.panels * pm.panel_bytes);
    pm.buf_exact = aligned_bytes(bytes);
    std::memcpy(pm.buf_exact.get(), pm.buf.get(), bytes);
    for (int64_t p = 0; p < pm.panels; ++p)
      for (int64_t f = pm.fix_off[p]; f < pm.fix_off[p + 1]; ++f) {
        const int64_t k = pm.fix_k[f];
        pm.buf_exact.get()[p * pm.panel_bytes + (k / 4) * 64 + pm.fix_c[f] * 4 + k % 4] = 0x80;  // -128
      }
  }
  return pm;
}

PackedMatrix pack_codes(const int8_t* codes, int64_t n, int64_t kp, WFormat fmt) {
  if (fmt == WFormat::S8)
    return pack_s8_rows(reinterpret_cast<const uint8_t*>(codes), kp, n, kp, 0, false, Isa::Scalar);
  PackedMatrix pm = empty_packed(n, kp, fmt);
  uint8_t* base = pm.buf.get();
  for (int64_t c = 0; c < n; ++c) {
    const int8_t* row = codes + c * kp;
    uint8_t* pan = base + (c / kNR) * pm.panel_bytes;
    const int64_t cc = c % kNR;
    uint32_t s = 0;
    for (int64_t j = 0; j < kp; ++j) s += static_cast<uint32_t>(static_cast<int32_t>(row[j]));
    pm.colsum[c] = static_cast<int32_t>(s);
    for (int64_t g8 = 0; g8 < pm.kg / 2; ++g8)
      for (int b = 0; b < 4; ++b) {
        uint8_t lo = static_cast<uint8_t>(row[8 * g8 + b]) & 0xF;
        uint8_t hi = static_cast<uint8_t>(row[8 * g8 + 4 + b]) & 0xF;
        pan[g8 * 64 + cc * 4 + b] = static_cast<uint8_t>(lo | (hi << 4));
      }
  }
  return pm;
}

void add_amx_panels(PackedMatrix& pm) {
  if (!cpu_has_amx() || pm.kg == 0) return;
  pm.kg_amx = detail::round_up(pm.kg, 16);
  if (pm.format == WFormat::S8 && pm.kg_amx == pm.kg) {  // already TDPBUSD's layout: share the true-code panels
    pm.buf_amx = pm.buf_exact ? pm.buf_exact : pm.buf;
    return;
  }
  const int64_t stride = pm.kg_amx * 64;
  pm.buf_amx = aligned_bytes(static_cast<size_t>(pm.panels * stride));  // zeroed: the padding k-groups
  for (int64_t p = 0; p < pm.panels; ++p) {
    uint8_t* dst = pm.buf_amx.get() + p * stride;
    if (pm.format == WFormat::S8) {  // true codes: buf_exact where a -128 was packed as -127
      std::memcpy(dst, pm.buf_exact ? pm.panel_exact(p) : pm.panel(p), static_cast<size_t>(pm.kg * 64));
      continue;
    }
    const uint8_t* src = pm.panel(p);  // nibbles: k-group 2 g8 in the low halves, 2 g8 + 1 in the high halves
    for (int64_t g8 = 0; g8 < pm.kg / 2; ++g8)
      for (int i = 0; i < 64; ++i) {
        dst[(2 * g8) * 64 + i] = src[g8 * 64 + i] & 0xF;
        dst[(2 * g8 + 1) * 64 + i] = src[g8 * 64 + i] >> 4;
      }
  }
}

std::shared_ptr<PackedWeight> pack_gemm_weight(const void* w, WFormat fmt, int64_t n, int64_t k) {
  using detail::round_up;
  const bool four = fmt != WFormat::S8;
  const int64_t kp = round_up(k, four ? 8 : 4);
  // The caller checked n * kp <= PTRDIFF_MAX. K = 0: no rows to copy (and codes.data() may be null).
  require_allocatable(static_cast<size_t>(n * kp));
  std::vector<int8_t> codes(static_cast<size_t>(n * kp), 0);
  if (k == 0) {
    // nothing to copy
  } else if (!four) {
    const int8_t* src = static_cast<const int8_t*>(w);
    for (int64_t r = 0; r < n; ++r) std::memcpy(codes.data() + r * kp, src + r * k, static_cast<size_t>(k));
  } else {
    const uint8_t* src = static_cast<const uint8_t*>(w);
    const int64_t rb = (k + 1) / 2;
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < k; ++j) codes[r * kp + j] = nibble_stored(src + r * rb, j, fmt == WFormat::S4);
  }
  auto pw = std::make_shared<PackedWeight>();
  pw->kind = PackedWeight::Gemm;
  pw->format = fmt;
  pw->n = n;
  pw->k = k;
  pw->mats.push_back(pack_codes(codes.data(), n, kp, fmt));
  if (fmt == WFormat::S4) pw->mats.back().code_offset = 8;
  add_amx_panels(pw->mats.back());
  return pw;
}

std::shared_ptr<PackedWeight> pack_conv_weight(const void* w, WFormat fmt, int64_t o, int64_t cin_g, int64_t kh,
                                               int64_t kw, int64_t groups) {
  using detail::round_up;
  const bool four = fmt != WFormat::S8;
  const int64_t kk = cin_g * kh * kw;
  const int64_t cg4 = round_up(cin_g, 4);
  // Activation k order: (tap i, tap j, channel c), channels padded to a multiple of 4 per tap.
  const int64_t kp = round_up(kh * kw * cg4, four ? 8 : 4);
  const int64_t og = groups ? o / groups : 0;
  auto pw = std::make_shared<PackedWeight>();
  pw->kind = PackedWeight::Conv;
  pw->format = fmt;
  pw->n = o;
  pw->k = kk;
  pw->cin_g = cin_g;
  pw->kh = kh;
  pw->kw = kw;
  pw->groups = groups;
  const int64_t rb = four ? (kk + 1) / 2 : kk;
  // No output channels: the kernels return before reading any group's matrix, so none is built (groups
  // can then be as large as the caller allowed without any per-group work).
  if (o == 0) return pw;
  require_allocatable(static_cast<size_t>(og * kp));
  std::vector<int8_t> codes(static_cast<size_t>(std::max<int64_t>(og * kp, 1)), 0);
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(codes.begin(), codes.end(), 0);
    for (int64_t r = 0; r < og; ++r) {
      const int64_t orow = g * og + r;
      for (int64_t c = 0; c < cin_g; ++c)
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t src_k = (c * kh + i) * kw + j;
            int8_t v;
            if (!four)
              v = static_cast<const int8_t*>(w)[orow * kk + src_k];
            else
              v = nibble_stored(static_cast<const uint8_t*>(w) + orow * rb, src_k, fmt == WFormat::S4);
            codes[r * kp + (i * kw + j) * cg4 + c] = v;
          }
    }
    pw->mats.push_back(pack_codes(codes.data(), og, kp, fmt));
    if (fmt == WFormat::S4) pw->mats.back().code_offset = 8;
    if (og >= 32) add_amx_panels(pw->mats.back());  // at least one pair of panels per group
  }
  return pw;
}

}  // namespace qsim
