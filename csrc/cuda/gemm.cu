// Integer GEMM and conv2d on int8 tensor cores (§4, §5, §6, §8; GPU execution in §13).
//
// One kernel template computes every GEMM-shaped op: y = stage(sum_k (x' - zx')(w - zw)) with
//   x' = x (int8) or x - 128 (uint8, a bit flip of the code: the mma operands stay signed),
//   w  = int8 code, int4 code, or uint4 code - 8 (so every product is bounded by the §4.1 terms and the
//        int32 tensor-core accumulator never wraps).
// The main loop computes dot = sum x' w with mma.sync m16n8k32 (s8 x s8 -> s32) over 128x128 block tiles,
// K tiles of 64 bytes in a 4-stage shared-memory pipeline (cp.async for aligned int8 operands, register-
// staged gathers for conv, unaligned rows and 4-bit weights unpacked to int8 on the way in). The epilogue
// adds the §4 expansion terms mod 2^32, acc = dot + colc[n] - zw[n] * rowsum[m] with
// colc = bias - zx' colsum + K zx' zw (exact: the true accumulator fits int32 by §4.1), then §6.
// Conv is an implicit GEMM over NCHW input: row m = (b, oy, ox), k = (c, ky, kx) in weight order,
// out-of-image taps read the activation zero point (§5). A GEMM is the 1x1 conv of [M, K, 1, 1].
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "qsim_cuda.h"

