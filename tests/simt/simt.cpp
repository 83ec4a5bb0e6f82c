// The scheduler of the CPU SIMT runtime (model and guarantees: simt.h).
//
// launch() walks the grid cluster by cluster. The K blocks of a cluster each get an OS thread
// (their __shared__ variables are thread_local); a baton lets exactly one of them run at a time,
// and passes at cluster barriers in the schedule's order. Inside a block, every CUDA thread is a
// fiber; run_block() resumes fibers one at a time and completes barriers and warp collectives
// when their last participant arrives.
#include "simt.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

namespace simt {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per CUDA thread (kernel arguments of up to 32 KiB by value)

enum class State { kRunnable, kAtWarp, kAtBlock, kAtCluster, kDone };

struct Block;

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // taken from the OS thread's pool when the fiber first runs
  bool started = false;
  uint3 tid;
  int linear = 0;
  State state = State::kRunnable;
  // the pending warp collective
  CollectiveKind kind = CollectiveKind::kSync;
  unsigned mask = 0;
  uint64_t payload = 0;
  int src_lane = 0;
  uint64_t result = 0;
  Block* block = nullptr;
};

struct Cluster;

struct Block {
  uint3 idx;
  dim3 dim;
  dim3 grid;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Schedule schedule = Schedule::kForward;
  std::mt19937_64 rng;
  std::vector<int> priority;            // order in which runnable fibers are picked
  std::set<std::pair<int, int>> ready;  // (priority, fiber)
  int at_block = 0, at_cluster = 0, done = 0;
  void* smem = nullptr;
  size_t smem_bytes = 0;
  Cluster* cluster = nullptr;
  unsigned rank = 0;
  std::string error;  // set by trap()
  const std::function<void()>* body = nullptr;
};

// Fiber stacks of this OS thread, reused across fibers, blocks and launches: a fiber takes one
// when it first runs and gives it back when it exits, so a kernel without barriers runs every
// thread of a block on one warm stack.
struct StackPool {
  std::vector<char*> free;
  ~StackPool() {
    for (char* s : free) munmap(s, kStackBytes);
  }
  char* take() {
    if (!free.empty()) {
      char* s = free.back();
      free.pop_back();
      return s;
    }
    void* s = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) {
      fprintf(stderr, "simt: cannot map a fiber stack\n");
      abort();
    }
    return static_cast<char*>(s);
  }
  void give(char* s) {
    if (s != nullptr) free.push_back(s);
  }
};
thread_local StackPool tls_stacks;

thread_local Fiber* tls_fiber = nullptr;
thread_local Block* tls_block = nullptr;
// An anchor in this module's TLS block: a __shared__ (thread_local) variable of the kernels lives
// at a fixed offset from it in every OS thread, which is how map_shared_rank finds another block's copy.
thread_local char tls_anchor = 0;

struct Cluster {
  std::mutex mu;
  std::condition_variable cv;
  unsigned size = 1;
  std::vector<Block*> blocks;
  std::vector<char*> anchors;
  std::vector<int> order;    // baton order of the ranks
  int turn = -1;             // rank allowed to run
  std::vector<int> waiting;  // per rank: at the cluster barrier
  std::vector<int> finished;
  std::string error;
};

Fiber& current() {
  if (tls_fiber == nullptr) {
    fprintf(stderr, "simt: a device function was called outside a kernel launch\n");
    abort();
  }
  return *tls_fiber;
}

std::string describe(const Fiber& f) {
  std::ostringstream os;
  os << "thread (" << f.tid.x << "," << f.tid.y << "," << f.tid.z << ") of block (" << f.block->idx.x << ","
     << f.block->idx.y << "," << f.block->idx.z << ")";
  return os.str();
}

const char* state_name(State s) {
  switch (s) {
    case State::kRunnable:
      return "runnable";
    case State::kAtWarp:
      return "at a warp collective";
    case State::kAtBlock:
      return "at __syncthreads()";
    case State::kAtCluster:
      return "at cluster.sync()";
    case State::kDone:
      return "exited";
  }
  return "?";
}

