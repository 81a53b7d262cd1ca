// A host runtime for the CUDA execution model: what fastopt's kernels need to run unchanged on the
// CPU (no GPU, no driver). See csrc/emulation/README.md.
//
// - A launch runs the grid's blocks on a pool of OS worker threads (FASTOPT_EMULATION_WORKERS,
//   default 2), several blocks at once, so that races *between* blocks (the last-block fold, the
//   arrival counters) are real data races that ThreadSanitizer sees.
// - The threads of a block are fibers on their worker: each runs until it reaches a barrier
//   (__syncthreads, __syncthreads_or, __syncwarp) or a warp collective (__shfl_*_sync), then the
//   next one runs; a barrier releases when every live thread of the block has arrived. So a block
//   of 512 threads costs a few context switches (tens of ns each) per barrier, not 512 OS threads.
// - __shared__ is `static thread_local`: one instance per worker, i.e. per running block.
// - Errors that a GPU would turn into a failed launch or a hang (a deadlock at a barrier, threads of
//   a block at different barriers, a warp collective naming exited lanes, an exception) fail the
//   launch: cudaGetLastError() returns cudaErrorLaunchFailure and last_error_message() says why.
// - Under -fsanitize=thread the fibers are TSan fibers that switch without synchronising; barriers
//   and warp collectives are the only happens-before edges inside a block, so a missing
//   __syncthreads() between a shared-memory write and another thread's read is a reported race
//   (what compute-sanitizer's racecheck reports). Device atomics are acquire, and release when the
//   thread executed __threadfence() since its last atomic, so a missing fence before an arrival
//   counter is a reported race too. Under -fsanitize=address the fiber stacks are announced.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_runtime.h>

namespace fastopt_emu {

struct Block;

// One CUDA thread (a fiber). Fields read by the built-ins are first.
struct Thread {
  uint3 thread_idx;
  Block* block;
  unsigned linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  bool pending_fence;  // __threadfence() since this thread's last atomic
};

struct Block {
  uint3 block_idx;
  dim3 block_dim, grid_dim;
};

// The CUDA thread running on this OS thread (null outside a kernel).
inline thread_local Thread* current = nullptr;

inline Thread& self() { return *current; }

// Barriers and warp collectives (see runtime.cpp).
void syncthreads(const std::source_location& where);
int syncthreads_count(int predicate, const std::source_location& where);
void syncwarp(unsigned mask, const std::source_location& where);
// value: up to 8 bytes. kind 0: idx (src lane), 1: up, 2: down, 3: xor.
uint64_t warp_shuffle(unsigned mask, uint64_t value, int kind, int operand, int width,
                      const std::source_location& where);
unsigned warp_ballot(unsigned mask, int predicate, const std::source_location& where);

// Device atomics' memory order (see above): acquire, or acq_rel after a __threadfence().
int atomic_order();
void threadfence();

// A kernel launch: body() runs once per thread of every block. Returns cudaSuccess or
// cudaErrorLaunchFailure (the message in last_error_message()).
struct KernelBody {
  void (*call)(const void* closure);
  const void* closure;
};
cudaError_t run_grid(dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t stream, KernelBody body,
                     const char* kernel_name);

// The last launch failure's description (empty when none), and the sticky error code.
std::string last_error_message();

// Settings (environment, read once): workers, multiprocessors reported, blocks per multiprocessor.
int worker_count();
int multiprocessor_count();
int blocks_per_multiprocessor();

// Launches since the process started (tests count them).
uint64_t launch_count();

// When set, a launch is checked and counted, then returns at once without running its grid: what
// is left of an op is its host work (bench/host_overhead.py times host_runtime.cpp's side that way).
void set_grids_skipped(bool skipped);

template <typename... Params>
struct Launch {
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;
  void (*kernel)(Params...);
  const char* name;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // Arguments are copied once, as the launch does, then every thread receives copies by value.
    const std::tuple<std::decay_t<Params>...> copied(std::forward<Args>(args)...);
    struct Closure {
      void (*kernel)(Params...);
      const std::tuple<std::decay_t<Params>...>* args;
    } closure{kernel, &copied};
    KernelBody body{[](const void* c) {
                      const auto* cl = static_cast<const Closure*>(c);
                      std::apply(cl->kernel, *cl->args);
                    },
                    &closure};
    run_grid(grid, block, shared, stream, body, name);
  }
};

template <typename... Params>
Launch<Params...> make_launch(dim3 grid, dim3 block, size_t shared, cudaStream_t stream, void (*kernel)(Params...),
                              const char* name) {
  return {grid, block, shared, stream, kernel, name};
}

}  // namespace fastopt_emu
