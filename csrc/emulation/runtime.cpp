// The emulated device: fibers for the threads of a block, a pool of OS workers for the blocks of a
// grid, barrier and warp-collective semantics, and the subset of the CUDA runtime API that the
// host side of fastopt calls (served here, so nothing links libcudart). See runtime.h.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ----------------------------------------------------------------------------------- sanitizers
#if defined(__SANITIZE_THREAD__)
#define FASTOPT_EMU_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#else
#define FASTOPT_EMU_TSAN 0
#endif

#if defined(__SANITIZE_ADDRESS__)
#define FASTOPT_EMU_ASAN 1
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
}
#else
#define FASTOPT_EMU_ASAN 0
#endif

namespace fastopt_emu {
namespace {

// The runtime's own bookkeeping is shared by the fibers of a block without happens-before edges
// (that is the point: only barriers order the kernel's accesses), so TSan must not see it.
struct [[maybe_unused]] Unobserved {
#if FASTOPT_EMU_TSAN
  Unobserved() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Unobserved() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
};

// The same, for the rest of a scope (nests).
inline void ignore_begin() {
#if FASTOPT_EMU_TSAN
  AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
#endif
}
inline void ignore_end() {
#if FASTOPT_EMU_TSAN
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
#endif
}

inline void hb_release([[maybe_unused]] void* token) {
#if FASTOPT_EMU_TSAN
  __tsan_release(token);
#endif
}
inline void hb_acquire([[maybe_unused]] void* token) {
#if FASTOPT_EMU_TSAN
  __tsan_acquire(token);
#endif
}

// ------------------------------------------------------------------------------ context switch
#if defined(__x86_64__)
// Callee-saved registers on the old stack, then the stack pointer swapped: no system call
// (ucontext's swapcontext saves the signal mask with one). The floating-point environment (MXCSR,
// x87 control word) is the OS thread's, shared by its fibers: kernels do not change it.
extern "C" void fastopt_emu_switch(void** save_sp, void* load_sp);
extern "C" void fastopt_emu_trampoline();
asm(R"(
    .text
    .globl fastopt_emu_switch
    .type fastopt_emu_switch,@function
fastopt_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fastopt_emu_switch, .-fastopt_emu_switch

    .globl fastopt_emu_trampoline
    .type fastopt_emu_trampoline,@function
fastopt_emu_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size fastopt_emu_trampoline, .-fastopt_emu_trampoline
    .section .note.GNU-stack,"",@progbits
    .text
)");

struct Context {
  void* sp = nullptr;
};

void make_context(Context& context, char* stack, size_t size, void (*entry)(void*), void* arg) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  // Six registers and the return address popped: the trampoline starts with a 16-byte aligned
  // stack pointer, as a call needs.
  auto* frame = reinterpret_cast<uint64_t*>(top - 16 - 7 * 8);
  frame[0] = 0;                                       // r15
  frame[1] = 0;                                       // r14
  frame[2] = reinterpret_cast<uint64_t>(entry);       // r13
  frame[3] = reinterpret_cast<uint64_t>(arg);         // r12
  frame[4] = 0;                                       // rbx
  frame[5] = 0;                                       // rbp
  frame[6] = reinterpret_cast<uint64_t>(&fastopt_emu_trampoline);
  context.sp = frame;
}

inline void switch_context(Context& from, Context& to) { fastopt_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void make_context(Context& context, char* stack, size_t size, void (*entry)(void*), void* arg) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = size;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, reinterpret_cast<void (*)()>(entry), 1, arg);  // one pointer argument (LP64)
}
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ----------------------------------------------------------------------------------- settings
int env_int(const char* name, int fallback, int low, int high) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  const int value = std::atoi(text);
  return std::clamp(value, low, high);
}

// The order in which a block's ready threads run between two barriers. Each order hides some
// missing barriers and shows others (threads that run first read shared memory before the
// threads that run later write it), so the default alternates: even blocks in reverse (thread 0
// last: a value that thread 0 writes for the others is read stale without its barrier), odd
// blocks forward (lane 0 of each warp writes, thread 0 reads: stale without the barrier).
// FASTOPT_EMULATION_SCHEDULE=forward|reverse|shuffle|alternate (the default).
enum class Order { kForward, kReverse, kShuffled, kAlternate };