namespace qsim {
namespace cuda {
namespace detail {
namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 4, NTHREADS = 256;
constexpr int LDS = BK + 16;  // 80-byte smem rows: 16-byte accesses of 8 consecutive rows hit 8 distinct bank groups
constexpr int A_BYTES = BM * LDS, B_BYTES = BN * LDS, STAGE_BYTES = A_BYTES + B_BYTES;
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;

// Implicit-GEMM view of an NCHW activation tensor (GEMM: batch = M, cin = K, 1x1 everything).
struct ConvView {
  const uint8_t* x = nullptr;
  int64_t cin = 0, h = 1, w = 1, oh = 1, ow = 1;
  int32_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t cin_g = 0;  // channels per group
  uint8_t pad = 0;    // raw code of the activation zero point (§5 padding)
};

struct Problem {
  int64_t m = 0, k = 0;           // rows and reduction length of one group
  bool xu8 = false;
  int64_t ng = 0, ntot = 0;       // channels per group, all channels
  // epilogue
  const int32_t* colc = nullptr;  // [ntot]
  const int32_t* zw = nullptr;    // [ntot] mapped zero points; null when rowsum is not needed
  const int32_t* rowsum = nullptr;  // [groups][m]
  int64_t psp = 1;                // output pixels per image (oh * ow); GEMM: 1
  void* y = nullptr;
  Epi epi;
};

// ------------------------------------------------------------------------------ PTX wrappers
#ifdef PYQSIM_SIMT  // host SIMT emulation (simt/cuda_runtime.h)
using simt::ptx::cp_async16;
using simt::ptx::cp_async_commit;
using simt::ptx::ldmatrix_x4;
using simt::ptx::mma_s8;
template <int N>
void cp_async_wait() {
  simt::ptx::cp_async_wait(N);
}
#else
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
// D = A (16x32 s8, row) * B (32x8 s8, col) + D, int32.
__device__ __forceinline__ void mma_s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// ------------------------------------------------------------------------------ tile loaders
// Each thread moves two 16-byte chunks per K tile: chunk id = tid + 256 i, tile row id / 4, bytes 16 (id % 4).
// Async loaders write shared memory directly (fetch); register-staged loaders fetch into registers
// and store after the current tile's math (store). Bytes past K or past the last row are zero
// (activation bytes past K meet zero weights, so their value does not matter).

// Rows of bytes, 16-byte aligned, row stride a multiple of 16 (int8 GEMM operands).
struct AsyncRows {
  const uint8_t* base;
  int64_t ld, rows, k;
  __device__ void fetch(uint8_t* s, int64_t r0, int64_t k0, int tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int id = tid + i * NTHREADS, row = id >> 2, c = id & 3;
      const int64_t r = r0 + row, kk = k0 + c * 16;
      const bool ok = r < rows && kk < k;
      cp_async16(s + row * LDS + c * 16, ok ? base + r * ld + kk : base, ok ? 16 : 0);
    }
  }
  __device__ void store(uint8_t*, int) {}
  __device__ void group(int64_t g) { base += g * rows * ld; }  // rows = channels per group (weights)
};

// Register-staged loaders: fetch() fills reg, store() writes it to the tile slot.
struct Staged {
  uint4 reg[2];
  __device__ void store(uint8_t* s, int tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int id = tid + i * NTHREADS, row = id >> 2, c = id & 3;
      *reinterpret_cast<uint4*>(s + row * LDS + c * 16) = reg[i];
    }
  }
};

// Activation rows gathered from NCHW input (conv taps, zero-point padding), any alignment.
struct GatherA : Staged {
  ConvView v;
  int64_t rows, k, c0;  // c0: first input channel of this group
  __device__ void group(int64_t g) { c0 = g * v.cin_g; }
  __device__ void fetch(uint8_t*, int64_t r0, int64_t k0, int tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int id = tid + i * NTHREADS, row = id >> 2, c = id & 3;
      const int64_t m = r0 + row, kk = k0 + c * 16;
      uint32_t wd[4] = {0u, 0u, 0u, 0u};
      if (m < rows && kk < k) {
        const int64_t psp = v.oh * v.ow;
        const int64_t b = m / psp, p = m - b * psp, oy = p / v.ow, ox = p - oy * v.ow;
        const int64_t iy0 = oy * v.sh - v.ph, ix0 = ox * v.sw - v.pw;
        const uint8_t* xb = v.x + (b * v.cin + c0) * v.h * v.w;
        const int64_t khw = static_cast<int64_t>(v.kh) * v.kw;
        int64_t ci = kk / khw;
        int64_t rem = kk - ci * khw;
        int ky = static_cast<int>(rem / v.kw), kx = static_cast<int>(rem - static_cast<int64_t>(ky) * v.kw);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          if (kk + j < k) {
            const int64_t iy = iy0 + static_cast<int64_t>(ky) * v.dh, ix = ix0 + static_cast<int64_t>(kx) * v.dw;
            const uint32_t byte =
                (iy >= 0 && iy < v.h && ix >= 0 && ix < v.w) ? __ldg(xb + (ci * v.h + iy) * v.w + ix) : v.pad;
            wd[j >> 2] |= byte << ((j & 3) * 8);
          }
          if (++kx == v.kw) {
            kx = 0;
            if (++ky == v.kh) {
              ky = 0;
              ++ci;
            }
          }
        }
      }
      reg[i] = make_uint4(wd[0], wd[1], wd[2], wd[3]);
    }
  }
};

// int8 weight rows, any alignment.
struct RegRowsS8 : Staged {
  const uint8_t* base;
  int64_t ld, rows, k;
  __device__ void group(int64_t g) { base += g * rows * ld; }
  __device__ void fetch(uint8_t*, int64_t r0, int64_t k0, int tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int id = tid + i * NTHREADS, row = id >> 2, c = id & 3;
      const int64_t r = r0 + row, kk = k0 + c * 16;
      uint32_t wd[4] = {0u, 0u, 0u, 0u};
      if (r < rows && kk < k) {
        const uint8_t* src = base + r * ld + kk;
#pragma unroll
        for (int j = 0; j < 16; ++j)
          if (kk + j < k) wd[j >> 2] |= static_cast<uint32_t>(__ldg(src + j)) << ((j & 3) * 8);
      }
      reg[i] = make_uint4(wd[0], wd[1], wd[2], wd[3]);
    }
  }
};

