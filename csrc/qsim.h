// pyqsim native kernels: public C++ interface (no Python here).
//
// Every function takes raw pointers, shapes and canonical parameters that the caller (bindings/)
// has validated: C-contiguous buffers, per-channel parameter vectors of the stated length, values in
// the ranges of docs/spec.md. Section numbers (§) refer to docs/spec.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "numerics.h"

namespace qsim {

// ------------------------------------------------------------------------------------------ types
enum class ActType : int { S8 = 0, U8 = 1 };
enum class WFormat : int { S8 = 0, S4 = 1, U4 = 2 };  // S4/U4: packed two per byte along K (§1.1)
enum class OutType : int { I32 = 0, F32 = 1, S8 = 2, U8 = 3, S4 = 4, U4 = 5, I64 = 6 };

inline bool is_requant(OutType t) { return t == OutType::S8 || t == OutType::U8 || t == OutType::S4 || t == OutType::U4; }
inline int32_t out_qmin(OutType t) {
  switch (t) {
    case OutType::S8: return -128;
    case OutType::S4: return -8;
    default: return 0;
  }
}
inline int32_t out_qmax(OutType t) {
  switch (t) {
    case OutType::S8: return 127;
    case OutType::U8: return 255;
    case OutType::S4: return 7;
    case OutType::U4: return 15;
    default: return 0;
  }
}

// Output stage of §6 (one per op). Per-channel vectors have one entry per output channel.
struct OutStage {
  OutType type = OutType::I32;
  const int32_t* multiplier = nullptr;  // requantized outputs
  const int32_t* shift = nullptr;
  int32_t zero_point = 0;
  const float* scale = nullptr;  // float32 output
};

// Split output stage of §8.
struct SplitOutStage {
  OutType type = OutType::S8;  // S8/U8/S4/U4/F32
  const int32_t* multiplier1 = nullptr;
  const int32_t* multiplier2 = nullptr;
  const int32_t* shift = nullptr;
  int32_t zero_point = 0;
  const float* scale1 = nullptr;
  const float* scale2 = nullptr;
};

// ------------------------------------------------------------------------------------------ runtime
// Avx512Vnni: the AVX2 kernels with the integer dot-product micro-kernels on vpdpbusd (spec §10.7).
// Amx: the AVX-512 VNNI kernels with the int8 GEMM on AMX tiles (spec §10.8).
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2, Amx = 3 };

const char* isa_name(Isa isa);
bool avx2_compiled();         // the AVX2 translation unit is part of this build
bool cpu_has_avx2();          // the running CPU (and OS) support AVX2
bool avx512vnni_compiled();   // the AVX-512 VNNI translation unit is part of this build
bool cpu_has_avx512vnni();    // the running CPU (and OS) support AVX-512 F, BW, DQ and VNNI (and AVX2)
bool amx_compiled();          // the AMX translation unit is part of this build
bool cpu_has_amx();           // AVX-512 VNNI, AMX-TILE and AMX-INT8, with the OS's permission for tile data
// The ISA a kernel call uses now: the override set by set_isa_override(), else PYQSIM_CPU_ISA
// (read at every call: "auto" or unset -> best available, "scalar", "avx2", "avx512vnni", "amx"). Throws
// std::invalid_argument for an unknown value and std::runtime_error for an ISA this build or CPU lacks.
Isa resolve_isa();
// "auto", "scalar", "avx2", "avx512vnni", "amx" set an override; "" clears it (environment governs again).
void set_isa_override(const std::string& name);
std::string isa_override();

// Whether some byte of p[0, n) has a bit outside `mask` (a value above mask when mask = 2^b - 1); an OR over words.
bool bytes_exceed(const uint8_t* p, int64_t n, uint8_t mask);

int get_num_threads();
void set_num_threads(int n);  // n >= 1

// ------------------------------------------------------------------------------------------ packed weights
// Weight panels for the GEMM micro-kernels: NR = 16 output channels per panel, K grouped by 4
// ("k-group"). int8 weights: panel[kg][16 channels][4 bytes]. int4/uint4 weights stay 4-bit:
// panel[kg8][16 channels][4 bytes], byte b holding k = 8*kg8 + b (low nibble) and 8*kg8 + 4 + b (high
// nibble), so one AND / one shift produce two int8 k-groups. 4-bit codes are stored unsigned
// (int4 as code + 8, uint4 as is: code_offset); padding channels and k are zero.
constexpr int kNR = 16;
constexpr int kMR = 4;