Order schedule_order() {
  static const Order order = [] {
    const char* text = std::getenv("FASTOPT_EMULATION_SCHEDULE");
    if (text == nullptr) return Order::kAlternate;
    const std::string s(text);
    if (s == "forward") return Order::kForward;
    if (s == "reverse") return Order::kReverse;
    if (s == "shuffle") return Order::kShuffled;
    return Order::kAlternate;
  }();
  return order;
}

size_t stack_size() {
  static const size_t size = static_cast<size_t>(
      env_int("FASTOPT_EMULATION_STACK_KB", (FASTOPT_EMU_TSAN || FASTOPT_EMU_ASAN) ? 256 : 64, 16, 65536)) * 1024;
  return size;
}

// ------------------------------------------------------------------------------------ errors
std::mutex error_mutex;
cudaError_t sticky_error = cudaSuccess;
std::string error_message;

void set_error(cudaError_t code, const std::string& message) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (sticky_error == cudaSuccess) {
    sticky_error = code;
    error_message = message;
  }
  if (std::getenv("FASTOPT_EMULATION_QUIET") == nullptr) std::fprintf(stderr, "fastopt emulation: %s\n", message.c_str());
}

std::atomic<uint64_t> launches{0};
std::atomic<bool> grids_skipped{false};

// ------------------------------------------------------------------------------ blocks, fibers
constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;

enum class State : uint8_t { kReady, kAtBarrier, kAtWarp, kDone };

struct Fiber {
  Thread thread{};  // first: current points here
  Context context;
  char* stack = nullptr;
  size_t stagger = 0;
  void* tsan = nullptr;
  State state = State::kDone;
  unsigned barrier_generation = 0, warp_generation = 0;
  int result = 0;           // of the last barrier (count) or ballot
  uint64_t shuffled = 0;    // of the last shuffle
  // What this lane posted to its warp's collective.
  uint64_t value = 0;
  int source_lane = 0;
  int predicate = 0;
  unsigned mask = 0;
  std::source_location where;
};

struct Warp {
  int arrived = 0;
  unsigned generation = 0;
  unsigned live = 0;  // lanes that exist and have not exited
  int token[2] = {0, 0};
};

struct Worker;

// Thrown out of a barrier into the threads of a failed block, so that they finish (their stacks
// unwound, their accesses ordered before the worker's next block).
struct Abandoned {};

struct BlockRun : Block {
  Worker* worker = nullptr;
  int threads = 0, live = 0;
  int arrived = 0, count = 0;
  unsigned generation = 0;
  std::source_location site;
  int site_thread = 0;
  Warp warps[kMaxThreads / kWarp];
  int barrier_token[2] = {0, 0};
  int start_token = 0, end_token = 0;
  bool failed = false;
  bool unwinding = false;  // after a failure: resumed threads unwind (Abandoned) and finish
  std::string failure;
  KernelBody body{};
  const char* kernel_name = "";
};

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

std::string describe(const std::source_location& where) {
  std::ostringstream out;
  const char* file = where.file_name();
  const char* slash = std::strrchr(file, '/');
  out << (slash ? slash + 1 : file) << ":" << where.line();
  return out.str();
}

std::string thread_name(const Fiber& f) {
  std::ostringstream out;
  out << "thread (" << f.thread.thread_idx.x << "," << f.thread.thread_idx.y << "," << f.thread.thread_idx.z << ")";
  return out.str();
}

struct Worker {
  std::vector<std::unique_ptr<Fiber>> fibers;
  Context scheduler;
  void* tsan_scheduler = nullptr;
  void* asan_fake_stack = nullptr;
  BlockRun block;
  std::vector<int> order;
  std::mt19937 random{12345};

  Fiber& fiber(int i) { return *fibers[static_cast<size_t>(i)]; }