// Packed 4-bit weight rows (§1.1: k even in the low nibble), unpacked to int8 in registers:
// value = sign-extended (nibble ^ nib_xor): the int4 code, or the uint4 code - 8.
struct NibRows : Staged {
  const uint8_t* base;
  int64_t ld, rows, k;
  int nx;
  __device__ void group(int64_t g) { base += g * rows * ld; }
  __device__ static uint32_t expand(uint32_t nib, int nx) {
    const int v = static_cast<int>(((nib ^ static_cast<uint32_t>(nx)) ^ 8u)) - 8;  // in [-8, 7]
    return static_cast<uint32_t>(v) & 0xFFu;
  }
  __device__ void fetch(uint8_t*, int64_t r0, int64_t k0, int tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int id = tid + i * NTHREADS, row = id >> 2, c = id & 3;
      const int64_t r = r0 + row, kk = k0 + c * 16;  // kk even
      uint32_t wd[4] = {0u, 0u, 0u, 0u};
      if (r < rows && kk < k) {
        const uint8_t* src = base + r * ld + (kk >> 1);
#pragma unroll
        for (int j = 0; j < 16; j += 2) {
          if (kk + j < k) {
            const uint32_t byte = __ldg(src + (j >> 1));
            wd[j >> 2] |= expand(byte & 15u, nx) << ((j & 3) * 8);
            if (kk + j + 1 < k) wd[j >> 2] |= expand(byte >> 4, nx) << (((j + 1) & 3) * 8);
          }
        }
      }
      reg[i] = make_uint4(wd[0], wd[1], wd[2], wd[3]);
    }
  }
};

// ------------------------------------------------------------------------------ main kernel
// Warps: 2 (rows) x 4 (channels); warp tile 64 x 32 = 4 x 4 mma tiles of 16 x 8.
__device__ __forceinline__ void tile_math(const uint8_t* sa, const uint8_t* sb, int lane, int wm, int wn,
                                          uint32_t amask, int32_t (&acc)[4][4][4]) {
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
    uint32_t a[4][4], b[4][2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      // matrices: rows 0-7 / 8-15 x k bytes 0-15 / 16-31 -> a[0..3] in the m16n8k32 A-fragment order
      ldmatrix_x4(a[mt], sa + (wm * 64 + mt * 16 + (lane & 15)) * LDS + ks * 32 + (lane >> 4) * 16);
#pragma unroll
      for (int q = 0; q < 4; ++q) a[mt][q] ^= amask;
    }
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      // matrices: (n-tile 2p, k 0-15), (2p, k 16-31), (2p+1, k 0-15), (2p+1, k 16-31)
      const int j = lane >> 3, r = lane & 7;
      uint32_t t[4];
      ldmatrix_x4(t, sb + (wn * 32 + (2 * p + (j >> 1)) * 8 + r) * LDS + ks * 32 + (j & 1) * 16);
      b[2 * p][0] = t[0];
      b[2 * p][1] = t[1];
      b[2 * p + 1][0] = t[2];
      b[2 * p + 1][1] = t[3];
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) mma_s8(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
  }
}

__device__ __forceinline__ void epilogue_one(const Problem& P, int64_t grp, int64_t m, int64_t nl, int32_t dot) {
  const int64_t n = grp * P.ng + nl;
  uint32_t a = static_cast<uint32_t>(dot) + static_cast<uint32_t>(P.colc[n]);
  if (P.rowsum) a -= static_cast<uint32_t>(P.zw[n]) * static_cast<uint32_t>(P.rowsum[grp * P.m + m]);
  const int64_t b = m / P.psp, p = m - b * P.psp;
  write_out(P.epi, P.y, (b * P.ntot + n) * P.psp + p, n, static_cast<int32_t>(a));
}

