// Host SIMT emulation of the CUDA subset used by csrc/cuda/ (docs/spec.md §13, host SIMT emulation).
//
// The kernel sources of csrc/cuda/*.cu compile unchanged with a host C++ compiler when this directory is
// first on the include path: this header stands in for <cuda_runtime.h>. Every CUDA thread of a launch
// runs as a fiber on the calling OS thread; __syncthreads, warp shuffles, ldmatrix and mma.sync are
// collectives that wait for every thread involved. The emulation is deliberately strict: a global access
// outside a live device allocation, a misaligned cp.async/ldmatrix address, shared memory read before
// cp.async.wait_group made it visible (copies land at the latest moment PTX allows; shared memory starts
// as noise), a warp collective reached by only part of a warp, a deadlock at a barrier, or a write past
// the end of an allocation is a launch failure naming the thread, instead of a silently wrong result.
// What it cannot show: timing, bank conflicts, register pressure, or a misreading of the PTX fragment
// layouts shared by the kernels and this file (those are written from the PTX ISA, see simt.cpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define PYQSIM_SIMT 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ------------------------------------------------------------------------------------------ types
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
  cudaErrorMisalignedAddress = 716,
};
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
};
enum cudaMemoryType : int {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};
struct cudaDeviceProp {
  char name[256];
};

// ------------------------------------------------------------------------------------------ runtime API
// One emulated device (ordinal 0, compute capability 8.0); streams are accepted and every call completes
// before it returns. Device memory is host memory with guard zones, tracked for the address checks.
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s);
cudaError_t cudaFreeAsync(void* p, cudaStream_t s);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaGetLastError();
const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int d);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int d);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaDriverGetVersion(int* v);

namespace simt {

// ------------------------------------------------------------------------------------------ emulator
struct ThreadCtx {
  dim3 thread, block, block_dim, grid_dim;
};
const ThreadCtx& ctx();  // the running CUDA thread's indices

[[noreturn]] void trap(const std::string& what);  // fails the launch, naming the running thread
void check_global(const void* p, size_t bytes, const char* what);
void syncthreads();
uint32_t shfl_xor(uint32_t mask, uint32_t v, int lane_mask);
uint8_t* dynamic_smem();
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
// Runs body(closure) once per thread of the grid; returns the launch's error.
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* closure);

// PTX instructions the kernels use through inline assembly on the device.
namespace ptx {
void cp_async16(void* dst, const void* src, int src_bytes);  // cp.async.cg.shared.global, zero fill
void cp_async_commit();                                       // cp.async.commit_group
void cp_async_wait(int n);                                    // cp.async.wait_group n
void ldmatrix_x4(uint32_t (&r)[4], const void* p);            // ldmatrix.sync.aligned.m8n8.x4.shared.b16
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, d += a * b (int32 wraps, as without .satfinite)
void mma_s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
}  // namespace ptx

template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... a) const {
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);  // kernel parameters, copied once
    auto call = [this, &args] { std::apply(kernel, args); };          // each thread gets its own copies
    using Call = decltype(call);
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
             [](void* c) { (*static_cast<Call*>(c))(); }, &call);
  }
};
template <class... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem) {
  return Launch<P...>{kernel, grid, block, smem};
}

}  // namespace simt

#define threadIdx (::simt::ctx().thread)
#define blockIdx (::simt::ctx().block)
#define blockDim (::simt::ctx().block_dim)
#define gridDim (::simt::ctx().grid_dim)
// kernel<<<grid, block, smem, stream>>>(args...) of the CUDA sources (common.cuh's QSIM_LAUNCH).
#define QSIM_LAUNCH(kernel, grid, block, smem, stream) ::simt::launch(kernel, grid, block, smem)
#define QSIM_DYNAMIC_SMEM(name) uint8_t* const name = ::simt::dynamic_smem()

template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return simt::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

// ------------------------------------------------------------------------------------------ device functions
inline void __syncthreads() { simt::syncthreads(); }
template <class T>
inline T __ldg(const T* p) {
  simt::check_global(p, sizeof(T), "__ldg");
  return *p;
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = simt::shfl_xor(mask, u, lane_mask);
  std::memcpy(&v, &u, 4);
  return v;
}
inline unsigned atomicMax(unsigned* p, unsigned v) {  // one OS thread runs a launch: a plain update is atomic
  simt::check_global(p, sizeof(unsigned), "atomicMax");
  const unsigned old = *p;
  *p = std::max(old, v);
  return old;
}
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
// Correctly rounded conversions and operations; the emulated sources compile with -ffp-contract=off.
inline float __int2float_rn(int v) { return static_cast<float>(v); }
inline float __ll2float_rn(long long v) { return static_cast<float>(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
