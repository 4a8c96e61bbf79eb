// Runtime selection of the CPU kernels (scalar / AVX2 / AVX-512 VNNI / AMX) and thread-count control.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "qsim.h"
#include "threadpool.h"

#if defined(PYQSIM_HAVE_AMX_TU) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qsim {

const char* isa_name(Isa isa) {
  return isa == Isa::Amx ? "amx" : isa == Isa::Avx512Vnni ? "avx512vnni" : isa == Isa::Avx2 ? "avx2" : "scalar";
}

bool amx_compiled() {
#if defined(PYQSIM_HAVE_AMX_TU)
  return true;
#else
  return false;
#endif
}

bool cpu_has_amx() {
#if defined(PYQSIM_HAVE_AMX_TU) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
  // CPUID.(7,0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8); XCR0 bits 17-18 (tile state enabled by the OS); and
  // Linux's per-process permission for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  static const bool has = [] {
    if (!cpu_has_avx512vnni()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (((d >> 24) & 3u) != 3u) return false;
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3u) != 3u) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return has;
#else
  return false;
#endif
}

bool avx512vnni_compiled() {
#if defined(PYQSIM_HAVE_VNNI_TU)
  return true;
#else
  return false;
#endif
}

bool cpu_has_avx512vnni() {
#if defined(PYQSIM_HAVE_VNNI_TU) && (defined(__GNUC__) || defined(__clang__))
  // libgcc's CPU model reports AVX-512 features only when the OS saves the ZMM and mask state (XGETBV).
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
  }();
  return has;
#else
  return false;
#endif
}

bool avx2_compiled() {
#if defined(PYQSIM_HAVE_AVX2_TU)
  return true;
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(PYQSIM_HAVE_AVX2_TU) && (defined(__GNUC__) || defined(__clang__))
  // libgcc's CPU model also checks that the OS saves YMM state (XGETBV) before reporting AVX2.
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
#else
  return false;
#endif
}

namespace {
std::mutex g_isa_mu;
std::string g_isa_override;  // "" = none

Isa parse_isa(const std::string& v, const char* source) {
  if (v.empty() || v == "auto") {
    if (amx_compiled() && cpu_has_amx()) return Isa::Amx;
    if (avx512vnni_compiled() && cpu_has_avx512vnni()) return Isa::Avx512Vnni;
    return (avx2_compiled() && cpu_has_avx2()) ? Isa::Avx2 : Isa::Scalar;
  }
  if (v == "scalar") return Isa::Scalar;
  if (v == "avx2") {
    if (!avx2_compiled())
      throw std::runtime_error(std::string(source) + "=avx2 but this build has no AVX2 kernels");
    if (!cpu_has_avx2()) throw std::runtime_error(std::string(source) + "=avx2 but this CPU does not support AVX2");
    return Isa::Avx2;
  }
  if (v == "avx512vnni") {
    if (!avx512vnni_compiled())
      throw std::runtime_error(std::string(source) + "=avx512vnni but this build has no AVX-512 VNNI kernels");
    if (!cpu_has_avx512vnni())
      throw std::runtime_error(std::string(source) + "=avx512vnni but this CPU does not support AVX-512 VNNI");
    return Isa::Avx512Vnni;
  }
  if (v == "amx") {
    if (!amx_compiled()) throw std::runtime_error(std::string(source) + "=amx but this build has no AMX kernels");
    if (!cpu_has_amx())
      throw std::runtime_error(std::string(source) + "=amx but this CPU (or OS) does not support AMX-INT8");
    return Isa::Amx;
  }
  throw std::invalid_argument(std::string(source) + " must be 'auto', 'scalar', 'avx2', 'avx512vnni' or 'amx', got '" +
                              v + "'");
}
}  // namespace

Isa resolve_isa() {
  std::string ov;
  {
    std::lock_guard<std::mutex> lk(g_isa_mu);
    ov = g_isa_override;
  }
  if (!ov.empty()) return parse_isa(ov, "cpu ISA override");
  const char* env = std::getenv("PYQSIM_CPU_ISA");
  return parse_isa(env ? std::string(env) : std::string(), "PYQSIM_CPU_ISA");
}

void set_isa_override(const std::string& name) {
  if (!name.empty()) parse_isa(name, "cpu ISA override");  // validate (throws)
  std::lock_guard<std::mutex> lk(g_isa_mu);
  g_isa_override = name;
}

std::string isa_override() {
  std::lock_guard<std::mutex> lk(g_isa_mu);
  return g_isa_override;
}

bool bytes_exceed(const uint8_t* p, int64_t n, uint8_t mask) {
  uint64_t any = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    any |= w;
  }
  uint8_t tail = 0;
  for (; i < n; ++i) tail |= p[i];
  for (int b = 0; b < 8; ++b) tail |= static_cast<uint8_t>(any >> (8 * b));
  return (tail & static_cast<uint8_t>(~mask)) != 0;
}

int get_num_threads() { return ThreadPool::instance().num_threads(); }
void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("number of threads must be >= 1, got " + std::to_string(n));
  if (n > ThreadPool::max_threads())
    throw std::invalid_argument("number of threads must be <= " + std::to_string(ThreadPool::max_threads()) +
                                " (max(1024, 64 x hardware threads)), got " + std::to_string(n));
  ThreadPool::instance().set_num_threads(n);
}

namespace detail {
const KernelSet& kernels_for(Isa isa) {
#if defined(PYQSIM_HAVE_AMX_TU)
  if (isa == Isa::Amx) return amx_kernels();
#endif
#if defined(PYQSIM_HAVE_VNNI_TU)
  if (isa == Isa::Avx512Vnni) return avx512vnni_kernels();
#endif
#if defined(PYQSIM_HAVE_AVX2_TU)
  if (isa == Isa::Avx2) return avx2_kernels();
#endif
  (void)isa;
  return scalar_kernels();
}
}  // namespace detail

}  // namespace qsim

namespace qsim {
#if !defined(PYQSIM_HAVE_CUDA)
CudaInfo cuda_info() { return CudaInfo{}; }
std::string cuda_selftest() { return "pyqsim was built without CUDA"; }
#endif
#if !defined(PYQSIM_HAVE_AVX2_TU)
std::vector<double> avx2_peak_gops(int64_t) { return {}; }
#endif
}  // namespace qsim
