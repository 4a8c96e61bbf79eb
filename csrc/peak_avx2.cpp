// Register-only AVX2 int8 throughput loops for benchmarks/ (the "machine peak" line).
//   raw : vpmaddubsw only (12 independent chains): 32 u8*s8 multiplies + 16 pair adds per instruction.
//   unit: vpmaddubsw + vpmaddwd(ones) + vpaddd, the exact int32 accumulation step of FBGEMM-style
//         kernels (8 independent accumulators).
//   sign: vpsignb + vpmaddubsw + vpmaddwd + vpaddd, pyqsim's §10 step (8 accumulators).
// Each counts 64 ops (32 multiply-adds) per 32-byte step. Where the CPU has AVX-512 VNNI, a fourth loop:
//   vnni: vpdpbusd on zmm (12 independent chains), the exact step of §10.7: 128 ops per instruction.
// Where it also has AMX, a fifth: amx: TDPBUSD on four independent tiles (§10.8), 32768 ops per instruction.
// Inline asm keeps the exact instruction mix.
// Timed with the thread's CPU clock (Linux), best of 7.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>
#if defined(__linux__)
#include <time.h>
#endif

#include "qsim.h"

namespace qsim {
#if defined(PYQSIM_HAVE_VNNI_TU)
void vnni_peak_loop(int64_t n);  // ukernel_avx512vnni.cpp
#endif
#if defined(PYQSIM_HAVE_AMX_TU)
void amx_peak_loop(int64_t n);  // ukernel_amx.cpp
#endif
namespace {

// Thread CPU time where available: the loops then measure the core's throughput even when the
// machine is shared (time spent descheduled is not counted).
double now_s() {
#if defined(__linux__)
  timespec t;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t) == 0) return static_cast<double>(t.tv_sec) + 1e-9 * t.tv_nsec;
#endif
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

__attribute__((noinline)) void raw_loop(int64_t n) {
  // ymm12 = multiplier, ymm0..11 chains
  __asm__ volatile(
      "vpcmpeqb %%ymm12, %%ymm12, %%ymm12\n\t"
      "vpabsb %%ymm12, %%ymm12\n\t"
#define Z(i) "vpxor %%ymm" #i ", %%ymm" #i ", %%ymm" #i "\n\t"
      R12(Z)
#undef Z
      "1:\n\t"
#define M(i) "vpmaddubsw %%ymm12, %%ymm" #i ", %%ymm" #i "\n\t"
      R12(M)
#undef M
      "dec %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(n)
      :
      : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12");
}

// 8 accumulators ymm0..7; ymm8 = a, ymm9 = b, ymm10 = ones(int16), ymm11..14 temporaries
__attribute__((noinline)) void unit_loop(int64_t n) {
  __asm__ volatile(
      "vpcmpeqb %%ymm8, %%ymm8, %%ymm8\n\t"
      "vpabsb %%ymm8, %%ymm8\n\t"
      "vmovdqa %%ymm8, %%ymm9\n\t"
      "vpcmpeqw %%ymm10, %%ymm10, %%ymm10\n\t"
      "vpsrlw $15, %%ymm10, %%ymm10\n\t"
      "1:\n\t"
#define U(i, t) \
  "vpmaddubsw %%ymm9, %%ymm8, %%ymm" #t "\n\t" "vpmaddwd %%ymm10, %%ymm" #t ", %%ymm" #t "\n\t" \
  "vpaddd %%ymm" #t ", %%ymm" #i ", %%ymm" #i "\n\t"
      U(0, 11) U(1, 12) U(2, 13) U(3, 14) U(4, 11) U(5, 12) U(6, 13) U(7, 14)
#undef U
      "dec %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(n)
      :
      : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12", "xmm13", "xmm14");
}

__attribute__((noinline)) void sign_loop(int64_t n) {
  __asm__ volatile(
      "vpcmpeqb %%ymm8, %%ymm8, %%ymm8\n\t"
      "vpabsb %%ymm8, %%ymm8\n\t"
      "vmovdqa %%ymm8, %%ymm9\n\t"
      "vpcmpeqw %%ymm10, %%ymm10, %%ymm10\n\t"
      "vpsrlw $15, %%ymm10, %%ymm10\n\t"
      "1:\n\t"
#define S(i, t) \
  "vpsignb %%ymm8, %%ymm9, %%ymm" #t "\n\t" "vpmaddubsw %%ymm" #t ", %%ymm8, %%ymm" #t "\n\t" \
  "vpmaddwd %%ymm10, %%ymm" #t ", %%ymm" #t "\n\t" "vpaddd %%ymm" #t ", %%ymm" #i ", %%ymm" #i "\n\t"
      S(0, 11) S(1, 12) S(2, 13) S(3, 14) S(4, 11) S(5, 12) S(6, 13) S(7, 14)
#undef S
      "dec %0\n\t"
      "jnz 1b\n\t"
      "vzeroupper\n\t"
      : "+r"(n)
      :
      : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
        "xmm12", "xmm13", "xmm14");
}

template <typename F>
double best_rate(F f, int64_t iters, double ops_per_iter) {
  double best = 0;
  for (int rep = 0; rep < 7; ++rep) {
    const double t0 = now_s();
    f(iters);
    const double dt = now_s() - t0;
    if (dt > 0) {
      const double r = ops_per_iter * static_cast<double>(iters) / dt / 1e9;
      if (r > best) best = r;
    }
  }
  return best;
}

}  // namespace

std::vector<double> avx2_peak_gops(int64_t iterations) {
  if (iterations < 1) iterations = 1;
  const double raw = best_rate(raw_loop, iterations, 12 * 64.0);
  const double unit = best_rate(unit_loop, iterations, 8 * 64.0);
  const double sign = best_rate(sign_loop, iterations, 8 * 64.0);
  std::vector<double> out{raw, unit, sign};
#if defined(PYQSIM_HAVE_VNNI_TU)
  if (cpu_has_avx512vnni()) out.push_back(best_rate(vnni_peak_loop, iterations, 12 * 128.0));
#endif
#if defined(PYQSIM_HAVE_AMX_TU)
  if (cpu_has_amx()) out.push_back(best_rate(amx_peak_loop, std::max<int64_t>(1, iterations / 16), 4 * 16 * 16 * 64 * 2.0));
#endif
  return out;
}

}  // namespace qsim
