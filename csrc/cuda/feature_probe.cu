// Configure-time probe (PYQSIM_CUDA=AUTO): compiled, never linked into pyqsim. It uses every device
// feature the kernels need (int8 mma.sync, ldmatrix, cp.async: sm_80+; __int128 in device code), so AUTO
// falls back to a CPU-only build when the compiler or the architecture list cannot provide them.
#include <cstdint>

__global__ void pyqsim_feature_probe(const int8_t* g, int32_t* out, __int128 wide) {
  __shared__ __align__(16) uint8_t s[512];
  const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(s + (threadIdx.x & 31) * 16));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(g), "r"(16) : "memory");
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  __syncthreads();
  uint32_t a[4];
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(sa)
               : "memory");
  int32_t d[4] = {0, 0, 0, 0};
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(a[0]), "r"(a[1]));
  const __int128 p = wide * d[0];
  out[threadIdx.x] = d[0] + d[1] + d[2] + d[3] + static_cast<int32_t>(p >> 70);
}
