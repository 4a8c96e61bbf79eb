// A caching allocator for large blocks: a whole-program run allocates the same large arrays on every run, and
// memory the C library returns to the system comes back as fresh pages, each paid with a page fault on first
// write. Freed blocks are kept here, up to four times the peak in use, and handed out again.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

#include "qsim.h"

namespace qsim {
namespace {

constexpr size_t kGrain = size_t(1) << 16;  // block capacities are multiples of 64 KiB
constexpr size_t kAlign = 64;

struct Arena {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;  // block handed out -> its capacity
  std::multimap<size_t, void*> cached;     // capacity -> free block
  ArenaStats st;
};

Arena& arena() {
  static Arena* a = new Arena;  // never destroyed: arrays may be freed during interpreter shutdown
  return *a;
}

}  // namespace

void* arena_alloc(size_t bytes) {
  if (bytes > SIZE_MAX - kGrain) return nullptr;
  const size_t cap = (bytes + kGrain - 1) / kGrain * kGrain;
  Arena& a = arena();
  {
    std::lock_guard<std::mutex> lock(a.mu);
    auto it = a.cached.lower_bound(cap);
    if (it != a.cached.end() && it->first <= cap + cap / 8) {  // a block at most 1/8 larger
      void* p = it->second;
      const size_t got = it->first;
      a.cached.erase(it);
      a.st.cached -= got;
      a.live.emplace(p, got);
      a.st.in_use += got;
      a.st.peak = std::max(a.st.peak, a.st.in_use);
      ++a.st.hits;
      return p;
    }
  }
  void* p = std::aligned_alloc(kAlign, cap);
  if (p == nullptr) return nullptr;
  std::lock_guard<std::mutex> lock(a.mu);
  a.live.emplace(p, cap);
  a.st.in_use += cap;
  a.st.peak = std::max(a.st.peak, a.st.in_use);
  ++a.st.misses;
  return p;
}

size_t arena_capacity(const void* p) {
  Arena& a = arena();
  std::lock_guard<std::mutex> lock(a.mu);
  auto it = a.live.find(const_cast<void*>(p));
  return it == a.live.end() ? 0 : it->second;
}

bool arena_free(void* p) {
  Arena& a = arena();
  size_t cap = 0;
  {
    std::lock_guard<std::mutex> lock(a.mu);
    auto it = a.live.find(p);
    if (it == a.live.end()) return false;
    cap = it->second;
    a.live.erase(it);
    a.st.in_use -= cap;
    if (a.st.cached + cap <= 4 * a.st.peak) {  // at most 4x the peak in use: blocks of every size a run needs
      a.cached.emplace(cap, p);
      a.st.cached += cap;
      return true;
    }
  }
  std::free(p);
  return true;
}

void arena_release() {
  Arena& a = arena();
  std::multimap<size_t, void*> drop;
  {
    std::lock_guard<std::mutex> lock(a.mu);
    drop.swap(a.cached);
    a.st.cached = 0;
    a.st.peak = a.st.in_use;
  }
  for (auto& kv : drop) std::free(kv.second);
}

ArenaStats arena_stats() {
  Arena& a = arena();
  std::lock_guard<std::mutex> lock(a.mu);
  return a.st;
}

}  // namespace qsim
