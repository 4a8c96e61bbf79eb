// The GEMM/conv kernels of ../gemm.cu built for the host SIMT emulator (cuda_runtime.h here).
#include "../gemm.cu"