void yield_to_scheduler(State s) {
  Fiber& f = current();
  f.state = s;
  swapcontext(&f.ctx, &f.block->sched);
}

void fiber_entry() {
  Fiber& f = *tls_fiber;
  (*f.block->body)();
  f.state = State::kDone;
  setcontext(&f.block->sched);  // never returns
}

void make_ready(Block& b, int i) {
  b.fibers[i].state = State::kRunnable;
  b.ready.emplace(b.priority[i], i);
}

void reorder(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  if (b.schedule == Schedule::kShuffle) {
    std::vector<int> perm(n);
    for (int i = 0; i < n; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), b.rng);
    b.priority = perm;
  } else {
    for (int i = 0; i < n; ++i) b.priority[i] = b.schedule == Schedule::kForward ? i : n - 1 - i;
  }
}

// A warp collective arrived at by fiber i: completes it if every lane of its mask is there.
void try_complete_warp(Block& b, int i) {
  const Fiber& f = b.fibers[i];
  const int n = static_cast<int>(b.fibers.size());
  const int warp0 = (i / 32) * 32;
  const unsigned mask = f.mask;
  const int lane = i - warp0;
  if (!(mask & (1u << lane))) {
    throw Error("simt: " + describe(f) + " calls a warp collective whose mask does not contain its own lane");
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask & (1u << l))) continue;
    if (warp0 + l >= n) throw Error("simt: warp collective mask names lane " + std::to_string(l) +
                                    ", which does not exist in this block (" + describe(f) + ")");
    const Fiber& o = b.fibers[warp0 + l];
    if (o.state == State::kDone) {
      throw Error("simt: warp collective of " + describe(f) + " waits for lane " + std::to_string(l) +
                  ", which has exited");
    }
    if (o.state != State::kAtWarp) return;  // not there yet
    if (o.mask != mask || o.kind != f.kind) {
      throw Error("simt: lanes of one warp meet at different warp collectives (" + describe(f) + " and " +
                  describe(o) + ")");
    }
  }
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if ((mask & (1u << l)) && b.fibers[warp0 + l].payload) ballot |= 1ull << l;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask & (1u << l))) continue;
    Fiber& o = b.fibers[warp0 + l];
    switch (o.kind) {
      case CollectiveKind::kShuffle: {
        const int src = o.src_lane;
        if (src < 0 || src >= 32 || !(mask & (1u << src))) {
          throw Error("simt: " + describe(o) + " shuffles from lane " + std::to_string(src) +
                      ", outside the mask of the shuffle");
        }
        o.result = b.fibers[warp0 + src].payload;
        break;
      }
      case CollectiveKind::kBallot:
        o.result = ballot;
        break;
      case CollectiveKind::kSync:
        o.result = 0;
        break;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (mask & (1u << l)) make_ready(b, warp0 + l);
  }
}

std::string stuck_report(const Block& b, const char* what) {
  std::ostringstream os;
  os << "simt: " << what << " in block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z << "):";
  std::map<State, std::vector<int>> by_state;
  for (const Fiber& f : b.fibers) by_state[f.state].push_back(f.linear);
  for (const auto& [s, ids] : by_state) {
    os << " " << ids.size() << " thread(s) " << state_name(s) << " (e.g. thread " << ids.front();
    if (ids.size() > 1) os << ", ..., " << ids.back();
    os << ");";
  }
  return os.str();
}