template <class LA, class LB>
__global__ void __launch_bounds__(NTHREADS) gemm_kernel(Problem P, LA la, LB lb) {
  QSIM_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int64_t grp = blockIdx.z;
  la.group(grp);
  lb.group(grp);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const uint32_t amask = P.xu8 ? 0x80808080u : 0u;
  const int64_t ktiles = (P.k + BK - 1) / BK;

  int32_t acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) {
      uint8_t* sa = smem + s * STAGE_BYTES;
      la.fetch(sa, m0, s * BK, tid);
      lb.fetch(sa + A_BYTES, n0, s * BK, tid);
      la.store(sa, tid);
      lb.store(sa + A_BYTES, tid);
    }
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt is visible; every warp is done with tile kt - 1, whose slot is refilled now
    const int64_t next = kt + STAGES - 1;
    uint8_t* snext = smem + (next % STAGES) * STAGE_BYTES;
    if (next < ktiles) {
      la.fetch(snext, m0, next * BK, tid);
      lb.fetch(snext + A_BYTES, n0, next * BK, tid);
    }
    const uint8_t* scur = smem + (kt % STAGES) * STAGE_BYTES;
    tile_math(scur, scur + A_BYTES, lane, wm, wn, amask, acc);
    if (next < ktiles) {
      la.store(snext, tid);
      lb.store(snext + A_BYTES, tid);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t m = m0 + wm * 64 + mt * 16 + g + 8 * h;
          const int64_t nl = n0 + wn * 32 + nt * 8 + 2 * t + j;
          if (m < P.m && nl < P.ng) epilogue_one(P, grp, m, nl, acc[mt][nt][2 * h + j]);
        }
}

// ------------------------------------------------------------------------------ prologue kernels
__device__ __forceinline__ int32_t act_value(uint8_t byte, bool xu8) {
  return xu8 ? static_cast<int32_t>(byte) - 128 : static_cast<int32_t>(static_cast<int8_t>(byte));
}

// Per channel: colc = bias - zx' colsum + K zx' zw' and zw' (mapped), mod 2^32. One warp per channel.
__global__ void channel_consts_kernel(const uint8_t* w, int64_t ldw, int64_t k, int four, int nx, int64_t ntot,
                                      const int32_t* zw, const int32_t* bias, int32_t zxm, int32_t* colc,
                                      int32_t* zwm) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (n >= ntot) return;
  const uint8_t* row = w + n * ldw;
  int32_t cs = 0;
  for (int64_t kk = lane; kk < k; kk += 32) {
    if (four) {
      const uint32_t byte = __ldg(row + (kk >> 1));
      const uint32_t nib = (kk & 1) ? (byte >> 4) : (byte & 15u);
      cs += static_cast<int32_t>(((nib ^ static_cast<uint32_t>(nx)) ^ 8u)) - 8;
    } else {
      cs += static_cast<int8_t>(__ldg(row + kk));
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) cs += __shfl_xor_sync(0xffffffffu, cs, off);
  if (lane == 0) {
    const uint32_t z = static_cast<uint32_t>(zw[n] - (four && nx ? 8 : 0));
    const uint32_t zx = static_cast<uint32_t>(zxm);
    uint32_t v = static_cast<uint32_t>(bias[n]);
    v -= zx * static_cast<uint32_t>(cs);
    v += static_cast<uint32_t>(k) * zx * z;
    colc[n] = static_cast<int32_t>(v);
    zwm[n] = static_cast<int32_t>(z);
  }
}

// Per (group, row): sum_k x' over the row's taps (padding reads zx'). One warp per row.
__global__ void rowsum_kernel(ConvView v, int64_t m, int64_t k, int64_t groups, bool xu8, int32_t* out) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (id >= m * groups) return;
  const int64_t grp = id / m, row = id - grp * m;
  const int64_t psp = v.oh * v.ow;
  const int64_t b = row / psp, p = row - b * psp, oy = p / v.ow, ox = p - oy * v.ow;
  const int64_t iy0 = oy * v.sh - v.ph, ix0 = ox * v.sw - v.pw;
  const uint8_t* xb = v.x + (b * v.cin + grp * v.cin_g) * v.h * v.w;
  const int64_t khw = static_cast<int64_t>(v.kh) * v.kw;
  int32_t s = 0;
  for (int64_t kk = lane; kk < k; kk += 32) {
    const int64_t ci = kk / khw, rem = kk - ci * khw, ky = rem / v.kw, kx = rem - ky * v.kw;
    const int64_t iy = iy0 + ky * v.dh, ix = ix0 + kx * v.dw;
    const uint8_t byte = (iy >= 0 && iy < v.h && ix >= 0 && ix < v.w) ? __ldg(xb + (ci * v.h + iy) * v.w + ix) : v.pad;
    s += act_value(byte, xu8);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) out[id] = s;
}

