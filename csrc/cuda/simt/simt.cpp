// Host SIMT emulator behind csrc/cuda/simt/cuda_runtime.h (docs/spec.md §13, host SIMT emulation).
//
// A launch runs its blocks one after another on the calling OS thread; the threads of a block are fibers
// (ucontext) switched only at __syncthreads and warp collectives, in a shuffled order that changes per
// launch. Warp collectives complete when the 32nd lane arrives; the last lane computes every lane's result
// from the PTX ISA's fragment definitions below. cp.async copies land at one of the two extremes PTX allows,
// alternating between blocks: at issue (the earliest: a copy into a buffer that other threads may still be
// reading overwrites it under them) or when cp.async.wait_group (or thread exit) requires them (the latest:
// a read not ordered after its wait sees the noise shared memory starts with).
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // macOS declares the ucontext routines only under X/Open
#define _DARWIN_C_SOURCE 1
#endif
#include "cuda_runtime.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

namespace simt {
namespace {

constexpr size_t kRed = 256;              // guard bytes on each side of a device allocation
constexpr uint8_t kRedByte = 0xA5;
constexpr size_t kSmemGuard = 64;         // guard bytes around a block's dynamic shared memory
constexpr int kDefaultSmem = 48 * 1024;   // dynamic shared memory without the opt-in attribute
constexpr int kMaxSmemOptIn = 163 * 1024; // sm_80 per-block opt-in limit
constexpr size_t kStackBytes = 128 * 1024;

std::recursive_mutex g_mu;  // one emulated device: runtime calls and launches are serialized

uint64_t g_noise = 0x9E3779B97F4A7C15ull;
uint8_t noise_byte() {  // xorshift64: uninitialized device and shared memory hold noise, not zeros
  g_noise ^= g_noise << 13;
  g_noise ^= g_noise >> 7;
  g_noise ^= g_noise << 17;
  return static_cast<uint8_t>(g_noise >> 24);
}
void fill_noise(uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) p[i] = noise_byte();
}

// ------------------------------------------------------------------------------------------ device memory
struct Alloc {
  uint8_t* raw;
  size_t bytes;
};
std::map<uintptr_t, Alloc>& allocs() {
  static std::map<uintptr_t, Alloc> m;  // by device address
  return m;
}

const Alloc* find_alloc(const void* p, size_t bytes, uintptr_t* base) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto& m = allocs();
  auto it = m.upper_bound(a);
  if (it == m.begin()) return nullptr;
  --it;
  if (a < it->first || a - it->first > it->second.bytes || bytes > it->second.bytes - (a - it->first)) return nullptr;
  if (base) *base = it->first;
  return &it->second;
}

std::string guard_damage() {  // a write outside an allocation lands in a guard zone
  for (const auto& kv : allocs()) {
    const Alloc& al = kv.second;
    for (size_t i = 0; i < kRed; ++i) {
      if (al.raw[i] != kRedByte || al.raw[kRed + al.bytes + i] != kRedByte) {
        std::ostringstream os;
        os << "a write outside device memory: the guard zone " << (al.raw[i] != kRedByte ? "before" : "after")
           << " the " << al.bytes << "-byte allocation at 0x" << std::hex << kv.first << " was overwritten";
        return os.str();
      }
    }
  }
  return "";
}

// ------------------------------------------------------------------------------------------ error state
thread_local cudaError_t t_last = cudaSuccess;
thread_local std::string t_detail;  // message of the latest emulator-detected error

cudaError_t fail(cudaError_t e, const std::string& why) {
  t_last = e;
  t_detail = why;
  return e;
}

// ------------------------------------------------------------------------------------------ fibers
struct Copy {
  uint8_t* dst;
  const uint8_t* src;
  int bytes;
};
enum class St { Ready, Barrier, Collective, Done };
enum class Coll { None, Shfl, Ldsm, Mma };
const char* coll_name(Coll c) {
  switch (c) {
    case Coll::Shfl: return "__shfl_xor_sync";
    case Coll::Ldsm: return "ldmatrix.x4";
    case Coll::Mma: return "mma.m16n8k32";
    default: return "none";
  }
}

struct Fiber {
  ucontext_t uc;
  ThreadCtx c;
  int warp = 0, lane = 0;
  St st = St::Ready;
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};

struct Warp {
  int size = 0, live = 0, arrived = 0;
  Coll kind = Coll::None;
  uint32_t in[32][10];
  uint32_t out[32][4];
};

