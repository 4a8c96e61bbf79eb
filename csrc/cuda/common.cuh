// Shared device helpers of the CUDA kernels: error checks, per-call workspace, the §6/§8/§9 output
// stage evaluated one element at a time with correctly rounded intrinsics (no FMA contraction).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "qsim.h"

// kernel<<<grid, block, smem, stream>>>, spelled as a macro so that the host SIMT emulation (simt/) can
// run the same sources; likewise the kernels' dynamic shared memory.
#ifndef QSIM_LAUNCH
#define QSIM_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define QSIM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) uint8_t name[]
#endif

namespace qsim {
namespace cuda {
namespace detail {

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline void check(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so later calls start clean
    throw std::runtime_error(std::string(op) + ": CUDA error in " + what + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

// Host staging + one stream-ordered device allocation per call: per-channel parameters are appended on
// the host (16-byte aligned), uploaded with one copy, and device-only scratch is reserved after them.
class Workspace {
 public:
  Workspace(const char* op, cudaStream_t s) : op_(op), s_(s) {}
  ~Workspace() {
    if (dev_) cudaFreeAsync(dev_, s_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // Reserve `bytes` initialized from host memory `src` (null: zero-filled); returns an offset.
  size_t add_host(const void* src, size_t bytes) {
    size_t off = align(host_.size());
    host_.resize(off + bytes, 0);
    if (src && bytes) std::memcpy(host_.data() + off, src, bytes);
    return off;
  }
  // Reserve device-only scratch (not initialized); returns an offset past the host part.
  size_t add_scratch(size_t bytes) {
    size_t off = align(scratch_);
    scratch_ = off + bytes;
    return off;
  }
  void upload() {
    const size_t hbytes = align(host_.size());
    const size_t total = hbytes + scratch_;
    if (total == 0) return;
    check(cudaMallocAsync(&dev_, total, s_), op_, "cudaMallocAsync (workspace)");
    host_bytes_ = hbytes;
    if (!host_.empty())
      check(cudaMemcpyAsync(dev_, host_.data(), host_.size(), cudaMemcpyHostToDevice, s_), op_,
            "cudaMemcpyAsync (parameters)");
  }
  template <class T>
  T* host_part(size_t off) const {
    return reinterpret_cast<T*>(static_cast<char*>(dev_) + off);
  }
  template <class T>
  T* scratch_part(size_t off) const {
    return reinterpret_cast<T*>(static_cast<char*>(dev_) + host_bytes_ + off);
  }

 private:
  static size_t align(size_t v) { return (v + 15) & ~size_t(15); }
  const char* op_;
  cudaStream_t s_;
  std::vector<char> host_;
  size_t scratch_ = 0, host_bytes_ = 0;
  void* dev_ = nullptr;
};

// Output stage in device memory (one entry per output channel of the whole op).
struct Epi {
  int type = 0;                       // OutType
  const int32_t* mult = nullptr;      // requantized outputs (second accumulator's multiplier for split)
  const int32_t* shift = nullptr;
  int32_t zy = 0, lo = 0, hi = 0;
  const float* scale = nullptr;       // float32 outputs (second accumulator's scale for split)
  const int32_t* acc1 = nullptr;      // split: first accumulator, same layout as y
  const int32_t* mult1 = nullptr;
  const float* scale1 = nullptr;
};

// §6 (and §8 when acc1 is given): writes element `idx` of y from the exact accumulator(s).
__device__ __forceinline__ void write_out(const Epi& e, void* y, int64_t idx, int64_t n, int32_t acc) {
  const OutType t = static_cast<OutType>(e.type);
  if (t == OutType::I32) {
    static_cast<int32_t*>(y)[idx] = acc;
    return;
  }
  if (t == OutType::F32) {
    float v = __fmul_rn(__int2float_rn(acc), e.scale[n]);
    if (e.acc1) v = __fadd_rn(__fmul_rn(__int2float_rn(e.acc1[idx]), e.scale1[n]), v);
    static_cast<float*>(y)[idx] = v;
    return;
  }
  // |acc * M| < 2^62 (one accumulator, §6); |acc1*M1 + acc2*M2| < 2^62 as well since |acc1| + |acc2| is
  // bounded by the §8 precondition. Shifts above 62 give exactly 0 (§6).
  int64_t p = static_cast<int64_t>(acc) * e.mult[n];
  if (e.acc1) p += static_cast<int64_t>(e.acc1[idx]) * e.mult1[n];
  const int s = e.shift[n];
  int64_t q = s > 62 ? 0 : ((p + (int64_t(1) << (s - 1))) >> s);
  q += e.zy;
  q = q < e.lo ? e.lo : (q > e.hi ? e.hi : q);
  if (t == OutType::S8 || t == OutType::S4)
    static_cast<int8_t*>(y)[idx] = static_cast<int8_t>(q);
  else
    static_cast<uint8_t*>(y)[idx] = static_cast<uint8_t>(q);
}

// Appends the output-stage vectors of `out` for `n` channels to the workspace; returns their offsets.
struct EpiOffsets {
  size_t mult = 0, shift = 0, scale = 0;
};
inline EpiOffsets stage_out(Workspace& ws, int64_t n, const OutStage& out) {
  EpiOffsets o;
  const size_t ni = static_cast<size_t>(n) * 4;
  if (is_requant(out.type)) {
    o.mult = ws.add_host(out.multiplier, ni);
    o.shift = ws.add_host(out.shift, ni);
  } else if (out.type == OutType::F32) {
    o.scale = ws.add_host(out.scale, ni);
  }
  return o;
}
inline Epi make_epi(const Workspace& ws, const EpiOffsets& o, const OutStage& out) {
  Epi e;
  e.type = static_cast<int>(out.type);
  if (is_requant(out.type)) {
    e.mult = ws.host_part<int32_t>(o.mult);
    e.shift = ws.host_part<int32_t>(o.shift);
    e.zy = out.zero_point;
    e.lo = out_qmin(out.type);
    e.hi = out_qmax(out.type);
  } else if (out.type == OutType::F32) {
    e.scale = ws.host_part<float>(o.scale);
  }
  return e;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detail
}  // namespace cuda
}  // namespace qsim
