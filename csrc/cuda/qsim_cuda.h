// pyqsim CUDA kernels: public C++ interface (no Python, no CUDA headers needed by the caller).
//
// Operand pointers (activations, weights, codes, outputs) are DEVICE pointers on the current device;
// per-channel parameter vectors (zero points, bias, multipliers, shifts, scales) are HOST pointers,
// copied to the device inside the call. Every call is asynchronous on `stream` (a cudaStream_t passed
// as an integer handle; 0 = the legacy default stream) and throws std::runtime_error naming the op on a
// CUDA error. Shapes and parameter ranges are those of docs/spec.md, validated by the caller (bindings/).
// Section numbers (§) refer to docs/spec.md; §13 describes the GPU execution.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "qsim.h"

namespace qsim {
namespace cuda {

// One GEMM/conv operand pair. GEMM: x [M, K] row-major, w [N, K] int8 or [N, ceil(K/2)] packed 4-bit.
// Conv: x NCHW, w [O, C/g, KH, KW] int8 or [O, ceil(C/g*KH*KW/2)] packed 4-bit.
struct Operand {
  const void* x = nullptr;
  ActType xt = ActType::S8;
  int32_t zx = 0;
  const void* w = nullptr;
  WFormat wf = WFormat::S8;
  const int32_t* zw = nullptr;  // host [N]
};

// §4/§6: y[M, N] = stage(bias + (x - zx) @ (w - zw).T).
void int_gemm(const Operand& a, int64_t m, int64_t n, int64_t k, const int32_t* bias, const OutStage& out, void* y,
              uintptr_t stream);

// §5/§6: NCHW conv2d with zero-point padding; y [B, O, OH, OW]. g.cin is C; o output channels.
void int_conv2d(const Operand& a, const ConvGeom& g, int64_t o, int64_t kh, int64_t kw, int64_t groups,
                const int32_t* bias, const OutStage& out, void* y, uintptr_t stream);

// §8: two accumulations, one output stage. GEMM: x1 [M, K1], x2 [M, K2].
void split_gemm(const Operand& a, int64_t k1, const Operand& b, int64_t k2, int64_t m, int64_t n, const int32_t* bias,
                const SplitOutStage& out, void* y, uintptr_t stream);

// §8: conv over concat(x1, x2) channels (groups = 1); g.cin unused, c1/c2 channels of x1/x2.
void split_conv2d(const Operand& a, int64_t c1, const Operand& b, int64_t c2, const ConvGeom& g, int64_t o,
                  int64_t kh, int64_t kw, const int32_t* bias, const SplitOutStage& out, void* y, uintptr_t stream);

// §6: acc [outer, N, inner] int32 -> y of the stage's requantized type.
void requantize(const int32_t* acc, int64_t outer, int64_t n, int64_t inner, const OutStage& out, void* y,
                uintptr_t stream);

// §14: acc [outer, N, inner] int32 -> y of the stage's requantized type under runtime profile p (not Pyqsim):
// tflite / tflite-single take out.multiplier and out.shift (1..62), onnxruntime / fbgemm take out.scale.
void requantize_profile(const int32_t* acc, int64_t outer, int64_t n, int64_t inner, Numerics p, const OutStage& out,
                        void* y, uintptr_t stream);

// §7: codes [M, L] uint8, v [L, N]; y [M, N] int64, float32 or requantized.
void log2_attn_matmul(const uint8_t* codes, const void* v, ActType vt, int64_t m, int64_t l, int64_t n, int32_t zv,
                      int bits, int k, int frac_bits, const OutStage& out, void* y, uintptr_t stream);

// Largest byte of a device buffer (0 for n == 0); synchronizes `stream`. Used for the §3 code-range check.
uint8_t max_byte(const uint8_t* d, int64_t n, uintptr_t stream);

// ------------------------------------------------------------------------------------------ memory
// Stream-ordered device memory for NumPy operands and outputs (cudaMallocAsync / cudaFreeAsync).
void* device_alloc(size_t bytes, uintptr_t stream);
void device_free(void* p, uintptr_t stream) noexcept;
void copy_to_device(void* dst, const void* src, size_t bytes, uintptr_t stream);
void copy_to_host(void* dst, const void* src, size_t bytes, uintptr_t stream);  // synchronizes `stream`
void synchronize(uintptr_t stream);
// Device ordinal that owns `p` (-1 when it is not device or managed memory); the current device.
int pointer_device(const void* p);
int current_device();
void set_device(int ordinal);
int device_count();
std::string device_name(int ordinal);
// Compute capability as major * 10 + minor (the kernels need 80 or more: mma.sync s8, cp.async).
int device_capability(int ordinal);

}  // namespace cuda
}  // namespace qsim
