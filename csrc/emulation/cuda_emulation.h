// Force-included (g++ -include) before a .cu file that is compiled as C++ for the host emulation
// of the CUDA execution model (runtime.h). It supplies what nvcc would: the execution-space
// qualifiers, static __shared__ memory (per running block), the built-in variables, barriers,
// warp shuffles and votes, atomics and fences, the cache-hinted loads and stores, a few fast-math
// intrinsics, and FASTOPT_LAUNCH (the one change the kernel sources carry instead of <<<...>>>).
// The kernel files themselves compile unchanged.
#pragma once

#define FASTOPT_CUDA_EMULATION 1

// The real CUDA headers first (types, fp16/bf16 host conversions, libcu++'s cuda::atomic_ref),
// before the macros below could change what they declare.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cuda/atomic>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

#include "runtime.h"

// ------------------------------------------------------------------------ qualifiers, memory
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)
// One instance per OS worker thread, i.e. per running block (the block's fibers share it).
#undef __shared__
#define __shared__ static thread_local
#undef __constant__
#define __constant__ static

// ---------------------------------------------------------------------------- built-in variables
#define threadIdx (::fastopt_emu::current->thread_idx)
#define blockIdx (::fastopt_emu::current->block->block_idx)
#define blockDim (::fastopt_emu::current->block->block_dim)
#define gridDim (::fastopt_emu::current->block->grid_dim)
#ifndef warpSize
#define warpSize 32
#endif

// ---------------------------------------------------------------------------------- launches
// FASTOPT_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...) == kernel<<<...>>>(args...).
#define FASTOPT_LAUNCH(grid, block, shared, stream, ...) \
  ::fastopt_emu::make_launch(grid, block, shared, stream, __VA_ARGS__, #__VA_ARGS__)

// ---------------------------------------------------------------------------------- barriers
inline void __syncthreads(const std::source_location where = std::source_location::current()) {
  fastopt_emu::syncthreads(where);
}
inline int __syncthreads_count(int predicate, const std::source_location where = std::source_location::current()) {
  return fastopt_emu::syncthreads_count(predicate, where);
}
inline int __syncthreads_or(int predicate, const std::source_location where = std::source_location::current()) {
  return fastopt_emu::syncthreads_count(predicate, where) > 0;
}
inline int __syncthreads_and(int predicate, const std::source_location where = std::source_location::current()) {
  // Every live thread voted: the count of false votes is what decides.
  return fastopt_emu::syncthreads_count(!predicate, where) == 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const std::source_location where = std::source_location::current()) {
  fastopt_emu::syncwarp(mask, where);
}

// ----------------------------------------------------------------------------- warp shuffles
namespace fastopt_emu {
template <typename T>
inline T shuffle(unsigned mask, T value, int kind, int operand, int width, const std::source_location& where) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move values of up to 8 bytes");
  uint64_t word = 0;
  std::memcpy(&word, &value, sizeof(T));
  word = warp_shuffle(mask, word, kind, operand, width, where);
  T out;
  std::memcpy(&out, &word, sizeof(T));
  return out;
}
}  // namespace fastopt_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32,
                     const std::source_location where = std::source_location::current()) {
  return fastopt_emu::shuffle(mask, value, 0, source_lane, width, where);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32,
                        const std::source_location where = std::source_location::current()) {
  return fastopt_emu::shuffle(mask, value, 1, static_cast<int>(delta), width, where);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32,
                          const std::source_location where = std::source_location::current()) {
  return fastopt_emu::shuffle(mask, value, 2, static_cast<int>(delta), width, where);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32,
                         const std::source_location where = std::source_location::current()) {
  return fastopt_emu::shuffle(mask, value, 3, lane_mask, width, where);
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              const std::source_location where = std::source_location::current()) {
  return fastopt_emu::warp_ballot(mask, predicate, where);
}
inline int __any_sync(unsigned mask, int predicate, const std::source_location where = std::source_location::current()) {
  return fastopt_emu::warp_ballot(mask, predicate, where) != 0;
}
inline int __all_sync(unsigned mask, int predicate, const std::source_location where = std::source_location::current()) {
  return (fastopt_emu::warp_ballot(mask, predicate, where) & mask) == mask;
}
inline unsigned __activemask() { return 0xffffffffu; }

// --------------------------------------------------------------------------- atomics, fences
// Acquire, and acq_rel after a __threadfence() (runtime.h): a fence is what publishes a thread's
// earlier stores to the block that reads the counter next.
namespace fastopt_emu {
// op(order) with the order as a compile-time constant: GCC treats a run-time memory order as
// seq_cst, which would make every atomic a release and hide a missing fence.
template <typename Op>
inline auto with_device_order(Op op) {
  if (atomic_order() == __ATOMIC_ACQ_REL) return op(std::integral_constant<std::memory_order, std::memory_order_acq_rel>{});
  return op(std::integral_constant<std::memory_order, std::memory_order_acquire>{});
}
}  // namespace fastopt_emu

template <typename T>
inline T atomicAdd(T* address, std::type_identity_t<T> value) {
  return fastopt_emu::with_device_order(
      [&](auto order) { return std::atomic_ref<T>(*address).fetch_add(value, decltype(order)::value); });
}
template <typename T>
inline T atomicSub(T* address, std::type_identity_t<T> value) {
  return fastopt_emu::with_device_order(
      [&](auto order) { return std::atomic_ref<T>(*address).fetch_sub(value, decltype(order)::value); });
}
template <typename T>
inline T atomicExch(T* address, std::type_identity_t<T> value) {
  return fastopt_emu::with_device_order(
      [&](auto order) { return std::atomic_ref<T>(*address).exchange(value, decltype(order)::value); });
}
template <typename T>
inline T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> value) {
  return fastopt_emu::with_device_order([&](auto order) {
    T expected = compare;
    std::atomic_ref<T>(*address).compare_exchange_strong(expected, value, decltype(order)::value,
                                                         std::memory_order_acquire);
    return expected;
  });
}
template <typename T>
inline T atomicMax(T* address, std::type_identity_t<T> value) {
  return fastopt_emu::with_device_order([&](auto order) {
    std::atomic_ref<T> ref(*address);
    T old = ref.load(std::memory_order_acquire);
    while (old < value && !ref.compare_exchange_weak(old, value, decltype(order)::value, std::memory_order_acquire)) {
    }
    return old;
  });
}
template <typename T>
inline T atomicMin(T* address, std::type_identity_t<T> value) {
  return fastopt_emu::with_device_order([&](auto order) {
    std::atomic_ref<T> ref(*address);
    T old = ref.load(std::memory_order_acquire);
    while (value < old && !ref.compare_exchange_weak(old, value, decltype(order)::value, std::memory_order_acquire)) {
    }
    return old;
  });
}
inline void __threadfence() { fastopt_emu::threadfence(); }
inline void __threadfence_block() { fastopt_emu::threadfence(); }
inline void __threadfence_system() { fastopt_emu::threadfence(); }

// ----------------------------------------------------------------- cache-hinted loads, stores
// Plain accesses on the host (the hints change caching, not meaning).
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldca(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldlu(const T* p) { return *p; }
template <typename T>
inline T __ldcv(const T* p) { return *p; }
template <typename T>
inline void __stwb(T* p, T v) { *p = v; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
template <typename T>
inline void __stwt(T* p, T v) { *p = v; }

// ------------------------------------------------------------------------- fast-math intrinsics
// IEEE on the host (the device's approximations are within a few ulp of these).
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __saturatef(float x) { return std::clamp(x, 0.0f, 1.0f); }
inline float __fmul_rn(float x, float y) { return x * y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