// ------------------------------------------------------------------------------ host side
struct Branch {
  const Operand* a;
  ConvView v;
  int64_t m, k, groups, ng, ntot, psp;
  bool gemm;  // plain row-major GEMM operands (eligible for the cp.async path)
};

template <class LA, class LB>
void launch(const char* op, const Problem& P, int64_t groups, const LA& la, const LB& lb, cudaStream_t s) {
  auto kern = gemm_kernel<LA, LB>;
  check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES), op,
        "cudaFuncSetAttribute");
  const dim3 grid(static_cast<unsigned>(ceil_div(P.m, BM)), static_cast<unsigned>(ceil_div(P.ng, BN)),
                  static_cast<unsigned>(groups));
  QSIM_LAUNCH(kern, grid, NTHREADS, SMEM_BYTES, s)(P, la, lb);
  check(cudaGetLastError(), op, "kernel launch");
}

// Runs one branch: prologue kernels into workspace slots, then the main kernel with epilogue `epi`.
void run_branch(const char* op, const Branch& br, const int32_t* bias_host, const Epi& epi, void* y, cudaStream_t s) {
  if (br.m == 0 || br.ntot == 0) return;
  const Operand& a = *br.a;
  if (ceil_div(br.ng, BN) > 65535 || br.groups > 65535 || ceil_div(br.m, BM) > 0x7fffffff ||
      ceil_div(br.m * br.groups, 8) > 0x7fffffff || ceil_div(br.ntot, 8) > 0x7fffffff)
    throw std::invalid_argument(std::string(op) + ": problem too large for one launch grid");
  const bool four = a.wf != WFormat::S8;
  const int nx = a.wf == WFormat::U4 ? 8 : 0;
  const bool xu8 = a.xt == ActType::U8;
  const int32_t zxm = xu8 ? a.zx - 128 : a.zx;
  bool need_rows = false;
  for (int64_t c = 0; c < br.ntot; ++c) need_rows |= (a.zw[c] - (nx ? 8 : 0)) != 0;

  Workspace ws(op, s);
  const size_t ni = static_cast<size_t>(br.ntot) * 4;
  const size_t o_zw = ws.add_host(a.zw, ni);
  const size_t o_bias = ws.add_host(bias_host, ni);
  const size_t o_colc = ws.add_scratch(ni), o_zwm = ws.add_scratch(ni);
  const size_t o_rows = need_rows ? ws.add_scratch(static_cast<size_t>(br.m * br.groups) * 4) : 0;
  ws.upload();

  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  const int64_t ldw = four ? (br.k + 1) / 2 : br.k;
  {
    const int warps = 8;
    const unsigned blocks = static_cast<unsigned>(ceil_div(br.ntot, warps));
    QSIM_LAUNCH(channel_consts_kernel, blocks, warps * 32, 0, s)(w, ldw, br.k, four, nx, br.ntot, ws.host_part<int32_t>(o_zw),
                                                        ws.host_part<int32_t>(o_bias), zxm,
                                                        ws.scratch_part<int32_t>(o_colc),
                                                        ws.scratch_part<int32_t>(o_zwm));
    check(cudaGetLastError(), op, "channel constants kernel");
  }
  if (need_rows) {
    const int warps = 8;
    QSIM_LAUNCH(rowsum_kernel, static_cast<unsigned>(ceil_div(br.m * br.groups, warps)), warps * 32, 0, s)(
        br.v, br.m, br.k, br.groups, xu8, ws.scratch_part<int32_t>(o_rows));
    check(cudaGetLastError(), op, "row sums kernel");
  }

  Problem P;
  P.m = br.m;
  P.k = br.k;
  P.xu8 = xu8;
  P.ng = br.ng;
  P.ntot = br.ntot;
  P.colc = ws.scratch_part<int32_t>(o_colc);
  P.zw = need_rows ? ws.scratch_part<int32_t>(o_zwm) : nullptr;
  P.rowsum = need_rows ? ws.scratch_part<int32_t>(o_rows) : nullptr;
  P.psp = br.psp;
  P.y = y;
  P.epi = epi;

  const uintptr_t xa = reinterpret_cast<uintptr_t>(a.x), wa = reinterpret_cast<uintptr_t>(a.w);
  const bool aligned = br.gemm && br.k % 16 == 0 && xa % 16 == 0 && wa % 16 == 0;
  if (aligned) {
    AsyncRows la{static_cast<const uint8_t*>(a.x), br.k, br.m, br.k};
    if (four) {
      NibRows lb{{}, w, ldw, br.ng, br.k, nx};
      launch(op, P, 1, la, lb, s);
    } else {
      AsyncRows lb{w, ldw, br.ng, br.k};
      launch(op, P, 1, la, lb, s);
    }
    return;
  }
  // Conv, unaligned GEMM operands: every launch-grid z slice is one group (loaders offset themselves).
  GatherA la{{}, br.v, br.m, br.k, 0};
  if (four) {
    NibRows lb{{}, w, ldw, br.ng, br.k, nx};
    launch(op, P, br.groups, la, lb, s);
  } else {
    RegRowsS8 lb{{}, w, ldw, br.ng, br.k};
    launch(op, P, br.groups, la, lb, s);
  }
}

