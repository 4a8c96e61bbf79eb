// Portable implementations compiled into BOTH kernel translation units (scalar and AVX2), so each
// gets code generation for its ISA (the AVX2 TU auto-vectorizes these loops with AVX2).
// Include inside an unnamed namespace: every function here must have internal linkage so the AVX2
// copies can never be picked for the scalar path (no std:: templates either, for the same reason).
//
// Requires: <cstdint>, <cstring>, "kernels.h" included before.

inline int64_t gi_min(int64_t a, int64_t b) { return a < b ? a : b; }

// §6 for a run of values sharing one channel.
void requant_run_impl(const int32_t* acc, int64_t count, int64_t m, int64_t sh, int64_t rnd, int32_t zy, int32_t lo,
                      int32_t hi, qsim::OutType t, void* out) {
  const int64_t lo64 = static_cast<int64_t>(lo) - zy, hi64 = static_cast<int64_t>(hi) - zy;
  if (t == qsim::OutType::S8 || t == qsim::OutType::S4) {
    int8_t* o = static_cast<int8_t*>(out);
    for (int64_t i = 0; i < count; ++i) {
      int64_t y = (static_cast<int64_t>(acc[i]) * m + rnd) >> sh;
      y = y < lo64 ? lo64 : (y > hi64 ? hi64 : y);
      o[i] = static_cast<int8_t>(y + zy);
    }
  } else {
    uint8_t* o = static_cast<uint8_t*>(out);
    for (int64_t i = 0; i < count; ++i) {
      int64_t y = (static_cast<int64_t>(acc[i]) * m + rnd) >> sh;
      y = y < lo64 ? lo64 : (y > hi64 ? hi64 : y);
      o[i] = static_cast<uint8_t>(y + zy);
    }
  }
}

// §14 for a run of values sharing one channel (the per-element formula is numerics.h's, for every ISA).
void profile_run_impl(const int32_t* acc, int64_t count, qsim::Numerics p, int32_t m, int32_t sh, float scale, int32_t zy,
                      int32_t lo, int32_t hi, qsim::OutType t, void* out) {
  if (t == qsim::OutType::S8 || t == qsim::OutType::S4) {
    int8_t* o = static_cast<int8_t*>(out);
    for (int64_t i = 0; i < count; ++i)
      o[i] = static_cast<int8_t>(qsim::numerics::requant_code(p, acc[i], m, sh, scale, zy, lo, hi));
  } else {
    uint8_t* o = static_cast<uint8_t*>(out);
    for (int64_t i = 0; i < count; ++i)
      o[i] = static_cast<uint8_t>(qsim::numerics::requant_code(p, acc[i], m, sh, scale, zy, lo, hi));
  }
}

// §7 A panel of shift weights (see KernelSet::shift_a), rows r0..mr-1 from column j0 on.
void shift_a_rows(const uint8_t* codes, int64_t ldc, int mr, int64_t j0, int64_t lc, int64_t kg, const uint8_t* lut,
                  uint8_t* dst, int64_t* rowsum) {
  for (int r = 0; r < mr; ++r) {
    const uint8_t* cr = codes + r * ldc;
    int64_t s = 0;
    for (int64_t j = j0; j < 4 * kg; ++j) {
      const uint8_t w = j < lc ? lut[cr[j]] : 0;
      dst[(j >> 2) * mr * 4 + r * 4 + (j & 3)] = w;
      s += w;
    }
    rowsum[r] += s;
  }
}

// §7 B panel rows [g0, kg) of v' (see KernelSet::shift_b).
void shift_b_rows(const uint8_t* v, int64_t ldv, int64_t n, int64_t lc, int64_t g0, int64_t kg, uint8_t vxor,
                  int8_t* dst) {
  const int64_t npan = (n + 15) / 16;
  for (int64_t g = g0; g < kg; ++g)
    for (int64_t pn = 0; pn < npan; ++pn) {
      int8_t* d = dst + (pn * kg + g) * 64;
      if (4 * g >= lc) {  // padding
        std::memset(d, 0, 64);
        continue;
      }
      const int64_t nc = gi_min(16, n - pn * 16);
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t j = 4 * g + q;
        for (int64_t c = 0; c < 16; ++c)
          d[c * 4 + q] = j < lc && c < nc ? static_cast<int8_t>(v[j * ldv + pn * 16 + c] ^ vxor) : 0;
      }
    }
}

void shift_acc_impl(const int32_t* tile, int mr, const int32_t* corr, int64_t mul, int sh, int64_t* acc) {
  for (int r = 0; r < mr; ++r)
    for (int c = 0; c < 16; ++c) {
      const int32_t d = static_cast<int32_t>(static_cast<uint32_t>(tile[r * 16 + c]) - static_cast<uint32_t>(corr[r]));
      acc[r * 16 + c] += static_cast<int64_t>(d) * mul * (int64_t(1) << sh);
    }
}

void shift_f32_impl(const int64_t* r, int64_t nc, const float* scale, float* y) {
  for (int64_t c = 0; c < nc; ++c) {
    const float fr = static_cast<float>(r[c]);  // fl32(R): one rounding, then one multiply
    y[c] = fr * scale[c];
  }
}

// §7 deep terms of one row of v: acc[c] += round_half_up(d / 2^sft) * mul for c < nc, d = int8(v[c] ^ vxor) - zvp,
// sft in [1, 8]: |d| <= 255 and mul <= 92682, so every step fits int32.
void deep_add_impl(const uint8_t* vr, int64_t nc, uint8_t vxor, int32_t zvp, int sft, int32_t mul, int64_t* acc) {
  const int32_t half = int32_t(1) << (sft - 1);
  for (int64_t c = 0; c < nc; ++c) {
    const int32_t d = static_cast<int32_t>(static_cast<int8_t>(vr[c] ^ vxor)) - zvp;
    acc[c] += static_cast<int64_t>(((d + half) >> sft) * mul);
  }
}

void shift_requant_rows(const int64_t* r, int64_t c0, int64_t nc, const int32_t* mult, const int32_t* shift, int32_t zy,
                        int32_t lo, int32_t hi, bool s8, void* out) {
  for (int64_t c = c0; c < nc; ++c) {
    int64_t q = qsim::detail::shift_requant_one(r[c], mult[c], shift[c]) + zy;
    q = q < lo ? lo : (q > hi ? hi : q);
    if (s8)
      static_cast<int8_t*>(out)[c] = static_cast<int8_t>(q);
    else
      static_cast<uint8_t*>(out)[c] = static_cast<uint8_t>(q);
  }
}