struct PackedMatrix {
  int64_t n = 0;        // output channels
  int64_t kp = 0;       // packed reduction length: multiple of 4 (int8) or 8 (4-bit), zero padded
  int64_t kg = 0;       // kp / 4 k-groups
  int64_t panels = 0;   // ceil(n / 16)
  int64_t panel_bytes = 0;
  WFormat format = WFormat::S8;
  bool has_min = false;           // an int8 weight equals -128 (§10.2)
  // §10.2: int8 weights equal to -128 are packed as -127; fix_k[f] (the k index) and fix_c[f] (the channel within
  // the panel) list them, panel p's entries being f in [fix_off[p], fix_off[p + 1]).
  std::vector<int64_t> fix_off;
  std::vector<int64_t> fix_k;
  std::vector<int32_t> fix_c;
  int32_t code_offset = 0;        // weight = stored code - code_offset (8 for int4, else 0)
  std::vector<int32_t> colsum;    // sum_k w[n, k] (codes, before zero points), padded to panels*16
  std::shared_ptr<uint8_t> buf;   // panels * panel_bytes, 64-byte aligned
  // With has_min on a CPU with AVX-512 VNNI: the same panels holding the true codes (-128 included), which the
  // VNNI kernels take without the fix list (§10.7); null otherwise.
  std::shared_ptr<uint8_t> buf_exact;
  // On a CPU with AMX (GEMM weights only): every panel as TDPBUSD's B tiles, the true int8 codes (or the 4-bit
  // stored codes) with the k-groups zero padded to kg_amx (a multiple of 16; int8 panels with kg_amx == kg share the
  // true-code buffer); null otherwise.
  std::shared_ptr<uint8_t> buf_amx;
  int64_t kg_amx = 0;
  const uint8_t* panel(int64_t p) const { return buf.get() + p * panel_bytes; }
  const uint8_t* panel_exact(int64_t p) const { return buf_exact.get() + p * panel_bytes; }
};

// Packs `codes` ([n, kp] int8 row-major codes in the k order the activations will use; kp a multiple
// of 4, or of 8 for 4-bit formats; padding entries 0; 4-bit formats take stored codes 0..15) into
// micro-kernel panels.
PackedMatrix pack_codes(const int8_t* codes, int64_t n, int64_t kp, WFormat fmt);
// Packs n rows of k int8 codes read as bytes (row c at src + c * ld, each byte XORed with xor_mask: 0x80 turns
// uint8 codes u into the int8 codes u - 128), zero padded to a multiple of 4; the same panels as pack_codes.
// true_only: the panels keep the true codes (-128 included) and serve as buf_exact, with no §10.2 fix list: for a
// call that runs a kernel set with s8_u only, `isa` (whose 16-row packer, where it has one, then packs them).
PackedMatrix pack_s8_rows(const uint8_t* src, int64_t ld, int64_t n, int64_t k, uint8_t xor_mask, bool true_only,
                          Isa isa);
// Adds PackedMatrix::buf_amx when the CPU has AMX (no-op otherwise).
void add_amx_panels(PackedMatrix& pm);

// A prepacked GEMM or conv weight: one PackedMatrix per group.
struct PackedWeight {
  enum Kind { Gemm = 0, Conv = 1 } kind = Gemm;
  WFormat format = WFormat::S8;
  int64_t n = 0, k = 0;            // GEMM: [N, K]; conv: O, C/g*KH*KW
  int64_t cin_g = 0, kh = 1, kw = 1, groups = 1;
  std::vector<PackedMatrix> mats;  // groups entries
};

std::shared_ptr<PackedWeight> pack_gemm_weight(const void* w, WFormat fmt, int64_t n, int64_t k);
std::shared_ptr<PackedWeight> pack_conv_weight(const void* w, WFormat fmt, int64_t o, int64_t cin_g, int64_t kh,
                                               int64_t kw, int64_t groups);

// ------------------------------------------------------------------------------------------ layout (§15.10)
// dst[o] = src[0][o] ++ src[1][o] ++ ...: input k's block of outer index o is inner[k] bytes at src[k] + o * inner[k].
void concat_bytes(const uint8_t* const* src, const int64_t* inner, int64_t inputs, int64_t outer, uint8_t* dst);
// y[p, i, j] = x[p, rows[i], cols[j]] for planes p of [h, w] items of `item` bytes (indices in range: checked by the
// caller).
void resample_bytes(const uint8_t* x, int64_t planes, int64_t h, int64_t w, int64_t item, const int64_t* rows,
                    int64_t oh, const int64_t* cols, int64_t ow, uint8_t* y);