// Runs the block's fibers until all have exited or all wait at the cluster barrier. Returns true
// when the block finished. Throws Error on a barrier that cannot complete.
bool run_block_until_cluster_barrier(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  while (true) {
    if (b.ready.empty()) {
      if (b.done == n) return true;
      if (b.at_cluster > 0 && b.at_cluster + b.done == n) {
        if (b.done > 0) throw Error(stuck_report(b, "cluster.sync() is not reached by every thread"));
        return false;
      }
      if (b.at_block > 0 && b.at_block + b.done == n) {
        throw Error(stuck_report(b, "__syncthreads() is not reached by every thread (some exited)"));
      }
      throw Error(stuck_report(b, "a barrier can never complete"));
    }
    const auto it = b.ready.begin();
    const int i = it->second;
    b.ready.erase(it);
    Fiber& f = b.fibers[i];
    if (!f.started) {
      f.started = true;
      f.stack = tls_stacks.take();
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    tls_fiber = &f;
    swapcontext(&b.sched, &f.ctx);
    tls_fiber = nullptr;
    if (!b.error.empty()) throw Error(b.error);
    switch (f.state) {
      case State::kDone:
        ++b.done;
        tls_stacks.give(f.stack);
        f.stack = nullptr;
        break;
      case State::kAtWarp:
        try_complete_warp(b, i);
        break;
      case State::kAtBlock:
        if (++b.at_block == n) {
          b.at_block = 0;
          reorder(b);
          for (int j = 0; j < n; ++j) make_ready(b, j);
        }
        break;
      case State::kAtCluster:
        ++b.at_cluster;
        break;
      case State::kRunnable:
        throw Error("simt: internal error: a fiber yielded while runnable");
    }
  }
}

void release_cluster_barrier(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  b.at_cluster = 0;
  reorder(b);
  for (int j = 0; j < n; ++j) make_ready(b, j);
}

std::vector<int> rank_order(Schedule s, unsigned k, std::mt19937_64& rng) {
  std::vector<int> order(k);
  for (unsigned i = 0; i < k; ++i) order[i] = static_cast<int>(i);
  if (s == Schedule::kReverse) std::reverse(order.begin(), order.end());
  if (s == Schedule::kShuffle) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

// One block on the calling OS thread, taking turns with the other blocks of its cluster.
void run_block(Block& b) {
  tls_block = &b;
  const int n = static_cast<int>(b.fibers.size());
  reorder(b);
  for (int i = 0; i < n; ++i) make_ready(b, i);

  Cluster& c = *b.cluster;
  std::string error;
  std::unique_lock<std::mutex> lock(c.mu);
  while (true) {
    c.cv.wait(lock, [&] { return c.turn == static_cast<int>(b.rank) || !c.error.empty(); });
    if (!c.error.empty()) break;
    bool finished = false;
    lock.unlock();
    try {
      finished = run_block_until_cluster_barrier(b);
    } catch (const Error& e) {
      error = e.what();
    }
    lock.lock();
    if (!error.empty()) {
      c.error = error;
      c.cv.notify_all();
      break;
    }
    if (finished) {
      c.finished[b.rank] = 1;
    } else {
      c.waiting[b.rank] = 1;
    }
    // pass the baton: the next rank (in order) that can still run
    int next = -1;
    for (int r : c.order) {
      if (!c.finished[r] && !c.waiting[r]) {
        next = r;
        break;
      }
    }
    if (next < 0) {
      bool any_waiting = false, any_finished = false;
      for (unsigned r = 0; r < c.size; ++r) {
        any_waiting = any_waiting || c.waiting[r];
        any_finished = any_finished || c.finished[r];
      }
      if (any_waiting && any_finished) {
        c.error = "simt: cluster.sync() is not reached by every block of the cluster (some exited)";
        c.cv.notify_all();
        break;
      }
      if (any_waiting) {  // every block is at the cluster barrier: release it
        for (unsigned r = 0; r < c.size; ++r) {
          c.waiting[r] = 0;
          release_cluster_barrier(*c.blocks[r]);
        }
        next = c.order.front();
      } else {  // all finished
        c.turn = -2;
        c.cv.notify_all();
        break;
      }
    }
    c.turn = next;
    c.cv.notify_all();
    if (finished) break;
  }
  lock.unlock();
  for (Fiber& f : b.fibers) {  // fibers abandoned by an error
    tls_stacks.give(f.stack);
    f.stack = nullptr;
  }
  tls_block = nullptr;
}

// ---- guarded buffers -------------------------------------------------------------------------------
constexpr unsigned char kCanary = 0xA5;

struct Guarded {
  char* map;          // whole mapping
  size_t map_bytes;
  char* data;
  size_t bytes;
  char* lo;           // canary region [lo, data) and [data + bytes, hi)
  char* hi;
  std::string name;
};

std::mutex guard_mu;
std::map<uintptr_t, Guarded>& guards() {
  static std::map<uintptr_t, Guarded> g;
  return g;
}

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

std::string guard_damage(const Guarded& g) {
  for (char* p = g.lo; p < g.data; ++p) {
    if (static_cast<unsigned char>(*p) != kCanary) {
      return "simt: out-of-bounds write " + std::to_string(g.data - p) + " byte(s) before the start of buffer '" +
             g.name + "'";
    }
  }
  for (char* p = g.data + g.bytes; p < g.hi; ++p) {
    if (static_cast<unsigned char>(*p) != kCanary) {
      return "simt: out-of-bounds write " + std::to_string(p - (g.data + g.bytes)) +
             " byte(s) past the end of buffer '" + g.name + "'";
    }
  }
  return "";
}

void segv_handler(int sig, siginfo_t* info, void*) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  char msg[512];
  int len = snprintf(msg, sizeof msg, "simt: invalid memory access at %p (SIGSEGV)", info->si_addr);
  for (const auto& [key, g] : guards()) {  // best effort: no locking in a signal handler
    const uintptr_t lo = reinterpret_cast<uintptr_t>(g.map);
    const uintptr_t hi = lo + g.map_bytes;
    if (addr >= lo && addr < hi) {
      const intptr_t past = static_cast<intptr_t>(addr) - static_cast<intptr_t>(reinterpret_cast<uintptr_t>(g.data + g.bytes));
      if (past >= 0) {
        len = snprintf(msg, sizeof msg, "simt: out-of-bounds access %ld byte(s) past the end of buffer '%s'",
                       static_cast<long>(past), g.name.c_str());
      } else {
        len = snprintf(msg, sizeof msg, "simt: out-of-bounds access before the start of buffer '%s'", g.name.c_str());
      }
      break;
    }
  }
  if (len > 0) {
    ssize_t ignored = write(2, msg, static_cast<size_t>(std::min<int>(len, sizeof msg - 1)));
    ignored = write(2, "\n", 1);
    (void)ignored;
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

void install_segv_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = segv_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
  });
}

}  // namespace

