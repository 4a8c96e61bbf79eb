// Deliberately broken kernels that the host SIMT emulator must catch (tests/test_cuda_simt.py): each probe
// launches one and reports the launch error, or whether the data it read was the data it should have read.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "fault_probes.h"

namespace simt {
namespace {

constexpr int kThreads = 64;

__global__ void oob_read(const uint8_t* x, int n, int* out) {
  if (threadIdx.x == 0) out[0] = __ldg(x + n);  // one byte past the end
}

__global__ void oob_write(int* out, int n) {
  if (threadIdx.x == 0) out[n] = 1;  // one element past the end: lands in the guard zone
}

__global__ void misaligned_cp_async(const uint8_t* x, int* out) {
  QSIM_DYNAMIC_SMEM(s);
  ptx::cp_async16(s + 8, x, 16);
  ptx::cp_async_commit();
  ptx::cp_async_wait(0);
  out[0] = s[8];
}

// Each thread copies its 16 bytes, then reads them back after a barrier: correct only with the wait.
template <bool Wait>
__global__ void copy_then_read(const uint8_t* x, uint8_t* y) {
  QSIM_DYNAMIC_SMEM(s);
  const int t = static_cast<int>(threadIdx.x);
  ptx::cp_async16(s + 16 * t, x + 16 * t, 16);
  ptx::cp_async_commit();
  if (Wait) ptx::cp_async_wait(0);
  __syncthreads();
  const int u = (t + 1) % kThreads;  // a neighbour's bytes
  for (int j = 0; j < 16; ++j) y[16 * blockIdx.x * kThreads + 16 * t + j] = s[16 * u + j];
  if (!Wait) ptx::cp_async_wait(0);
}

// Every thread fills its 16 bytes, then replaces them by cp.async; its neighbour reads the first contents.
// Correct only with a barrier between the neighbour's read and the copy.
template <bool Barrier>
__global__ void read_then_overwrite(const uint8_t* x, uint8_t* y) {
  QSIM_DYNAMIC_SMEM(s);
  const int t = static_cast<int>(threadIdx.x), u = (t + 1) % kThreads;
  for (int j = 0; j < 16; ++j) s[16 * t + j] = static_cast<uint8_t>(t);
  __syncthreads();
  uint8_t seen[16];
  if (Barrier) {
    for (int j = 0; j < 16; ++j) seen[j] = s[16 * u + j];
    __syncthreads();
  }
  ptx::cp_async16(s + 16 * t, x + 16 * t, 16);
  ptx::cp_async_commit();
  if (!Barrier)
    for (int j = 0; j < 16; ++j) seen[j] = s[16 * u + j];
  ptx::cp_async_wait(0);
  for (int j = 0; j < 16; ++j) y[16 * blockIdx.x * kThreads + 16 * t + j] = seen[j];
}

// Thread 0 writes shared memory; the last thread reads it, with or without a barrier between.
template <bool Barrier>
__global__ void write_then_read(uint8_t* y) {
  QSIM_DYNAMIC_SMEM(s);
  if (threadIdx.x == 0) s[0] = 42;
  if (Barrier) __syncthreads();
  if (threadIdx.x == kThreads - 1) y[blockIdx.x] = s[0];
}

__global__ void partial_warp_mma(int* out) {
  if ((threadIdx.x & 31) >= 16) return;  // half the warp leaves before the warp-wide instruction
  int32_t d[4] = {0, 0, 0, 0};
  const uint32_t a[4] = {1u, 1u, 1u, 1u};
  ptx::mma_s8(d, a, 1u, 1u);
  out[threadIdx.x] = d[0];
}

__global__ void divergent_collectives(int* out) {
  QSIM_DYNAMIC_SMEM(s);
  if (threadIdx.x & 1) {
    out[threadIdx.x] = static_cast<int>(__shfl_xor_sync(0xffffffffu, 1u, 1));
  } else {
    uint32_t r[4];
    ptx::ldmatrix_x4(r, s);
    out[threadIdx.x] = static_cast<int>(r[0]);
  }
}

__global__ void barrier_against_shuffle(int* out) {
  if (threadIdx.x == 0) {
    __syncthreads();  // lane 0 waits for the block while lanes 1..31 wait for lane 0
  } else if (threadIdx.x < 32) {
    out[threadIdx.x] = static_cast<int>(__shfl_xor_sync(0xffffffffu, 1u, 1));
  }
}

__global__ void big_smem(int* out) {
  QSIM_DYNAMIC_SMEM(s);
  out[0] = s[0];
}

std::string error_text(cudaError_t e) {
  cudaGetLastError();
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

struct Dev {
  void* p = nullptr;
  explicit Dev(size_t bytes) { cudaMalloc(&p, bytes); }
  ~Dev() { cudaFree(p); }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// "ok" when the data read back equals `want`, else "wrong data".
std::string compare(const Dev& d, const std::vector<uint8_t>& want) {
  std::vector<uint8_t> got(want.size());
  cudaMemcpy(got.data(), d.p, got.size(), cudaMemcpyDeviceToHost);
  return got == want ? "ok" : "wrong data";
}

}  // namespace

std::vector<std::string> fault_probe_names() {
  return {"oob_read",
          "oob_write",
          "misaligned_cp_async",
          "read_after_wait",
          "read_without_wait",
          "overwrite_after_barrier",
          "overwrite_before_barrier",
          "barrier",
          "missing_barrier",
          "partial_warp_collective",
          "divergent_collectives",
          "deadlock",
          "smem_without_opt_in"};
}

std::string fault_probe(const std::string& name) {
  constexpr int kBlocks = 64;
  Dev out(4096), x(16 * kThreads);
  std::vector<uint8_t> host(16 * kThreads);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<uint8_t>(i * 7 + 3);
  cudaMemcpy(x.p, host.data(), host.size(), cudaMemcpyHostToDevice);
  cudaError_t e = cudaSuccess;
  if (name == "oob_read") {
    QSIM_LAUNCH(oob_read, 1, kThreads, 0, nullptr)(x.as<uint8_t>(), 16 * kThreads, out.as<int>());
  } else if (name == "oob_write") {
    QSIM_LAUNCH(oob_write, 1, kThreads, 0, nullptr)(out.as<int>(), 1024);
  } else if (name == "misaligned_cp_async") {
    QSIM_LAUNCH(misaligned_cp_async, 1, kThreads, 64, nullptr)(x.as<uint8_t>(), out.as<int>());
  } else if (name == "read_after_wait" || name == "read_without_wait") {
    const bool wait = name == "read_after_wait";
    Dev y(static_cast<size_t>(16 * kThreads * kBlocks));
    if (wait)
      QSIM_LAUNCH(copy_then_read<true>, kBlocks, kThreads, 16 * kThreads, nullptr)(x.as<uint8_t>(), y.as<uint8_t>());
    else
      QSIM_LAUNCH(copy_then_read<false>, kBlocks, kThreads, 16 * kThreads, nullptr)(x.as<uint8_t>(), y.as<uint8_t>());
    if ((e = cudaGetLastError()) != cudaSuccess) return error_text(e);
    std::vector<uint8_t> want(static_cast<size_t>(16 * kThreads * kBlocks));
    for (int b = 0; b < kBlocks; ++b)
      for (int t = 0; t < kThreads; ++t)
        for (int j = 0; j < 16; ++j)
          want[static_cast<size_t>(16 * b * kThreads + 16 * t + j)] =
              host[static_cast<size_t>(16 * ((t + 1) % kThreads) + j)];
    return compare(y, want);
  } else if (name == "overwrite_after_barrier" || name == "overwrite_before_barrier") {
    Dev y(static_cast<size_t>(16 * kThreads * kBlocks));
    if (name == "overwrite_after_barrier")
      QSIM_LAUNCH(read_then_overwrite<true>, kBlocks, kThreads, 16 * kThreads, nullptr)(x.as<uint8_t>(),
                                                                                       y.as<uint8_t>());
    else
      QSIM_LAUNCH(read_then_overwrite<false>, kBlocks, kThreads, 16 * kThreads, nullptr)(x.as<uint8_t>(),
                                                                                        y.as<uint8_t>());
    if ((e = cudaGetLastError()) != cudaSuccess) return error_text(e);
    std::vector<uint8_t> want(static_cast<size_t>(16 * kThreads * kBlocks));
    for (size_t i = 0; i < want.size(); ++i) want[i] = static_cast<uint8_t>((i / 16 % kThreads + 1) % kThreads);
    return compare(y, want);
  } else if (name == "barrier" || name == "missing_barrier") {
    Dev y(kBlocks);
    if (name == "barrier")
      QSIM_LAUNCH(write_then_read<true>, kBlocks, kThreads, 16, nullptr)(y.as<uint8_t>());
    else
      QSIM_LAUNCH(write_then_read<false>, kBlocks, kThreads, 16, nullptr)(y.as<uint8_t>());
    if ((e = cudaGetLastError()) != cudaSuccess) return error_text(e);
    return compare(y, std::vector<uint8_t>(kBlocks, 42));
  } else if (name == "partial_warp_collective") {
    QSIM_LAUNCH(partial_warp_mma, 1, kThreads, 0, nullptr)(out.as<int>());
  } else if (name == "divergent_collectives") {
    QSIM_LAUNCH(divergent_collectives, 1, kThreads, 64, nullptr)(out.as<int>());
  } else if (name == "deadlock") {
    QSIM_LAUNCH(barrier_against_shuffle, 1, kThreads, 0, nullptr)(out.as<int>());
  } else if (name == "smem_without_opt_in") {
    QSIM_LAUNCH(big_smem, 1, kThreads, 64 * 1024, nullptr)(out.as<int>());
  } else {
    throw std::invalid_argument("unknown fault probe '" + name + "'");
  }
  e = cudaGetLastError();
  return e == cudaSuccess ? "ok" : error_text(e);
}

}  // namespace simt