// ------------------------------------------------------------------------------------------ memory
// Large blocks kept after they are freed and handed out again (csrc/arena.cpp); thread-safe.
struct ArenaStats {
  size_t in_use = 0, cached = 0, peak = 0;  // bytes (capacities)
  uint64_t hits = 0, misses = 0;            // allocations served from the cache / from the C library
};
void* arena_alloc(size_t bytes);        // 64-byte aligned; nullptr when out of memory
size_t arena_capacity(const void* p);   // capacity of a block arena_alloc handed out, 0 for any other pointer
bool arena_free(void* p);               // false (nothing done) when p is not a block arena_alloc handed out
void arena_release();                   // frees every cached block
ArenaStats arena_stats();

// ------------------------------------------------------------------------------------------ ops
// §4/§6: y[M, N] = stage(bias + (x - zx) @ (w - zw).T). x: [M, K] row-major. zw, bias: [N].
// y: [M, N] row-major of the stage's type.
void int_gemm(const void* x, ActType xt, int64_t m, int32_t zx, const PackedWeight& w, const int32_t* zw,
              const int32_t* bias, const OutStage& out, void* y);

// A batch of row-major matrices of 1-byte codes: matrix i at base + off[i], rows ld bytes apart.
struct RowBatch {
  const uint8_t* base = nullptr;
  const int64_t* off = nullptr;
  int64_t ld = 0;
  const uint8_t* at(int64_t i) const { return base + off[i]; }
};

// dst[i] = the transpose of src matrix i, [cols, rows] (rows contiguous, ld apart) -> [rows, cols] C-contiguous,
// dst[i] at dst + i * rows * cols: a batched operand given with contiguous columns (a transposed view).
void transpose_batches(const RowBatch& src, int64_t batch, int64_t rows, int64_t cols, uint8_t* dst);

// The output of a batched op: batch element i's rows at base + off[i] (bytes), rows ld elements apart.
struct OutRows {
  void* base = nullptr;
  const int64_t* off = nullptr;
  int64_t ld = 0;
  void* at(int64_t i) const { return static_cast<char*>(base) + off[i]; }
};

// §4.3: batched matmul of activations, a [B, M, K] x b [B, N, K] (each uint8 or int8 with a zero point) ->
// y [B, M, N] of the stage's type; the §4.1 bound holds for the types and zero points.
void int_bmm(const RowBatch& a, ActType at, int32_t za, const RowBatch& b, ActType bt, int32_t zb, int64_t batch,
             int64_t m, int64_t n, int64_t k, const OutStage& out, void* y);

// §8: split GEMM, x1 [M, K1], x2 [M, K2], shared N.
void split_gemm(const void* x1, ActType xt1, int32_t zx1, const PackedWeight& w1, const int32_t* zw1,
                const void* x2, ActType xt2, int32_t zx2, const PackedWeight& w2, const int32_t* zw2,
                int64_t m, const int32_t* bias, const SplitOutStage& out, void* y);

struct ConvGeom {
  int64_t batch = 0, cin = 0, h = 0, w = 0;  // input [B, C, H, W]
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t oh = 0, ow = 0;
};

// §5/§6: NCHW conv2d; y: [B, O, OH, OW].
void int_conv2d(const void* x, ActType xt, int32_t zx, const ConvGeom& g, const PackedWeight& w, const int32_t* zw,
                const int32_t* bias, const OutStage& out, void* y);

// §8: split conv2d (groups = 1), x1 [B, C1, H, W], x2 [B, C2, H, W].
void split_conv2d(const void* x1, ActType xt1, int32_t zx1, int64_t c1, const PackedWeight& w1, const int32_t* zw1,
                  const void* x2, ActType xt2, int32_t zx2, int64_t c2, const PackedWeight& w2, const int32_t* zw2,
                  const ConvGeom& g, const int32_t* bias, const SplitOutStage& out, void* y);

// §6: acc [outer, N, inner] int32 -> y of the stage's requantized type, channel axis N.
void requantize(const int32_t* acc, int64_t outer, int64_t n, int64_t inner, const OutStage& out, void* y);