// ---- device-side API ---------------------------------------------------------------------------------
const uint3& thread_idx() { return current().tid; }
const uint3& block_idx() { return current().block->idx; }
const dim3& block_dim() { return current().block->dim; }
const dim3& grid_dim() { return current().block->grid; }
int lane_id() { return current().linear & 31; }

void sync_threads() { yield_to_scheduler(State::kAtBlock); }

void trap(const char* what) {
  Fiber& f = current();
  f.block->error = std::string("simt: ") + what + " by " + describe(f);
  f.state = State::kDone;
  swapcontext(&f.ctx, &f.block->sched);
  abort();  // never resumed
}

void* dynamic_shared_memory() { return current().block->smem; }

void check_vector_access(const void* p, size_t bytes, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % bytes == 0) return;
  std::string where = "memory outside every guarded buffer";
  {
    std::lock_guard<std::mutex> lock(guard_mu);
    auto it = guards().upper_bound(a);
    if (it != guards().begin()) {
      --it;
      const Guarded& g = it->second;
      if (a < reinterpret_cast<uintptr_t>(g.data + g.bytes)) {
        where = "byte offset " + std::to_string(a - it->first) + " of buffer '" + g.name + "'";
      }
    }
  }
  const std::string msg = "misaligned " + std::to_string(bytes) + "-byte vector " + what + " at " + where +
                          " (address mod " + std::to_string(bytes) + " = " + std::to_string(a % bytes) +
                          "; a GPU faults with cudaErrorMisalignedAddress) called";
  trap(msg.c_str());
}