  void ensure_fibers(int n) {
    while (static_cast<int>(fibers.size()) < n) {
      auto f = std::make_unique<Fiber>();
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* memory = mmap(nullptr, stack_size() + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                          -1, 0);
      if (memory == MAP_FAILED) throw std::bad_alloc();
      mprotect(memory, page, PROT_NONE);  // a guard page below the stack: an overflow faults
      f->stack = static_cast<char*>(memory) + page;
      // Stack tops staggered by a few cache lines: 64 KiB-aligned tops would all fall into the
      // same cache sets, and every switch would miss.
      f->stagger = (fibers.size() % 61) * 64;
#if FASTOPT_EMU_TSAN
      f->tsan = __tsan_create_fiber(0);
#endif
      fibers.push_back(std::move(f));
    }
  }

  // Scheduler -> fiber i, until it yields.
  void resume(Fiber& f) {
    current = &f.thread;
#if FASTOPT_EMU_TSAN
    __tsan_switch_to_fiber(f.tsan, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
#if FASTOPT_EMU_ASAN
    __sanitizer_start_switch_fiber(&asan_fake_stack, f.stack, stack_size());
#endif
    switch_context(scheduler, f.context);
#if FASTOPT_EMU_ASAN
    __sanitizer_finish_switch_fiber(asan_fake_stack, nullptr, nullptr);
#endif
    current = nullptr;
  }

  // Fiber -> scheduler; returns when resumed.
  void yield(Fiber& f, bool final = false) {
#if FASTOPT_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(final ? nullptr : &fake, scheduler_stack_bottom, scheduler_stack_size);
#endif
#if FASTOPT_EMU_TSAN
    __tsan_switch_to_fiber(tsan_scheduler, 1);
#endif
    switch_context(f.context, scheduler);
#if FASTOPT_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, &scheduler_stack_bottom, &scheduler_stack_size);
#endif
    (void)final;
    if (block.unwinding) throw Abandoned{};
  }
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;

  static void entry(void* argument) {
    auto& f = *static_cast<Fiber*>(argument);
    BlockRun& b = *static_cast<BlockRun*>(f.thread.block);
    Worker& w = *b.worker;
#if FASTOPT_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &w.scheduler_stack_bottom, &w.scheduler_stack_size);
#endif
    // Only the kernel's own accesses are observed (a fiber's ignore state is its own).
    ignore_begin();
    hb_acquire(&b.start_token);
    ignore_end();
    try {
      if (!b.unwinding) b.body.call(b.body.closure);  // a thread first resumed to unwind does nothing
    } catch (const Abandoned&) {
    } catch (const std::exception& e) {
      w.fail(std::string("exception in ") + thread_name(f) + ": " + e.what());
    } catch (...) {
      w.fail("exception in " + thread_name(f));
    }
    ignore_begin();
    hb_release(&b.end_token);
    {
      [[maybe_unused]] Unobserved quiet;
      f.state = State::kDone;
      --b.live;
      w.on_exit(f);
    }
    ignore_end();  // balanced: the fiber starts the next block observed
    w.yield(f, /*final=*/true);
    std::abort();  // never resumed
  }

  void fail(const std::string& message) {
    [[maybe_unused]] Unobserved quiet;
    if (block.failed) return;
    block.failed = true;
    std::ostringstream out;
    out << block.kernel_name << " block (" << block.block_idx.x << "," << block.block_idx.y << "," << block.block_idx.z
        << "): " << message;
    block.failure = out.str();
  }

  // A thread exited: a barrier or warp collective may now be complete, or never will be.
  void on_exit(Fiber& f) {
    maybe_release_barrier();
    const int warp = static_cast<int>(f.thread.linear) / kWarp;
    Warp& wp = block.warps[warp];
    wp.live &= ~(1u << (f.thread.linear % kWarp));
    if (wp.arrived > 0) {
      for (int lane = 0; lane < kWarp; ++lane) {
        const int t = warp * kWarp + lane;
        if (t < block.threads && fiber(t).state == State::kAtWarp && (fiber(t).mask >> (f.thread.linear % kWarp)) & 1u) {
          fail("warp collective at " + describe(fiber(t).where) + " names lane " +
               std::to_string(f.thread.linear % kWarp) + ", which exited");
          return;
        }
      }
    }
  }

  void maybe_release_barrier() {
    BlockRun& b = block;
    if (b.arrived == 0 || b.arrived < b.live) return;
    for (int t = 0; t < b.threads; ++t) {
      Fiber& g = fiber(t);
      if (g.state == State::kAtBarrier) {
        g.state = State::kReady;
        g.result = b.count;
      }
    }
    b.arrived = 0;
    b.count = 0;
    ++b.generation;
  }

  int barrier(int predicate, const std::source_location& where) {
    Fiber& f = *reinterpret_cast<Fiber*>(current);
    BlockRun& b = block;
    unsigned generation;
    {
      [[maybe_unused]] Unobserved quiet;
      if (b.arrived == 0) {
        b.site = where;
        b.site_thread = static_cast<int>(f.thread.linear);
      } else if (!same_site(b.site, where)) {
        fail("threads of a block at different barriers: " + thread_name(fiber(b.site_thread)) + " at " +
             describe(b.site) + ", " + thread_name(f) + " at " + describe(where));
      }
      generation = b.generation;
      f.barrier_generation = generation;
      f.state = State::kAtBarrier;
      ++b.arrived;
      b.count += predicate != 0;
    }
    hb_release(&b.barrier_token[generation & 1]);
    {
      [[maybe_unused]] Unobserved quiet;
      maybe_release_barrier();
    }
    yield(f);
    hb_acquire(&b.barrier_token[generation & 1]);
    [[maybe_unused]] Unobserved quiet;
    return f.result;
  }

  // A warp collective: every lane of `mask` posts, the last one computes each lane's result.
  void collective(Fiber& f, unsigned mask, const std::source_location& where) {
    BlockRun& b = block;
    const int warp = static_cast<int>(f.thread.linear) / kWarp;
    Warp& wp = b.warps[warp];
    unsigned generation;
    bool complete = false;
    {
      [[maybe_unused]] Unobserved quiet;
      const int lane = static_cast<int>(f.thread.linear % kWarp);
      if (!((mask >> lane) & 1u)) fail(thread_name(f) + " calls a warp collective at " + describe(where) + " with a mask that excludes it");
      f.mask = mask;
      f.where = where;
      f.state = State::kAtWarp;
      generation = wp.generation;
      f.warp_generation = generation;
      ++wp.arrived;
      const unsigned missing = mask & ~wp.live;
      if (missing != 0) {
        const int l = __builtin_ctz(missing);
        fail("warp collective at " + describe(where) + " names lane " + std::to_string(l) +
             (warp * kWarp + l < b.threads ? ", which exited" : ", which does not exist"));
      }
      const int expected = __builtin_popcount(mask);
      complete = wp.arrived == expected;
    }
    hb_release(&wp.token[generation & 1]);
    if (complete) {
      [[maybe_unused]] Unobserved quiet;
      // Every lane of the mask is here: results, from the posted values only.
      int votes = 0;
      unsigned ballot = 0;
      for (int l = 0; l < kWarp; ++l) {
        if (!((mask >> l) & 1u)) continue;
        Fiber& g = fiber(warp * kWarp + l);
        if (!same_site(g.where, where))
          fail("lanes of a warp at different collectives: " + describe(g.where) + " and " + describe(where));
        if (g.mask != mask) fail("lanes of a warp collective at " + describe(where) + " disagree on the mask");
        if (g.predicate) {
          ++votes;
          ballot |= 1u << l;
        }
      }
      for (int l = 0; l < kWarp; ++l) {
        if (!((mask >> l) & 1u)) continue;
        Fiber& g = fiber(warp * kWarp + l);
        const int source = g.source_lane;
        g.shuffled = ((mask >> source) & 1u) ? fiber(warp * kWarp + source).value : g.value;
        g.result = static_cast<int>(ballot);
        g.state = State::kReady;
      }
      (void)votes;
      wp.arrived = 0;
      ++wp.generation;
    }
    yield(f);
    hb_acquire(&wp.token[generation & 1]);
  }

  void run(BlockRun& b) {
    const int n = b.threads;
    ensure_fibers(n);
    b.worker = this;
    b.live = n;
    b.arrived = 0;
    b.count = 0;
    b.failed = false;
    b.unwinding = false;
    b.failure.clear();
    for (int w = 0; w < (n + kWarp - 1) / kWarp; ++w) {
      Warp& wp = b.warps[w];
      wp.arrived = 0;
      const int lanes = std::min(kWarp, n - w * kWarp);
      wp.live = lanes == kWarp ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    for (int t = 0; t < n; ++t) {
      Fiber& f = fiber(t);
      f.thread.block = &b;
      f.thread.linear = static_cast<unsigned>(t);
      f.thread.thread_idx = uint3{static_cast<unsigned>(t) % b.block_dim.x,
                                  static_cast<unsigned>(t) / b.block_dim.x % b.block_dim.y,
                                  static_cast<unsigned>(t) / (b.block_dim.x * b.block_dim.y)};
      f.thread.pending_fence = false;
      f.state = State::kReady;
      make_context(f.context, f.stack, stack_size() - f.stagger, &Worker::entry, &f);
    }
    order.resize(static_cast<size_t>(n));
    for (int t = 0; t < n; ++t) order[static_cast<size_t>(t)] = t;
    const uint64_t linear_block = b.block_idx.x + static_cast<uint64_t>(b.grid_dim.x) *
                                                       (b.block_idx.y + static_cast<uint64_t>(b.grid_dim.y) * b.block_idx.z);
    if (schedule_order() == Order::kReverse || (schedule_order() == Order::kAlternate && linear_block % 2 == 0))
      std::reverse(order.begin(), order.end());
    hb_release(&b.start_token);
    while (b.live > 0 && !b.failed) {
      if (schedule_order() == Order::kShuffled) std::shuffle(order.begin(), order.end(), random);
      bool ran = false;
      for (int t : order) {
        Fiber& f = fiber(t);
        bool ready;
        {
          [[maybe_unused]] Unobserved quiet;
          ready = f.state == State::kReady;
        }
        if (!ready) continue;
        resume(f);
        ran = true;
        [[maybe_unused]] Unobserved quiet;
        if (b.failed) break;
      }
      [[maybe_unused]] Unobserved quiet;
      if (!ran && b.live > 0 && !b.failed) fail(deadlock_report());
    }
    if (b.failed) {  // every thread that has not finished unwinds from where it waits
      b.unwinding = true;
      for (int t = 0; t < n; ++t)
        while (fiber(t).state != State::kDone) resume(fiber(t));
    }
    hb_acquire(&b.end_token);
  }

  std::string deadlock_report() {
    BlockRun& b = block;
    std::ostringstream out;
    out << "deadlock: " << b.live << " live threads wait for ever:";
    int shown = 0;
    for (int t = 0; t < b.threads && shown < 4; ++t) {
      Fiber& f = fiber(t);
      if (f.state == State::kAtBarrier) {
        out << " " << thread_name(f) << " at the barrier " << describe(b.site) << " (" << b.arrived << " of " << b.live
            << " arrived);";
        ++shown;
      } else if (f.state == State::kAtWarp) {
        out << " " << thread_name(f) << " at the warp collective " << describe(f.where) << ";";
        ++shown;
      }
    }
    return out.str();
  }
};

// ---------------------------------------------------------------------------------- the grid
struct Grid {
  dim3 grid, block;
  KernelBody body;
  const char* name;
  std::atomic<bool> stop{false};
  uint64_t total = 0;
};

// Each worker has its own mailbox (mutex, condition, grid): workers never synchronise with one
// another, only with the launching thread, so nothing orders one worker's blocks before another's
// (TSan sees every race between blocks, whatever the timing).
class Pool {
 public:
  explicit Pool(int workers) : mailboxes_(static_cast<size_t>(workers)) {
    for (int i = 0; i < workers; ++i) std::thread([this, i] { loop(i); }).detach();
  }

  void run(Grid& grid) {
    for (Mailbox& box : mailboxes_) {
      {
        std::lock_guard<std::mutex> lock(box.done_mutex);
        box.done = false;
        box.failure.clear();
      }
      std::lock_guard<std::mutex> lock(box.start_mutex);
      box.grid = &grid;
      ++box.generation;
      box.start.notify_one();
    }
    // Waiting here touches only the done mutexes, which a worker takes after its blocks: what the
    // launcher learns from one worker never reaches another worker's blocks.
    std::string failure;
    for (Mailbox& box : mailboxes_) {
      std::unique_lock<std::mutex> lock(box.done_mutex);
      box.finished.wait(lock, [&] { return box.done; });
      if (failure.empty()) failure = box.failure;
    }
    if (!failure.empty()) set_error(cudaErrorLaunchFailure, failure);
  }

 private:
  struct Mailbox {
    std::mutex start_mutex;
    std::condition_variable start;
    Grid* grid = nullptr;
    uint64_t generation = 0;
    std::mutex done_mutex;
    std::condition_variable finished;
    bool done = true;
    std::string failure;
  };

  // Worker `index` runs blocks index, index + workers, ...: every worker gets blocks whatever the
  // timing, so blocks run concurrently (and their races show) on every run.
  void loop(int worker_index) {
    ignore_begin();  // the scheduler's bookkeeping is not the kernel's business (see Unobserved)
    Worker worker;
#if FASTOPT_EMU_TSAN
    worker.tsan_scheduler = __tsan_get_current_fiber();
#endif
    Mailbox& box = mailboxes_[static_cast<size_t>(worker_index)];
    const uint64_t workers = mailboxes_.size();
    uint64_t seen = 0;
    for (;;) {
      Grid* grid;
      {
        std::unique_lock<std::mutex> lock(box.start_mutex);
        box.start.wait(lock, [&] { return box.generation != seen; });
        seen = box.generation;
        grid = box.grid;
      }
      std::string failure;
      for (uint64_t index = static_cast<uint64_t>(worker_index); index < grid->total; index += workers) {
        if (grid->stop.load(std::memory_order_relaxed)) break;
        BlockRun& b = worker.block;
        b.block_dim = grid->block;
        b.grid_dim = grid->grid;
        b.block_idx = uint3{static_cast<unsigned>(index % grid->grid.x),
                            static_cast<unsigned>(index / grid->grid.x % grid->grid.y),
                            static_cast<unsigned>(index / (static_cast<uint64_t>(grid->grid.x) * grid->grid.y))};
        b.threads = static_cast<int>(grid->block.x * grid->block.y * grid->block.z);
        b.body = grid->body;
        b.kernel_name = grid->name;
        worker.run(b);
        if (b.failed) {
          failure = b.failure;
          grid->stop.store(true, std::memory_order_relaxed);  // the other workers stop too
          break;
        }
      }
      std::lock_guard<std::mutex> lock(box.done_mutex);
      box.failure = failure;
      box.done = true;
      box.finished.notify_one();
    }
  }

  std::vector<Mailbox> mailboxes_;
};

Pool& pool() {
  static Pool* instance = new Pool(worker_count());  // never destroyed: its workers sleep at exit
  return *instance;
}

std::mutex launch_mutex;

Worker& this_worker() { return *reinterpret_cast<BlockRun*>(current->block)->worker; }

}  // namespace

// ------------------------------------------------------------------------------ the built-ins
struct [[maybe_unused]] RuntimeScope {
  RuntimeScope() { ignore_begin(); }
  ~RuntimeScope() { ignore_end(); }
};

void syncthreads(const std::source_location& where) {
  RuntimeScope scope;
  this_worker().barrier(0, where);
}

int syncthreads_count(int predicate, const std::source_location& where) {
  RuntimeScope scope;
  return this_worker().barrier(predicate, where);
}

void syncwarp(unsigned mask, const std::source_location& where) {
  RuntimeScope scope;
  auto& f = *reinterpret_cast<Fiber*>(current);
  f.source_lane = static_cast<int>(f.thread.linear % kWarp);
  f.predicate = 0;
  this_worker().collective(f, mask, where);
}

uint64_t warp_shuffle(unsigned mask, uint64_t value, int kind, int operand, int width,
                      const std::source_location& where) {
  RuntimeScope scope;
  auto& f = *reinterpret_cast<Fiber*>(current);
  const int lane = static_cast<int>(f.thread.linear % kWarp);
  if (width <= 0 || width > kWarp || (width & (width - 1)) != 0) width = kWarp;
  const int base = lane / width * width, in_segment = lane - base;
  int source = lane;
  switch (kind) {
    case 0: source = base + ((operand % width) + width) % width; break;
    case 1: source = in_segment - operand >= 0 ? lane - operand : lane; break;
    case 2: source = in_segment + operand < width ? lane + operand : lane; break;
    default: {
      const int other = lane ^ operand;
      source = other < base + width ? other : lane;  // beyond the segment: the lane's own value
    }
  }
  f.value = value;
  f.source_lane = source;
  f.predicate = 0;
  this_worker().collective(f, mask, where);
  [[maybe_unused]] Unobserved quiet;
  return f.shuffled;
}

unsigned warp_ballot(unsigned mask, int predicate, const std::source_location& where) {
  RuntimeScope scope;
  auto& f = *reinterpret_cast<Fiber*>(current);
  f.source_lane = static_cast<int>(f.thread.linear % kWarp);
  f.predicate = predicate != 0;
  this_worker().collective(f, mask, where);
  [[maybe_unused]] Unobserved quiet;
  return static_cast<unsigned>(f.result);
}

int atomic_order() {
  RuntimeScope scope;
  Thread& t = *current;
  if (t.pending_fence) {
    t.pending_fence = false;
    return __ATOMIC_ACQ_REL;
  }
  return __ATOMIC_ACQUIRE;
}

void threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  RuntimeScope scope;
  current->pending_fence = true;
}