struct Run {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<uint8_t> smem;  // [guard][dynamic shared memory][guard]
  size_t smem_bytes = 0;
  int live = 0, at_barrier = 0;
  Fiber* cur = nullptr;
  ucontext_t sched;
  bool early = false;  // cp.async lands at issue (else at the wait that requires it)
  bool failed = false;
  std::string why;
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
};
Run* g_run = nullptr;

std::vector<uint8_t*>& stacks() {
  static std::vector<uint8_t*> s;  // reused across launches; a guard page below each
  return s;
}
uint8_t* stack_for(size_t i) {
  auto& s = stacks();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (s.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, page, PROT_NONE);
    s.push_back(static_cast<uint8_t*>(p) + page);
  }
  return s[i];
}

std::string where(const Fiber& f) {
  std::ostringstream os;
  os << "thread (" << f.c.thread.x << "," << f.c.thread.y << "," << f.c.thread.z << ") of block (" << f.c.block.x
     << "," << f.c.block.y << "," << f.c.block.z << ")";
  return os.str();
}

Run& run() {
  if (!g_run || !g_run->cur) {
    std::fprintf(stderr, "simt: a device function was called outside a kernel launch\n");
    std::abort();
  }
  return *g_run;
}

void yield() {
  Run& r = run();
  swapcontext(&r.cur->uc, &r.sched);
}

void land(const std::vector<Copy>& g) {
  for (const Copy& c : g) {
    if (c.bytes < 0) continue;  // landed at issue
    if (c.bytes) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
    std::memset(c.dst + c.bytes, 0, static_cast<size_t>(16 - c.bytes));
  }
}

void release_barrier(Run& r) {
  for (Fiber& f : r.fibers)
    if (f.st == St::Barrier) f.st = St::Ready;
  r.at_barrier = 0;
}

void finish_thread() {
  Run& r = run();
  Fiber& f = *r.cur;
  while (!f.groups.empty()) {  // outstanding asynchronous copies still complete
    land(f.groups.front());
    f.groups.pop_front();
  }
  land(f.open);
  f.open.clear();
  Warp& w = r.warps[static_cast<size_t>(f.warp)];
  if (w.arrived > 0)
    trap("exited while lanes of its warp wait at " + std::string(coll_name(w.kind)));
  f.st = St::Done;
  --w.live;
  --r.live;
  if (r.at_barrier > 0 && r.at_barrier == r.live) release_barrier(r);
}

void fiber_main() {
  Run& r = run();
  r.body(r.closure);
  finish_thread();
}  // returns to the scheduler through uc_link

// ------------------------------------------------------------------------------------------ warp collectives
uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
int8_t byte_of(uint32_t v, int j) { return static_cast<int8_t>(static_cast<uint8_t>(v >> (8 * j))); }

// PTX ISA, "Matrix fragments for mma.m16n8k32" (.s8): groupID g = lane >> 2, threadID_in_group t = lane % 4.
//   A (16 x 32, row): register i of a lane holds bytes j = 0..3 of row g + 8 (i & 1), column 16 (i >> 1) + 4t + j.
//   B (32 x 8, col):  register i holds bytes j of row (k) 16 i + 4t + j, column (n) g.
//   C/D (16 x 8):     register i holds row g + 8 (i >> 1), column 2t + (i & 1).
// ldmatrix .m8n8.x4 .b16: matrix q takes its 8 row addresses from lanes 8q..8q+7; lane l receives
// 32-bit word (l % 4) of row (l >> 2) of each matrix q in register q.
void complete(Warp& w) {
  switch (w.kind) {
    case Coll::Shfl:
      for (int l = 0; l < 32; ++l) w.out[l][0] = w.in[l ^ static_cast<int>(w.in[l][1] & 31)][0];
      break;
    case Coll::Ldsm:
      for (int l = 0; l < 32; ++l)
        for (int q = 0; q < 4; ++q) {
          const int src = 8 * q + (l >> 2);
          uintptr_t a = (static_cast<uintptr_t>(w.in[src][1]) << 32) | w.in[src][0];
          w.out[l][q] = load32(reinterpret_cast<const uint8_t*>(a) + 4 * (l & 3));
        }
      break;
    case Coll::Mma: {
      int32_t A[16][32], B[32][8];
      uint32_t C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) A[g + 8 * (i & 1)][16 * (i >> 1) + 4 * t + j] = byte_of(w.in[l][i], j);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 4; ++j) B[16 * i + 4 * t + j][g] = byte_of(w.in[l][4 + i], j);
        for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = w.in[l][6 + i];
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
          uint32_t d = C[row][col];
          for (int k = 0; k < 32; ++k) d += static_cast<uint32_t>(A[row][k] * B[k][col]);
          w.out[l][i] = d;
        }
      }
      break;
    }
    default: break;
  }
}

