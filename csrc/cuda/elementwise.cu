// Requantization (§6), shift-based log2 attention x V (§7), the code-range reduction, and the memory
// helpers the bindings use for NumPy operands. GPU execution notes: docs/spec.md §13.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "qsim_cuda.h"

namespace qsim {
namespace cuda {
namespace detail {
namespace {

constexpr int kLog2P = 65536;  // 2^16
constexpr int kLog2Q = 92682;  // round(sqrt(2) * 2^16)

__global__ void requant_kernel(const int32_t* acc, int64_t total, int64_t n, int64_t inner, Epi e, void* y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = (i / inner) % n;
    write_out(e, y, i, c, acc[i]);
  }
}

struct ProfileParams {
  Numerics p;
  bool s8;  // int8 / int4 output bytes, else uint8 / uint4
  const int32_t* mult;  // tflite profiles
  const int32_t* shift;
  const float* scale;   // onnxruntime, fbgemm
  int32_t zy, lo, hi;
};

// One thread per element, the §14 stage of csrc/numerics.h (the same function the CPU kernels run).
__global__ void profile_kernel(const int32_t* acc, int64_t total, int64_t n, int64_t inner, ProfileParams P, void* y) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = (i / inner) % n;
    const int32_t q = numerics::requant_code(P.p, acc[i], P.mult ? P.mult[c] : 0, P.shift ? P.shift[c] : 1,
                                             P.scale ? P.scale[c] : 0.f, P.zy, P.lo, P.hi);
    if (P.s8)
      static_cast<int8_t*>(y)[i] = static_cast<int8_t>(q);
    else
      static_cast<uint8_t*>(y)[i] = static_cast<uint8_t>(q);
  }
}

struct Log2Params {
  const uint8_t* codes;  // [M, L]
  const uint8_t* v;      // [L, N]
  bool vu8;
  int32_t zv;
  int64_t m, l, n;
  int zero_code, k, frac_bits;
  int type;
  const int32_t* mult;
  const int32_t* shift;
  int32_t zy, lo, hi;
  const float* scale;
  void* y;
};

// One thread per output (row m, column c); a warp shares m, so the code decisions are warp-uniform and
// the code loads are broadcasts, while the V loads are coalesced along c.
__global__ void log2_kernel(Log2Params P) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * 32 + (threadIdx.x & 31);
  const int64_t mi = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (mi >= P.m || c >= P.n) return;
  const uint8_t* crow = P.codes + mi * P.l;
  int64_t e_acc = 0, o_acc = 0;
  for (int64_t j = 0; j < P.l; ++j) {
    const int code = __ldg(crow + j);
    if (code == P.zero_code) continue;
    const int e = (code + P.k - 1) / P.k;  // ceil(c / k)
    const bool odd = P.k == 2 && (code & 1);
    const uint8_t raw = __ldg(P.v + j * P.n + c);
    const int64_t d = (P.vu8 ? static_cast<int64_t>(raw) : static_cast<int64_t>(static_cast<int8_t>(raw))) - P.zv;
    const int t = P.frac_bits - e;
    int64_t add;
    if (t >= 0) {
      add = d * (int64_t(1) << t);
    } else {
      const int neg = -t > 62 ? 62 : -t;
      add = (d + ((int64_t(1) << neg) >> 1)) >> neg;
    }
    if (odd)
      o_acc += add;
    else
      e_acc += add;
  }
  const int64_t r = e_acc * kLog2P + o_acc * kLog2Q;  // exact in int64 under the §7 precondition
  const int64_t idx = mi * P.n + c;
  const OutType t = static_cast<OutType>(P.type);
  if (t == OutType::I64) {
    static_cast<int64_t*>(P.y)[idx] = r;
  } else if (t == OutType::F32) {
    static_cast<float*>(P.y)[idx] = __fmul_rn(__ll2float_rn(r), P.scale[c]);
  } else {
    const int s = P.shift[c];  // 1..94; |R * M0| < 2^94: 128-bit
    __int128 p = static_cast<__int128>(r) * P.mult[c] + (static_cast<__int128>(1) << (s - 1));
    p >>= s;
    const __int128 lo = static_cast<__int128>(P.lo) - P.zy, hi = static_cast<__int128>(P.hi) - P.zy;
    p = p < lo ? lo : (p > hi ? hi : p);
    const int64_t q = static_cast<int64_t>(p) + P.zy;
    if (t == OutType::S8 || t == OutType::S4)
      static_cast<int8_t*>(P.y)[idx] = static_cast<int8_t>(q);
    else
      static_cast<uint8_t*>(P.y)[idx] = static_cast<uint8_t>(q);
  }
}

__global__ void max_byte_kernel(const uint8_t* d, int64_t n, unsigned* out) {
  unsigned best = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    best = max(best, static_cast<unsigned>(d[i]));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, off));
  if ((threadIdx.x & 31) == 0) atomicMax(out, best);
}

unsigned grid_for(int64_t total, int threads) {
  const int64_t blocks = ceil_div(total, threads);
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

}  // namespace
}  // namespace detail

void requantize(const int32_t* acc, int64_t outer, int64_t n, int64_t inner, const OutStage& out, void* y,
                uintptr_t stream) {
  using namespace detail;
  const int64_t total = outer * n * inner;
  if (total == 0) return;
  cudaStream_t s = as_stream(stream);
  Workspace ws("requantize", s);
  const EpiOffsets eo = stage_out(ws, n, out);
  ws.upload();
  QSIM_LAUNCH(requant_kernel, grid_for(total, 256), 256, 0, s)(acc, total, n, inner, make_epi(ws, eo, out), y);
  check(cudaGetLastError(), "requantize", "kernel launch");
}