cudaError_t run_grid(dim3 grid_dim, dim3 block_dim, size_t dynamic_shared, cudaStream_t, KernelBody body,
                     const char* kernel_name) {
  launches.fetch_add(1);
  const uint64_t threads = static_cast<uint64_t>(block_dim.x) * block_dim.y * block_dim.z;
  const uint64_t blocks = static_cast<uint64_t>(grid_dim.x) * grid_dim.y * grid_dim.z;
  if (threads == 0 || threads > kMaxThreads || blocks == 0 || grid_dim.y > 65535 || grid_dim.z > 65535 ||
      dynamic_shared > 0) {
    std::ostringstream out;
    out << kernel_name << ": invalid launch configuration (grid " << grid_dim.x << "x" << grid_dim.y << "x"
        << grid_dim.z << ", block " << block_dim.x << "x" << block_dim.y << "x" << block_dim.z << ", dynamic shared "
        << dynamic_shared << " bytes: the emulation has static shared memory only)";
    set_error(cudaErrorInvalidConfiguration, out.str());
    return cudaErrorInvalidConfiguration;
  }
  if (current != nullptr) {
    set_error(cudaErrorNotSupported, std::string(kernel_name) + ": launched from device code");
    return cudaErrorNotSupported;
  }
  if (grids_skipped.load(std::memory_order_relaxed)) return cudaSuccess;
  std::lock_guard<std::mutex> lock(launch_mutex);  // one grid at a time (streams are in order anyway)
  Grid grid;
  grid.grid = grid_dim;
  grid.block = block_dim;
  grid.body = body;
  grid.name = kernel_name;
  grid.total = blocks;
  pool().run(grid);
  std::lock_guard<std::mutex> error_lock(error_mutex);
  return sticky_error;
}