// Deposits this lane's operands, waits for the whole warp, returns this lane's result row.
const uint32_t* collective(Coll kind, const uint32_t* in, int n_in) {
  Run& r = run();
  Fiber& f = *r.cur;
  Warp& w = r.warps[static_cast<size_t>(f.warp)];
  if (w.size != 32 || w.live != 32)
    trap(std::string(coll_name(kind)) + " needs all 32 lanes of the warp, " + std::to_string(w.live) + " are live");
  if (w.arrived == 0)
    w.kind = kind;
  else if (w.kind != kind)
    trap("warp divergence: reached " + std::string(coll_name(kind)) + " while other lanes wait at " +
         coll_name(w.kind));
  std::memcpy(w.in[f.lane], in, sizeof(uint32_t) * static_cast<size_t>(n_in));
  f.st = St::Collective;
  if (++w.arrived == 32) {
    complete(w);
    w.arrived = 0;
    for (int l = 0; l < 32; ++l) r.fibers[static_cast<size_t>(f.warp * 32 + l)].st = St::Ready;
  }
  yield();
  return w.out[f.lane];
}

bool in_smem(const Run& r, const void* p, size_t bytes) {
  const uint8_t* b = r.smem.data() + kSmemGuard;
  const uint8_t* q = static_cast<const uint8_t*>(p);
  return q >= b && q <= b + r.smem_bytes && bytes <= static_cast<size_t>(b + r.smem_bytes - q);
}

std::string hexaddr(const void* p) {
  std::ostringstream os;
  os << p;
  return os.str();
}

std::map<const void*, int>& smem_limits() {
  static std::map<const void*, int> m;
  return m;
}

// A fresh context entering fiber_main on `stack`, returning to `link` (kept out of run_block: getcontext
// returns twice in principle, which would make run_block's locals volatile-sensitive).
__attribute__((noinline)) bool init_context(ucontext_t& uc, uint8_t* stack, ucontext_t* link) {
  if (!stack || getcontext(&uc) != 0) return false;
  uc.uc_stack.ss_sp = stack;
  uc.uc_stack.ss_size = kStackBytes;
  uc.uc_link = link;
  makecontext(&uc, fiber_main, 0);
  return true;
}

std::string run_block(Run& r, dim3 grid, dim3 block, dim3 bidx, uint64_t serial) {
  uint64_t seed = serial * 0x9E3779B97F4A7C15ull;
  const int n = static_cast<int>(block.x * block.y * block.z);
  r.fibers.assign(static_cast<size_t>(n), Fiber{});
  r.warps.assign(static_cast<size_t>((n + 31) / 32), Warp{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[static_cast<size_t>(i)];
    const unsigned u = static_cast<unsigned>(i);
    f.c = ThreadCtx{dim3(u % block.x, (u / block.x) % block.y, u / (block.x * block.y)), bidx, block, grid};
    f.warp = i / 32;
    f.lane = i % 32;
    Warp& w = r.warps[static_cast<size_t>(f.warp)];
    ++w.size;
    ++w.live;
    if (!init_context(f.uc, stack_for(static_cast<size_t>(i)), &r.sched)) return "could not map a fiber stack";
  }
  r.live = n;
  r.at_barrier = 0;
  r.early = serial & 1;
  std::fill(r.smem.begin(), r.smem.end(), kRedByte);
  fill_noise(r.smem.data() + kSmemGuard, r.smem_bytes);

  std::vector<int> order(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  for (int i = n - 1; i > 0; --i) {  // a different interleaving per launch and block
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>((seed >> 33) % static_cast<uint64_t>(i + 1))]);
  }
  for (;;) {
    bool ran = false;
    for (int i : order) {
      Fiber& f = r.fibers[static_cast<size_t>(i)];
      if (f.st != St::Ready) continue;
      ran = true;
      r.cur = &f;
      swapcontext(&r.sched, &f.uc);
      r.cur = nullptr;
      if (r.failed) return r.why;
    }
    if (!ran) break;
  }
  if (r.live > 0) {
    std::ostringstream os;
    os << "deadlock: " << r.live << " threads never finished (" << r.at_barrier << " at __syncthreads";
    for (const Warp& w : r.warps)
      if (w.arrived) os << ", " << w.arrived << " lanes of a warp at " << coll_name(w.kind);
    os << ") in block (" << bidx.x << "," << bidx.y << "," << bidx.z << ")";
    return os.str();
  }
  for (size_t i = 0; i < kSmemGuard; ++i)
    if (r.smem[i] != kRedByte || r.smem[kSmemGuard + r.smem_bytes + i] != kRedByte)
      return "a write outside the block's shared memory in block (" + std::to_string(bidx.x) + "," +
             std::to_string(bidx.y) + "," + std::to_string(bidx.z) + ")";
  return "";
}

}  // namespace

