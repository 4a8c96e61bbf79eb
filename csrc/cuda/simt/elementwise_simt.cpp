// The element-wise kernels of ../elementwise.cu built for the host SIMT emulator (cuda_runtime.h here).
#include "../elementwise.cu"