inline uint8_t pad_code(const Operand& a) { return static_cast<uint8_t>(a.zx & 0xFF); }

ConvView gemm_view(const Operand& a, int64_t k) {
  ConvView v;
  v.x = static_cast<const uint8_t*>(a.x);
  v.cin = k;
  v.cin_g = k;
  v.pad = pad_code(a);
  return v;
}

ConvView conv_view(const Operand& a, const ConvGeom& g, int64_t cin, int64_t kh, int64_t kw, int64_t groups) {
  ConvView v;
  v.x = static_cast<const uint8_t*>(a.x);
  v.cin = cin;
  v.h = g.h;
  v.w = g.w;
  v.oh = g.oh;
  v.ow = g.ow;
  v.kh = static_cast<int32_t>(kh);
  v.kw = static_cast<int32_t>(kw);
  v.sh = static_cast<int32_t>(g.sh);
  v.sw = static_cast<int32_t>(g.sw);
  v.ph = static_cast<int32_t>(g.ph);
  v.pw = static_cast<int32_t>(g.pw);
  v.dh = static_cast<int32_t>(g.dh);
  v.dw = static_cast<int32_t>(g.dw);
  v.cin_g = groups > 0 ? cin / groups : cin;
  v.pad = pad_code(a);
  return v;
}

Branch gemm_branch(const Operand& a, int64_t m, int64_t n, int64_t k) {
  return Branch{&a, gemm_view(a, k), m, k, 1, n, n, 1, true};
}

Branch conv_branch(const Operand& a, const ConvGeom& g, int64_t cin, int64_t o, int64_t kh, int64_t kw,
                   int64_t groups) {
  const int64_t cg = cin / groups;
  return Branch{&a, conv_view(a, g, cin, kh, kw, groups), g.batch * g.oh * g.ow, cg * kh * kw, groups, o / groups, o,
                g.oh * g.ow, false};
}