std::string last_error_message() {
  std::lock_guard<std::mutex> lock(error_mutex);
  return error_message;
}

int worker_count() {
  static const int count = env_int("FASTOPT_EMULATION_WORKERS", 2, 1, 64);
  return count;
}
int multiprocessor_count() {
  static const int count = env_int("FASTOPT_EMULATION_SMS", 4, 1, 1024);
  return count;
}
int blocks_per_multiprocessor() {
  static const int count = env_int("FASTOPT_EMULATION_BLOCKS_PER_SM", 2, 1, 64);
  return count;
}
uint64_t launch_count() { return launches.load(); }
void set_grids_skipped(bool skipped) { grids_skipped.store(skipped); }

}  // namespace fastopt_emu

// -------------------------------------------------------------------------- CUDA runtime API
// The calls fastopt's host code makes, served on the host. Memory is host memory: "device"
// pointers are ordinary pointers, copies are memcpy, streams are in order (a launch runs to
// completion before it returns), so synchronisation is a no-op.
extern "C" {

cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(fastopt_emu::error_mutex);
  const cudaError_t error = fastopt_emu::sticky_error;
  fastopt_emu::sticky_error = cudaSuccess;
  return error;
}

cudaError_t cudaPeekAtLastError(void) {
  std::lock_guard<std::mutex> lock(fastopt_emu::error_mutex);
  return fastopt_emu::sticky_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated device)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated device)";
    case cudaErrorInvalidValue: return "invalid argument (emulated device)";
    case cudaErrorNotSupported: return "operation not supported (emulated device)";
    default: return "error (emulated device)";
  }
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaError";
  }
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void*, int block_size, size_t) {
  if (num_blocks == nullptr || block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  *num_blocks = fastopt_emu::blocks_per_multiprocessor();
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* num_blocks, const void* func, int block_size,
                                                                   size_t shared, unsigned int) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks, func, block_size, shared);
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 || device == -1 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