void requantize_profile(const int32_t* acc, int64_t outer, int64_t n, int64_t inner, Numerics p, const OutStage& out,
                        void* y, uintptr_t stream) {
  using namespace detail;
  const int64_t total = outer * n * inner;
  if (total == 0) return;
  cudaStream_t s = as_stream(stream);
  Workspace ws("requantize_profile", s);
  const bool fixed = p == Numerics::Tflite || p == Numerics::TfliteSingle;
  const size_t ni = static_cast<size_t>(n) * 4;
  const size_t om = fixed ? ws.add_host(out.multiplier, ni) : 0, os = fixed ? ws.add_host(out.shift, ni) : 0;
  const size_t oc = fixed ? 0 : ws.add_host(out.scale, ni);
  ws.upload();
  ProfileParams P;
  P.p = p;
  P.s8 = out.type == OutType::S8 || out.type == OutType::S4;
  P.mult = fixed ? ws.host_part<int32_t>(om) : nullptr;
  P.shift = fixed ? ws.host_part<int32_t>(os) : nullptr;
  P.scale = fixed ? nullptr : ws.host_part<float>(oc);
  P.zy = out.zero_point;
  P.lo = out_qmin(out.type);
  P.hi = out_qmax(out.type);
  QSIM_LAUNCH(profile_kernel, grid_for(total, 256), 256, 0, s)(acc, total, n, inner, P, y);
  check(cudaGetLastError(), "requantize_profile", "kernel launch");
}

void log2_attn_matmul(const uint8_t* codes, const void* v, ActType vt, int64_t m, int64_t l, int64_t n, int32_t zv,
                      int bits, int k, int frac_bits, const OutStage& out, void* y, uintptr_t stream) {
  using namespace detail;
  if (m == 0 || n == 0) return;
  const char* op = "log2_attn_matmul";
  if (ceil_div(n, 32) > 65535) throw std::invalid_argument("log2_attn_matmul: N too large for one launch grid");
  cudaStream_t s = as_stream(stream);
  Workspace ws(op, s);
  const EpiOffsets eo = stage_out(ws, n, out);
  ws.upload();
  const Epi e = make_epi(ws, eo, out);
  Log2Params P{codes, static_cast<const uint8_t*>(v), vt == ActType::U8, zv, m, l, n, (1 << bits) - 1, k,
               frac_bits, e.type, e.mult, e.shift, e.zy, e.lo, e.hi, e.scale, y};
  const dim3 grid(static_cast<unsigned>(ceil_div(m, 8)), static_cast<unsigned>(ceil_div(n, 32)));
  QSIM_LAUNCH(log2_kernel, grid, 256, 0, s)(P);
  check(cudaGetLastError(), op, "kernel launch");
}

uint8_t max_byte(const uint8_t* d, int64_t n, uintptr_t stream) {
  using namespace detail;
  if (n == 0) return 0;
  cudaStream_t s = as_stream(stream);
  Workspace ws("max_byte", s);
  const size_t o = ws.add_host(nullptr, sizeof(unsigned));
  ws.upload();
  unsigned* dev = ws.host_part<unsigned>(o);
  QSIM_LAUNCH(max_byte_kernel, grid_for(n, 256), 256, 0, s)(d, n, dev);
  check(cudaGetLastError(), "max_byte", "kernel launch");
  unsigned host = 0;
  check(cudaMemcpyAsync(&host, dev, sizeof(unsigned), cudaMemcpyDeviceToHost, s), "max_byte", "cudaMemcpyAsync");
  check(cudaStreamSynchronize(s), "max_byte", "cudaStreamSynchronize");
  return static_cast<uint8_t>(host);
}

// ------------------------------------------------------------------------------ memory and devices
void* device_alloc(size_t bytes, uintptr_t stream) {
  void* p = nullptr;
  if (bytes == 0) return nullptr;
  detail::check(cudaMallocAsync(&p, bytes, detail::as_stream(stream)), "device_alloc", "cudaMallocAsync");
  return p;
}

void device_free(void* p, uintptr_t stream) noexcept {
  if (p) {
    if (cudaFreeAsync(p, detail::as_stream(stream)) != cudaSuccess) cudaGetLastError();
  }
}

void copy_to_device(void* dst, const void* src, size_t bytes, uintptr_t stream) {
  if (bytes == 0) return;
  detail::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, detail::as_stream(stream)), "copy_to_device",
                "cudaMemcpyAsync");
}

void copy_to_host(void* dst, const void* src, size_t bytes, uintptr_t stream) {
  cudaStream_t s = detail::as_stream(stream);
  if (bytes) detail::check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s), "copy_to_host", "cudaMemcpyAsync");
  detail::check(cudaStreamSynchronize(s), "copy_to_host", "cudaStreamSynchronize");
}

void synchronize(uintptr_t stream) {
  detail::check(cudaStreamSynchronize(detail::as_stream(stream)), "synchronize", "cudaStreamSynchronize");
}

int pointer_device(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) return attr.device;
  return -1;
}

int current_device() {
  int d = 0;
  detail::check(cudaGetDevice(&d), "current_device", "cudaGetDevice");
  return d;
}

void set_device(int ordinal) { detail::check(cudaSetDevice(ordinal), "set_device", "cudaSetDevice"); }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string device_name(int ordinal) {
  cudaDeviceProp prop{};
  detail::check(cudaGetDeviceProperties(&prop, ordinal), "device_name", "cudaGetDeviceProperties");
  return prop.name;
}

int device_capability(int ordinal) {
  int major = 0, minor = 0;
  detail::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, ordinal), "device_capability",
                "cudaDeviceGetAttribute");
  detail::check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, ordinal), "device_capability",
                "cudaDeviceGetAttribute");
  return major * 10 + minor;
}

}  // namespace cuda
}  // namespace qsim