uint64_t warp_collective(CollectiveKind kind, unsigned mask, uint64_t payload, int src_lane) {
  Fiber& f = current();
  f.kind = kind;
  f.mask = mask;
  f.payload = payload;
  f.src_lane = src_lane;
  yield_to_scheduler(State::kAtWarp);
  return f.result;
}

void cluster_sync() { yield_to_scheduler(State::kAtCluster); }
unsigned cluster_block_rank() { return current().block->rank; }
unsigned cluster_num_blocks() { return current().block->cluster->size; }

void* map_shared_rank(const void* addr, unsigned rank) {
  Block& b = *current().block;
  Cluster& c = *b.cluster;
  if (rank >= c.size) trap("map_shared_rank() of a rank outside the cluster called");
  const char* p = static_cast<const char*>(addr);
  const char* smem = static_cast<const char*>(b.smem);
  if (smem != nullptr && p >= smem && p < smem + b.smem_bytes) {
    return static_cast<char*>(c.blocks[rank]->smem) + (p - smem);
  }
  // a static __shared__ variable: same offset from the TLS anchor in the other block's OS thread
  return c.anchors[rank] + (p - &tls_anchor);
}

Schedule parse_schedule(const std::string& name) {
  if (name == "forward") return Schedule::kForward;
  if (name == "reverse") return Schedule::kReverse;
  if (name == "shuffle") return Schedule::kShuffle;
  throw Error("simt: unknown schedule '" + name + "' (forward, reverse, shuffle)");
}