// One-branch op: output-stage parameters on the device, then the branch.
void run_single(const char* op, const Branch& br, const int32_t* bias, const OutStage& out, void* y, uintptr_t stream) {
  if (br.m == 0 || br.ntot == 0) return;
  cudaStream_t s = as_stream(stream);
  Workspace ws(op, s);
  const EpiOffsets eo = stage_out(ws, br.ntot, out);
  ws.upload();
  run_branch(op, br, bias, make_epi(ws, eo, out), y, s);
}

// §8: branch 1 to an int32 scratch laid out like y, then branch 2 whose epilogue combines both.
void run_split(const char* op, const Branch& b1, const Branch& b2, const int32_t* bias, const SplitOutStage& out,
               void* y, uintptr_t stream) {
  if (b1.m == 0 || b1.ntot == 0) return;
  cudaStream_t s = as_stream(stream);
  const int64_t n = b1.ntot;
  const size_t ni = static_cast<size_t>(n) * 4;
  Workspace ws(op, s);
  size_t o_m1 = 0, o_m2 = 0, o_sh = 0, o_s1 = 0, o_s2 = 0;
  if (out.type == OutType::F32) {
    o_s1 = ws.add_host(out.scale1, ni);
    o_s2 = ws.add_host(out.scale2, ni);
  } else {
    o_m1 = ws.add_host(out.multiplier1, ni);
    o_m2 = ws.add_host(out.multiplier2, ni);
    o_sh = ws.add_host(out.shift, ni);
  }
  const size_t o_acc = ws.add_scratch(static_cast<size_t>(b1.m) * ni);
  ws.upload();
  int32_t* acc1 = ws.scratch_part<int32_t>(o_acc);

  Epi e1;
  e1.type = static_cast<int>(OutType::I32);
  run_branch(op, b1, bias, e1, acc1, s);

  Epi e2;
  e2.type = static_cast<int>(out.type);
  e2.acc1 = acc1;
  if (out.type == OutType::F32) {
    e2.scale1 = ws.host_part<float>(o_s1);
    e2.scale = ws.host_part<float>(o_s2);
  } else {
    e2.mult1 = ws.host_part<int32_t>(o_m1);
    e2.mult = ws.host_part<int32_t>(o_m2);
    e2.shift = ws.host_part<int32_t>(o_sh);
    e2.zy = out.zero_point;
    e2.lo = out_qmin(out.type);
    e2.hi = out_qmax(out.type);
  }
  std::vector<int32_t> zero_bias(static_cast<size_t>(n), 0);
  run_branch(op, b2, zero_bias.data(), e2, y, s);
}

}  // namespace
}  // namespace detail

void int_gemm(const Operand& a, int64_t m, int64_t n, int64_t k, const int32_t* bias, const OutStage& out, void* y,
              uintptr_t stream) {
  detail::run_single("int_gemm", detail::gemm_branch(a, m, n, k), bias, out, y, stream);
}

void int_conv2d(const Operand& a, const ConvGeom& g, int64_t o, int64_t kh, int64_t kw, int64_t groups,
                const int32_t* bias, const OutStage& out, void* y, uintptr_t stream) {
  detail::run_single("int_conv2d", detail::conv_branch(a, g, g.cin, o, kh, kw, groups), bias, out, y, stream);
}

void split_gemm(const Operand& a, int64_t k1, const Operand& b, int64_t k2, int64_t m, int64_t n, const int32_t* bias,
                const SplitOutStage& out, void* y, uintptr_t stream) {
  detail::run_split("split_gemm", detail::gemm_branch(a, m, n, k1), detail::gemm_branch(b, m, n, k2), bias, out, y,
                    stream);
}

void split_conv2d(const Operand& a, int64_t c1, const Operand& b, int64_t c2, const ConvGeom& g, int64_t o,
                  int64_t kh, int64_t kw, const int32_t* bias, const SplitOutStage& out, void* y, uintptr_t stream) {
  detail::run_split("split_conv2d", detail::conv_branch(a, g, c1, o, kh, kw, 1),
                    detail::conv_branch(b, g, c2, o, kh, kw, 1), bias, out, y, stream);
}

}  // namespace cuda
}  // namespace qsim