// Device 0, the one emulated device; -1 too (a CPU tensor's device index, which the host code of
// the emulated build passes on).
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attribute, int device) {
  if (device != 0 && device != -1) return cudaErrorInvalidDevice;
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount: *value = fastopt_emu::multiprocessor_count(); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; return cudaSuccess;
    default: *value = 0; return cudaErrorInvalidValue;
  }
}

cudaError_t cudaMalloc(void** pointer, size_t size) {
  *pointer = std::malloc(size == 0 ? 1 : size);
  return *pointer != nullptr ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaFree(void* pointer) {
  std::free(pointer);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** pointer, size_t size) { return cudaMalloc(pointer, size); }
cudaError_t cudaHostAlloc(void** pointer, size_t size, unsigned int) { return cudaMalloc(pointer, size); }
cudaError_t cudaFreeHost(void* pointer) { return cudaFree(pointer); }

cudaError_t cudaMemcpy(void* to, const void* from, size_t count, enum cudaMemcpyKind) {
  if (count > 0) std::memmove(to, from, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t count, enum cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(to, from, count, kind);
}

cudaError_t cudaMemset(void* pointer, int value, size_t count) {
  if (count > 0) std::memset(pointer, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* pointer, int value, size_t count, cudaStream_t) {
  return cudaMemset(pointer, value, count);
}

// Streams: handles only (every launch and copy completes before it returns, in call order).
namespace {
struct EmulatedStream {
  unsigned flags;
};
}  // namespace

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  *stream = reinterpret_cast<cudaStream_t>(new EmulatedStream{flags});
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete reinterpret_cast<EmulatedStream*>(stream);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// Capture: the emulation never captures (there are no graphs on the host).
cudaError_t cudaStreamGetCaptureInfo(cudaStream_t, enum cudaStreamCaptureStatus* status, unsigned long long* id,
                                     cudaGraph_t* graph, const cudaGraphNode_t** dependencies,
                                     const cudaGraphEdgeData** edges, size_t* count) {
  if (status != nullptr) *status = cudaStreamCaptureStatusNone;
  if (id != nullptr) *id = 0;
  if (graph != nullptr) *graph = nullptr;
  if (dependencies != nullptr) *dependencies = nullptr;
  if (edges != nullptr) *edges = nullptr;
  if (count != nullptr) *count = 0;
  return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode*) { return cudaSuccess; }

namespace {
struct EmulatedUserObject {
  void* data;
  cudaHostFn_t destroy;
  std::atomic<unsigned> references;
};
}  // namespace

cudaError_t cudaUserObjectCreate(cudaUserObject_t* object, void* data, cudaHostFn_t destroy, unsigned int references,
                                 unsigned int) {
  *object = reinterpret_cast<cudaUserObject_t>(new EmulatedUserObject{data, destroy, {references}});
  return cudaSuccess;
}

cudaError_t cudaUserObjectRelease(cudaUserObject_t object, unsigned int count) {
  auto* o = reinterpret_cast<EmulatedUserObject*>(object);
  if (o->references.fetch_sub(count) == count) {
    o->destroy(o->data);
    delete o;
  }
  return cudaSuccess;
}

cudaError_t cudaGraphRetainUserObject(cudaGraph_t, cudaUserObject_t, unsigned int, unsigned int) {
  return cudaErrorNotSupported;  // no graphs on the host
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t cudaStreamIsCapturing(cudaStream_t, enum cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

}  // extern "C"
