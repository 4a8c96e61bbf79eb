// CUDA runtime report for build_info(): runtime/driver versions, device count, compiled architectures,
// and a one-kernel self test. The kernels are in gemm.cu and elementwise.cu.
#include <cuda_runtime.h>

#include <string>

#include "qsim.h"

#ifndef PYQSIM_CUDA_ARCHS
#define PYQSIM_CUDA_ARCHS ""
#endif

namespace {
__global__ void probe_kernel(int* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 3 * i + 1;
}
}  // namespace

namespace qsim {

CudaInfo cuda_info() {
  CudaInfo info;
  info.compiled = true;
  info.archs = PYQSIM_CUDA_ARCHS;
  cudaRuntimeGetVersion(&info.runtime_version);
  if (cudaDriverGetVersion(&info.driver_version) != cudaSuccess) info.driver_version = 0;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    info.device_count = 0;
    info.error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error state
  } else {
    info.device_count = count;
  }
  return info;
}

std::string cuda_selftest() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return "no CUDA device";
  }
  const int n = 1000;
  int* d = nullptr;
  if (cudaMalloc(&d, n * sizeof(int)) != cudaSuccess) return "cudaMalloc failed";
  probe_kernel<<<(n + 255) / 256, 256>>>(d, n);
  cudaError_t err = cudaGetLastError();
  int host[n];
  if (err == cudaSuccess) err = cudaMemcpy(host, d, n * sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(d);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  for (int i = 0; i < n; ++i)
    if (host[i] != 3 * i + 1) return "probe kernel returned wrong values";
  return "";
}

}  // namespace qsim