void launch(const LaunchConfig& cfg, const std::function<void()>& body) {
  install_segv_handler();
  const unsigned k = cfg.cluster == 0 ? 1 : cfg.cluster;
  if (cfg.grid.x % k != 0) throw Error("simt: grid.x is not a multiple of the cluster size");
  const size_t nthreads = static_cast<size_t>(cfg.block.x) * cfg.block.y * cfg.block.z;
  if (nthreads == 0 || nthreads > 1024) throw Error("simt: block size must be 1..1024 threads");
  const uint64_t nblocks = static_cast<uint64_t>(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  std::mt19937_64 rng(cfg.seed);
  // blocks in cluster order: x fastest, clusters of k consecutive x
  std::vector<uint3> order;
  order.reserve(nblocks);
  for (unsigned z = 0; z < cfg.grid.z; ++z)
    for (unsigned y = 0; y < cfg.grid.y; ++y)
      for (unsigned x = 0; x < cfg.grid.x; ++x) order.push_back(uint3{x, y, z});
  const uint64_t nclusters = nblocks / k;
  std::vector<uint64_t> cluster_order(nclusters);
  for (uint64_t i = 0; i < nclusters; ++i) cluster_order[i] = i;
  if (cfg.schedule == Schedule::kReverse) std::reverse(cluster_order.begin(), cluster_order.end());
  if (cfg.schedule == Schedule::kShuffle) std::shuffle(cluster_order.begin(), cluster_order.end(), rng);

  for (uint64_t ci : cluster_order) {
    Cluster c;
    c.size = k;
    c.order = rank_order(cfg.schedule, k, rng);
    c.waiting.assign(k, 0);
    c.finished.assign(k, 0);
    c.anchors.assign(k, nullptr);
    std::vector<std::unique_ptr<Block>> blocks;
    for (unsigned r = 0; r < k; ++r) {
      auto b = std::make_unique<Block>();
      b->idx = order[ci * k + r];
      b->dim = cfg.block;
      b->grid = cfg.grid;
      b->schedule = cfg.schedule;
      b->rng.seed(rng());
      b->priority.assign(nthreads, 0);
      b->fibers.resize(nthreads);
      for (size_t t = 0; t < nthreads; ++t) {
        Fiber& f = b->fibers[t];
        f.linear = static_cast<int>(t);
        f.tid = uint3{static_cast<unsigned>(t % cfg.block.x), static_cast<unsigned>((t / cfg.block.x) % cfg.block.y),
                      static_cast<unsigned>(t / (static_cast<size_t>(cfg.block.x) * cfg.block.y))};
        f.block = b.get();
      }
      b->smem_bytes = cfg.dynamic_smem;
      b->smem = cfg.dynamic_smem ? guarded_alloc(cfg.dynamic_smem, 0, "dynamic shared memory") : nullptr;
      if (b->smem) memset(b->smem, 0xff, cfg.dynamic_smem);  // garbage (NaN) until written, as on a GPU
      b->cluster = &c;
      b->rank = r;
      b->body = &body;
      c.blocks.push_back(b.get());
      blocks.push_back(std::move(b));
    }
    c.turn = c.order.front();
    std::string error;
    if (k == 1) {
      c.anchors[0] = &tls_anchor;
      try {
        run_block(*blocks[0]);
      } catch (const Error& e) {
        error = e.what();
      }
    } else {
      // each block on its own OS thread; the anchors are published before any block runs
      std::vector<std::thread> threads;
      std::atomic<unsigned> ready{0};
      std::mutex amu;
      std::condition_variable acv;
      for (unsigned r = 0; r < k; ++r) {
        threads.emplace_back([&, r] {
          {
            std::lock_guard<std::mutex> l(amu);
            c.anchors[r] = &tls_anchor;
            ++ready;
          }
          acv.notify_all();
          {
            std::unique_lock<std::mutex> l(amu);
            acv.wait(l, [&] { return ready.load() == k; });
          }
          try {
            run_block(*blocks[r]);
          } catch (const Error& e) {
            std::lock_guard<std::mutex> l(c.mu);
            c.error = e.what();
            c.cv.notify_all();
          }
        });
      }
      for (auto& t : threads) t.join();
    }
    if (error.empty()) error = c.error;
    for (auto& b : blocks) {
      if (b->smem) {
        try {
          guarded_free(b->smem);
        } catch (const Error& e) {
          if (error.empty()) error = e.what();
        }
      }
    }
    if (!error.empty()) throw Error(error);
  }
}

void* guarded_alloc(size_t bytes, size_t align_mod, const char* name) {
  install_segv_handler();
  const size_t page = page_size();
  const size_t off = align_mod % 16;
  const size_t span = (bytes + off + 15) / 16 * 16;      // data + slack, 16-byte multiple
  const size_t data_pages = (span + page - 1) / page;
  const size_t map_bytes = (data_pages + 2) * page;      // guard page on each side
  char* map = static_cast<char*>(mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (map == MAP_FAILED) throw Error("simt: cannot map a guarded buffer");
  mprotect(map, page, PROT_NONE);
  mprotect(map + map_bytes - page, page, PROT_NONE);
  char* hi = map + map_bytes - page;
  char* data = hi - span + off;
  Guarded g{map, map_bytes, data, bytes, map + page, hi, name};
  memset(g.lo, kCanary, static_cast<size_t>(data - g.lo));
  memset(data + bytes, kCanary, static_cast<size_t>(hi - (data + bytes)));
  std::lock_guard<std::mutex> lock(guard_mu);
  guards().emplace(reinterpret_cast<uintptr_t>(data), g);
  return data;
}

void guarded_free(void* p) {
  Guarded g;
  {
    std::lock_guard<std::mutex> lock(guard_mu);
    auto it = guards().find(reinterpret_cast<uintptr_t>(p));
    if (it == guards().end()) throw Error("simt: guarded_free of an unknown pointer");
    g = it->second;
    guards().erase(it);
  }
  const std::string damage = guard_damage(g);
  munmap(g.map, g.map_bytes);
  if (!damage.empty()) throw Error(damage);
}

void check_guards() {
  std::lock_guard<std::mutex> lock(guard_mu);
  for (const auto& [key, g] : guards()) {
    const std::string damage = guard_damage(g);
    if (!damage.empty()) throw Error(damage);
  }
}

}  // namespace simt
