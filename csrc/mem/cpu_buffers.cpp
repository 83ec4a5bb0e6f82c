// Large CPU buffers: huge-page-backed blocks and their cache (see cpu_buffers.h for why).
//
// allocate(n): round n up to 2 MiB; take the smallest cached block that fits without wasting more
// than a quarter of it, else a new 2 MiB-aligned block (on failure: release the cache, try once
// more, then OutOfMemoryError). Freeing a tensor returns its block to the cache, and the oldest
// cached blocks go back to the system while the cache holds more than the limit. One mutex guards
// the tables; it is held for table updates only, never across a system call that touches memory.
#include "mem/cpu_buffers.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace fastreg::cpu_buffers {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr int64_t kDefaultLimitMb = 1024;

#if defined(__unix__) || defined(__APPLE__)
constexpr bool kSupported = true;
#else
constexpr bool kSupported = false;  // no aligned_alloc/free pairing: plain at::empty
#endif

int64_t limit_from_env() {
  const char* s = std::getenv("FASTREG_CPU_CACHE_MB");
  if (s == nullptr || *s == '\0') return kDefaultLimitMb << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(s, &end, 10);
  TORCH_CHECK_VALUE(end != s && *end == '\0' && mb >= 0,
                    "FASTREG_CPU_CACHE_MB must be a non-negative integer (MiB), got '", s, "'");
  return static_cast<int64_t>(mb) << 20;
}

class Pool {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_locked();  // reads (and checks) FASTREG_CPU_CACHE_MB here, where an exception may go
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second >= bytes && it->second - bytes <= it->second / 4 &&
            (best == free_.end() || it->second < best->second))
          best = it;
      if (best != free_.end()) {
        void* p = best->first;
        live_[p] = best->second;
        live_bytes_ += best->second;
        cached_bytes_ -= best->second;
        free_.erase(best);
        ++hits_;
        return p;
      }
      ++misses_;
    }
    void* p = system_alloc(bytes);
    if (p == nullptr) {
      release();
      p = system_alloc(bytes);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "fastreg: out of CPU memory allocating ", bytes, " bytes");
    std::lock_guard<std::mutex> lock(mu_);
    live_[p] = bytes;
    live_bytes_ += bytes;
    return p;
  }

  void give(void* p) {
    std::deque<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = live_.find(p);
      TORCH_INTERNAL_ASSERT(it != live_.end(), "fastreg: a CPU buffer freed twice or not ours");
      const size_t bytes = it->second;
      live_.erase(it);
      live_bytes_ -= bytes;
      free_.emplace_back(p, bytes);
      cached_bytes_ += bytes;
      while (cached_bytes_ > static_cast<size_t>(limit()) && !free_.empty()) {
        evicted.push_back(free_.front().first);
        cached_bytes_ -= free_.front().second;
        free_.pop_front();
      }
    }
    for (void* q : evicted) std::free(q);
  }

  void release() {
    std::deque<std::pair<void*, size_t>> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(free_);
      cached_bytes_ = 0;
    }
    for (auto& b : all) std::free(b.first);
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK_VALUE(bytes >= 0, "fastreg: the CPU buffer cache limit must be >= 0 bytes, got ", bytes);
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
    }
    if (cached_bytes() > static_cast<size_t>(bytes)) release();
  }

  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

  Info info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_bytes_), limit_locked(), static_cast<int64_t>(live_bytes_), hits_, misses_};
  }

 private:
  static void* system_alloc(size_t bytes) {
    void* p = std::aligned_alloc(kHugePage, bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (p != nullptr) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP, small pages
#endif
    return p;
  }
  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_bytes_;
  }
  int64_t limit() { return limit_locked(); }
  int64_t limit_locked() {
    if (limit_ < 0) limit_ = limit_from_env();
    return limit_;
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> live_;
  std::deque<std::pair<void*, size_t>> free_;  // oldest first
  size_t cached_bytes_ = 0, live_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  int64_t limit_ = -1;  // -1: not read from the environment yet
};

Pool& pool() {
  // never destroyed: tensors may be freed during interpreter exit
  static Pool* p = [] {
    auto* created = new Pool();
#if defined(__unix__) || defined(__APPLE__)
    // a fork (DataLoader workers) while another thread holds the lock must not leave the child's
    // copy locked forever: hold it across fork() and release it on both sides
    pthread_atfork([] { pool().lock(); }, [] { pool().unlock(); }, [] { pool().unlock(); });
#endif
    return created;
  }();
  return *p;
}

void give_back(void* p) { pool().give(p); }

class BufferAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &give_back, c10::Device(c10::DeviceType::CPU)};
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* p = pool().take(bytes);
    return {p, p, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

BufferAllocator& allocator() {
  static BufferAllocator a;
  return a;
}

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (!kSupported || options.device().type() != c10::DeviceType::CPU || bytes < static_cast<int64_t>(kHugePage) ||
      options.layout() != c10::kStrided || options.pinned_memory())
    return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) { return empty(sizes, options).zero_(); }

Info info() { return pool().info(); }
void release() { pool().release(); }
void set_limit(int64_t bytes) { pool().set_limit(bytes); }

}  // namespace fastreg::cpu_buffers