// §14: acc [outer, N, inner] int32 -> y requantized under a runtime profile `p` (not Pyqsim): fixed-point
// profiles read out.multiplier/out.shift (shift in [1, 62]), float profiles out.scale.
void requantize_profile(const int32_t* acc, int64_t outer, int64_t n, int64_t inner, Numerics p, const OutStage& out,
                        void* y);

// §7: codes [B, M, L] uint8 (C-contiguous), v [B, L, N]; y [B, M, N] (rows of the output laid out by OutRows) of
// type int64, float32 or requantized (B = the product of the leading dimensions). Returns false when some code is
// above 2^bits - 1; y is then partly written.
bool log2_attn_matmul(const uint8_t* codes, const RowBatch& v, ActType vt, int64_t batch, int64_t m, int64_t l,
                      int64_t n, int32_t zv, int bits, int k, int frac_bits, const OutStage& out, const OutRows& y);

// ------------------------------------------------------------------------------------------ float stages (§15)
// float32 in, float32 out, C-contiguous; results do not depend on the ISA or the thread count.
enum class UnaryOp : int { GeluErf = 0, GeluTanh = 1, Silu = 2 };

// §15.9: the codes of a stage's float32 result instead of the floats: §2 uniform codes (scale, zero point, clamp
// bounds lo..hi) or §3 log codes (delta, k = 1 or 2, zero_code). Where null, the drivers below write floats.
struct CodesOut {
  bool log = false;
  float scale = 1.0f;
  int32_t zero_point = 0, lo = 0, hi = 255;
  float delta = 1.0f;
  int k = 2, zero_code = 15;
};

// §15.5: softmax of each of `rows` rows of length n; y: float32, or uint8 codes with `codes`. With codes, false when
// the codes are undefined for some result (§2: not finite; §3: not finite and >= 0).
bool softmax(const float* x, void* y, int64_t rows, int64_t n, const CodesOut* codes = nullptr);
// §15.6: LayerNorm of each row of length n; w, b: [n].
bool layer_norm(const float* x, void* y, int64_t rows, int64_t n, const float* w, const float* b, float eps,
                const CodesOut* codes = nullptr);
// §15.6: GroupNorm of x [batch, c, spatial] with `groups` groups (dividing c); w, b: [c].
bool group_norm(const float* x, void* y, int64_t batch, int64_t c, int64_t spatial, int64_t groups, const float* w,
                const float* b, float eps, const CodesOut* codes = nullptr);
// §15.4: elementwise GELU (erf or tanh form) or SiLU of n values.
bool unary(UnaryOp op, const float* x, void* y, int64_t n, const CodesOut* codes = nullptr);
// §15.8: y[i] = a[i] + b[(i / inner) % m] for i < n (n a multiple of m * inner; m, inner >= 1)
void add(const float* a, const float* b, float* y, int64_t n, int64_t m, int64_t inner);
// §2: codes of x [outer, n, inner] (x[o, c, i] at x + o * ldo + c * inner + i, ldo >= n * inner) with scale[n]
// (> 0, finite) and zero point z[n] in [lo, hi]. out: contiguous int8/uint8 container bytes. Returns false when
// some x is not finite (out is then meaningless).
bool quantize(const float* x, int64_t outer, int64_t ldo, int64_t n, int64_t inner, const float* scale,
              const int32_t* z, int32_t lo, int32_t hi, uint8_t* out);
// §3: log2 (k = 1) or log-sqrt2 (k = 2) codes of n values p, zero code `zero_code` = 2^bits - 1. Returns false
// when some p is not finite and >= 0 (out is then meaningless).
bool quantize_log(const float* p, int64_t n, float delta, int k, int zero_code, uint8_t* out);

// ------------------------------------------------------------------------------------------ info
struct CudaInfo {
  bool compiled = false;
  int runtime_version = 0;
  int driver_version = 0;
  int device_count = 0;
  std::string error;
  std::string archs;
};
CudaInfo cuda_info();
// Launches a tiny kernel on device 0 and checks its result; empty string on success.
std::string cuda_selftest();

// Register-only int8 multiply-add throughput (vpmaddubsw + vpmaddwd + vpaddd units, and raw
// vpmaddubsw) for the benchmark's peak line; returns {raw_gops, unit_gops} on one thread.
std::vector<double> avx2_peak_gops(int64_t iterations);

}  // namespace qsim
