// Portable implementations compiled into BOTH kernel translation units (scalar and AVX2), so each
// gets code generation for its ISA (the AVX2 TU auto-vectorizes these loops with AVX2).
// Include inside an unnamed namespace: every function here must have internal linkage so the AVX2
// copies can never be picked for the scalar path (no std:: templates either, for the same reason).
//
// Requires: <cstdint>, <cstring>, "kernels.h" included before.

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

#if !defined(__SIZEOF_INT128__)
#error "pyqsim's log2 attention output stage needs a compiler with __int128 (GCC or Clang)"
#endif

// §7 rows [m0, m1). scratch: 2 * N int64.
void log2_rows_impl(const qsim::detail::Log2Job& jb, int64_t m0, int64_t m1, int64_t* scratch) {
  const int64_t n = jb.n, l = jb.l;
  int64_t* e_acc = scratch;
  int64_t* o_acc = scratch + n;
  for (int64_t mi = m0; mi < m1; ++mi) {
    for (int64_t c = 0; c < n; ++c) e_acc[c] = 0;
    for (int64_t c = 0; c < n; ++c) o_acc[c] = 0;
    const uint8_t* crow = jb.codes + mi * l;
    for (int64_t j = 0; j < l; ++j) {
      const int code = crow[j];
      if (code == jb.zero_code) continue;
      const int e = (code + jb.k - 1) / jb.k;  // ceil(c / k), c >= 0
      const bool odd = jb.k == 2 && (code & 1);
      int64_t* acc = odd ? o_acc : e_acc;
      const int32_t* d = jb.d + j * n;
      const int t = jb.frac_bits - e;
      if (t >= 0) {
        const int64_t mul = int64_t(1) << t;
        for (int64_t c = 0; c < n; ++c) acc[c] += static_cast<int64_t>(d[c]) * mul;
      } else {
        const int neg = -t > 62 ? 62 : -t;
        const int64_t half = (int64_t(1) << neg) >> 1;
        for (int64_t c = 0; c < n; ++c) acc[c] += (static_cast<int64_t>(d[c]) + half) >> neg;
      }
    }
    // R = E * 2^16 + O * 92682 (exact in int64 under the §7 precondition)
    for (int64_t c = 0; c < n; ++c) e_acc[c] = e_acc[c] * 65536 + o_acc[c] * 92682;
    const int64_t* r = e_acc;
    if (jb.type == qsim::OutType::I64) {
      std::memcpy(static_cast<int64_t*>(jb.out) + mi * n, r, static_cast<size_t>(n) * sizeof(int64_t));
    } else if (jb.type == qsim::OutType::F32) {
      float* o = static_cast<float*>(jb.out) + mi * n;
      for (int64_t c = 0; c < n; ++c) {
        const float fr = static_cast<float>(r[c]);  // fl32(R): one rounding, then one multiply
        o[c] = fr * jb.scale[c];
      }
    } else {
      const int64_t lo = static_cast<int64_t>(jb.lo) - jb.zy, hi = static_cast<int64_t>(jb.hi) - jb.zy;
      for (int64_t c = 0; c < n; ++c) {
        const int s = jb.shift[c];  // 1..94; |R * M0| < 2^94, so the sum fits in 128 bits
        __int128 p = static_cast<__int128>(r[c]) * jb.multiplier[c] + (static_cast<__int128>(1) << (s - 1));
        p >>= s;
        int64_t y = p < lo ? lo : (p > hi ? hi : static_cast<int64_t>(p));
        y += jb.zy;
        if (jb.type == qsim::OutType::S8 || jb.type == qsim::OutType::S4)
          static_cast<int8_t*>(jb.out)[mi * n + c] = static_cast<int8_t>(y);
        else
          static_cast<uint8_t*>(jb.out)[mi * n + c] = static_cast<uint8_t>(y);
      }
    }
  }
}