// ------------------------------------------------------------------------------------------ device side
const ThreadCtx& ctx() { return run().cur->c; }

void trap(const std::string& what) {
  Run& r = run();
  r.failed = true;
  r.why = what + " (" + where(*r.cur) + ")";
  swapcontext(&r.cur->uc, &r.sched);  // never resumed
  std::abort();
}

void check_global(const void* p, size_t bytes, const char* what) {
  if (!find_alloc(p, bytes, nullptr))
    trap(std::string(what) + ": " + std::to_string(bytes) + " bytes at " + hexaddr(p) +
         " are not inside a live device allocation");
}

void syncthreads() {
  Run& r = run();
  r.cur->st = St::Barrier;
  if (++r.at_barrier == r.live) release_barrier(r);
  yield();
}

uint32_t shfl_xor(uint32_t mask, uint32_t v, int lane_mask) {
  if (mask != 0xffffffffu) trap("__shfl_xor_sync: only the full-warp mask is emulated");
  const uint32_t in[2] = {v, static_cast<uint32_t>(lane_mask)};
  return collective(Coll::Shfl, in, 2)[0];
}

uint8_t* dynamic_smem() { return run().smem.data() + kSmemGuard; }

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::recursive_mutex> lk(g_mu);
  if (bytes < 0 || bytes > kMaxSmemOptIn)
    return fail(cudaErrorInvalidValue, "dynamic shared memory of " + std::to_string(bytes) +
                                           " bytes exceeds the sm_80 limit of " + std::to_string(kMaxSmemOptIn));
  smem_limits()[kernel] = bytes;
  return cudaSuccess;
}

namespace ptx {
void cp_async16(void* dst, const void* src, int src_bytes) {
  Run& r = run();
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    trap("cp.async 16: misaligned address (shared " + hexaddr(dst) + ", global " + hexaddr(src) + ")");
  if (!in_smem(r, dst, 16)) trap("cp.async: destination " + hexaddr(dst) + " is outside shared memory");
  if (src_bytes < 0 || src_bytes > 16) trap("cp.async: source size " + std::to_string(src_bytes) + " not in 0..16");
  if (src_bytes) check_global(src, static_cast<size_t>(src_bytes), "cp.async source");
  const Copy c{static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), src_bytes};
  if (r.early) {
    land({c});
    r.cur->open.push_back(Copy{c.dst, c.src, -1});  // already landed; keeps the group bookkeeping
  } else {
    r.cur->open.push_back(c);
  }
}

void cp_async_commit() {
  Fiber& f = *run().cur;
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int n) {
  Fiber& f = *run().cur;
  while (f.groups.size() > static_cast<size_t>(n)) {
    land(f.groups.front());
    f.groups.pop_front();
  }
}

void ldmatrix_x4(uint32_t (&out)[4], const void* p) {
  Run& r = run();
  if (reinterpret_cast<uintptr_t>(p) % 16) trap("ldmatrix: row address " + hexaddr(p) + " is not 16-byte aligned");
  if (!in_smem(r, p, 16)) trap("ldmatrix: row address " + hexaddr(p) + " is outside shared memory");
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uint32_t in[2] = {static_cast<uint32_t>(a), static_cast<uint32_t>(a >> 32)};
  const uint32_t* o = collective(Coll::Ldsm, in, 2);
  for (int q = 0; q < 4; ++q) out[q] = o[q];
}

void mma_s8(int32_t (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t in[10] = {a[0], a[1], a[2], a[3], b0, b1};
  for (int i = 0; i < 4; ++i) in[6 + i] = static_cast<uint32_t>(d[i]);
  const uint32_t* o = collective(Coll::Mma, in, 10);
  for (int i = 0; i < 4; ++i) d[i] = static_cast<int32_t>(o[i]);
}
}  // namespace ptx

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* closure) {
  std::lock_guard<std::recursive_mutex> lk(g_mu);
  static uint64_t blocks = 0;  // seeds each block's interleaving and cp.async landing
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return fail(cudaErrorInvalidConfiguration, "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) +
                                                   "," + std::to_string(grid.z) + ") is not a valid launch grid");
  if (threads == 0 || threads > 1024 || block.z > 64)
    return fail(cudaErrorInvalidConfiguration, "block of " + std::to_string(threads) + " threads is not valid");
  auto lim = smem_limits().find(kernel);
  const int limit = lim == smem_limits().end() ? kDefaultSmem : std::max(lim->second, kDefaultSmem);
  const size_t allowed = static_cast<size_t>(limit);
  if (smem > allowed)
    return fail(cudaErrorInvalidValue, std::to_string(smem) + " bytes of dynamic shared memory exceed the " +
                                           std::to_string(allowed) + " bytes allowed for this kernel");
  Run r;
  r.smem_bytes = smem;
  r.smem.resize(smem + 2 * kSmemGuard);
  r.body = body;
  r.closure = closure;
  Run* saved = g_run;
  g_run = &r;
  std::string why;
  for (unsigned z = 0; z < grid.z && why.empty(); ++z)
    for (unsigned y = 0; y < grid.y && why.empty(); ++y)
      for (unsigned x = 0; x < grid.x && why.empty(); ++x)
        why = run_block(r, grid, block, dim3(x, y, z), ++blocks);
  g_run = saved;
  if (why.empty()) why = guard_damage();
  if (!why.empty()) return fail(cudaErrorLaunchFailure, "kernel fault: " + why);
  return cudaSuccess;
}

}  // namespace simt

// ------------------------------------------------------------------------------------------ runtime API
using simt::fail;

namespace {
cudaError_t check_device_range(const void* p, size_t bytes, const char* what) {
  if (bytes == 0 || simt::find_alloc(p, bytes, nullptr)) return cudaSuccess;
  return fail(cudaErrorInvalidValue, std::string(what) + ": " + std::to_string(bytes) + " bytes at " +
                                         simt::hexaddr(p) + " are not inside a device allocation");
}
}  // namespace

cudaError_t cudaMalloc(void** p, size_t bytes) {
  std::lock_guard<std::recursive_mutex> lk(simt::g_mu);
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  if (bytes > (size_t(1) << 40)) return fail(cudaErrorMemoryAllocation, "out of memory");
  uint8_t* raw = static_cast<uint8_t*>(std::malloc(bytes + 2 * simt::kRed));
  if (!raw) return fail(cudaErrorMemoryAllocation, "out of memory");
  std::memset(raw, simt::kRedByte, simt::kRed);
  simt::fill_noise(raw + simt::kRed, bytes);
  std::memset(raw + simt::kRed + bytes, simt::kRedByte, simt::kRed);
  *p = raw + simt::kRed;
  simt::allocs()[reinterpret_cast<uintptr_t>(*p)] = simt::Alloc{raw, bytes};
  return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
  std::lock_guard<std::recursive_mutex> lk(simt::g_mu);
  if (!p) return cudaSuccess;
  auto& m = simt::allocs();
  auto it = m.find(reinterpret_cast<uintptr_t>(p));
  if (it == m.end()) return fail(cudaErrorInvalidValue, "cudaFree of an address that is not an allocation");
  std::free(it->second.raw);
  m.erase(it);
  return cudaSuccess;
}

cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  std::lock_guard<std::recursive_mutex> lk(simt::g_mu);
  if (kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice)
    if (check_device_range(dst, bytes, "cudaMemcpy destination")) return cudaErrorInvalidValue;
  if (kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice)
    if (check_device_range(src, bytes, "cudaMemcpy source")) return cudaErrorInvalidValue;
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaGetLastError() {
  const cudaError_t e = simt::t_last;
  simt::t_last = cudaSuccess;
  return e;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  return simt::t_detail.empty() ? "emulated device error" : simt::t_detail.c_str();
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p) {
  std::lock_guard<std::recursive_mutex> lk(simt::g_mu);
  *attr = cudaPointerAttributes{cudaMemoryTypeUnregistered, -1, nullptr, nullptr};
  if (p && simt::find_alloc(p, 0, nullptr)) {
    attr->type = cudaMemoryTypeDevice;
    attr->device = 0;
    attr->devicePointer = const_cast<void*>(p);
  }
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice, "the emulator has one device, ordinal 0");
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int d) {
  if (d != 0) return fail(cudaErrorInvalidDevice, "the emulator has one device, ordinal 0");
  std::memset(prop->name, 0, sizeof prop->name);
  std::snprintf(prop->name, sizeof prop->name, "pyqsim host SIMT emulator (sm_80 semantics)");
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int d) {
  if (d != 0) return fail(cudaErrorInvalidDevice, "the emulator has one device, ordinal 0");
  *v = attr == cudaDevAttrComputeCapabilityMajor ? 8 : 0;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
