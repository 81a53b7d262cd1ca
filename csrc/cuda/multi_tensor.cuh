// The multi-tensor machinery shared by the kernels: walking the device-side chunk table with a
// persistent grid, element loads and stores with fp32 (fp64) accumulation, 16-byte vector
// accesses where every pointer of a chunk allows them, and deterministic block reductions.
// CUDA headers only (see kernels.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>
#include <cuda/atomic>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

// kernel<<<grid, block, shared, stream>>>(args...) is written
// FASTOPT_LAUNCH(grid, block, shared, stream, kernel)(args...): the host emulation of the device
// (csrc/emulation, which runs these kernels on the CPU in CI) defines it as its launch.
#ifndef FASTOPT_LAUNCH
#define FASTOPT_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
#endif

namespace fastopt {

// --------------------------------------------------------------------------- global memory
// Every pointer a kernel follows comes out of the int64 table, so the compiler cannot tell that it
// points to global memory and would emit generic LD/ST (an address-space check per access). These
// helpers emit LDG/STG: read-only data through the non-coherent path (__ldg: LDG.E.CONSTANT), data
// the kernel also writes with plain weak accesses (LDG.E / STG.E) after telling the compiler that
// the pointer is global (__builtin_assume(__isGlobal(p))). Values move as unsigned words of their
// size (2 to 16 bytes).
template <int Bytes>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};

template <typename T>
__device__ __forceinline__ T* assume_global(T* pointer) {
#if defined(__CUDA_ARCH__)  // (a host compilation of the kernels, csrc/emulation, has no address spaces)
  __builtin_assume(__isGlobal(pointer));
#endif
  return pointer;
}

template <bool ReadOnly, typename T>
__device__ __forceinline__ T load_global(const T* pointer) {
  using W = typename Word<sizeof(T)>::type;
  const W* words = reinterpret_cast<const W*>(pointer);
  W word;
  if constexpr (ReadOnly) {
    word = __ldg(words);
  } else {
    word = *assume_global(words);
  }
  T value;
  memcpy(&value, &word, sizeof(T));
  return value;
}

template <typename T>
__device__ __forceinline__ void store_global(T* pointer, const T& value) {
  using W = typename Word<sizeof(T)>::type;
  W word;
  memcpy(&word, &value, sizeof(T));
  *assume_global(reinterpret_cast<W*>(pointer)) = word;
}

// Table columns and device scalars: read-only for every kernel.
__device__ __forceinline__ int64_t column(const int64_t* values, int64_t i) { return __ldg(values + i); }

template <typename T>
__device__ __forceinline__ T* table_pointer(const DeviceTable& table, int64_t list, int64_t tensor) {
  return reinterpret_cast<T*>(column(table.addresses, list * table.num_tensors + tensor));
}
__device__ __forceinline__ DType table_dtype(const DeviceTable& table, int64_t list, int64_t tensor) {
  return static_cast<DType>(column(table.dtypes, list * table.num_tensors + tensor));
}

// The accumulation type of an element type: fp32, except fp64 which keeps its precision.
template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

template <typename A>
__device__ __forceinline__ A to_acc(float x) { return A(x); }
template <typename A>
__device__ __forceinline__ A to_acc(double x) { return A(x); }
template <typename A>
__device__ __forceinline__ A to_acc(__half x) { return A(__half2float(x)); }
template <typename A>
__device__ __forceinline__ A to_acc(__nv_bfloat16 x) { return A(__bfloat162float(x)); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return from_acc<T>(static_cast<float>(x)); }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }

// Runs body(T{}) with T the element type of `dtype`; the branch is uniform over a block
// (a chunk belongs to one tensor), so it costs no divergence.
template <typename Body>
__device__ __forceinline__ void dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case kFloat16: body(__half{}); break;
    case kBFloat16: body(__nv_bfloat16{}); break;
    case kFloat32: body(float{}); break;
    case kFloat64: body(double{}); break;
  }
}

// A float argument that may live in device memory (see ScalarArg).
__device__ __forceinline__ double read_scalar(const ScalarArg& arg) {
  if (arg.pointer == nullptr) return arg.value;
  switch (static_cast<DType>(arg.dtype)) {
    case kFloat16: return to_acc<double>(load_global<true>(static_cast<const __half*>(arg.pointer)));
    case kBFloat16: return to_acc<double>(load_global<true>(static_cast<const __nv_bfloat16*>(arg.pointer)));
    case kFloat32: return load_global<true>(static_cast<const float*>(arg.pointer));
    default: return load_global<true>(static_cast<const double*>(arg.pointer));
  }
}

// A product rounded on its own, which nvcc may not contract into a following addition (torch
// rounds it before the sum: Lion's decayed param).
__device__ __forceinline__ float rounded_product(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ double rounded_product(double x, double y) { return __dmul_rn(x, y); }

// The (param, grad, state) dtype combinations that the update kernels (AdamW, SGD, Lion) are
// compiled for: fp64 alone; fp32 params and states with fp32, bf16 or fp16 grads; bf16 / fp16
// params with grads of their dtype or fp32, and states of their dtype or fp32. CASE(param code,
// grad code, state code, param type, grad type, state type) for each; fastopt/backends/cuda.py's
// UPDATE_BUILDS is the same list (tests/test_cuda_extension.py compares them).
#define FASTOPT_UPDATE_COMBINATIONS(CASE)                                            \
  CASE(kFloat64, kFloat64, kFloat64, double, double, double)                        \
  CASE(kFloat32, kFloat32, kFloat32, float, float, float)                           \
  CASE(kFloat32, kBFloat16, kFloat32, float, __nv_bfloat16, float)                  \
  CASE(kFloat32, kFloat16, kFloat32, float, __half, float)                          \
  CASE(kBFloat16, kBFloat16, kBFloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16) \
  CASE(kBFloat16, kBFloat16, kFloat32, __nv_bfloat16, __nv_bfloat16, float)         \
  CASE(kBFloat16, kFloat32, kFloat32, __nv_bfloat16, float, float)                  \
  CASE(kBFloat16, kFloat32, kBFloat16, __nv_bfloat16, float, __nv_bfloat16)         \
  CASE(kFloat16, kFloat16, kFloat16, __half, __half, __half)                        \
  CASE(kFloat16, kFloat16, kFloat32, __half, __half, float)                         \
  CASE(kFloat16, kFloat32, kFloat32, __half, float, float)                          \
  CASE(kFloat16, kFloat32, kFloat16, __half, float, __half)

// Blocks of kThreads per multiprocessor that an update kernel's register budget must allow (sm_90:
// 64 K registers per SM, so 3 blocks of 512 threads leave 40 registers a thread; fp64 needs twice
// the registers per value and gets 2 blocks, 64 registers).
template <typename P>
constexpr __host__ __device__ int update_min_blocks() { return sizeof(P) == 8 ? 2 : 3; }

// N elements moved by one instruction per 16 bytes (N * sizeof(T) of 2 to 16 bytes, or a
// multiple of 16).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T values[N];
};

// The alignment a pack access needs: its size, at most 16 bytes.
template <int N, typename T>
__device__ __forceinline__ bool pack_aligned(const T* pointer) {
  constexpr size_t bytes = sizeof(T) * N < 16 ? sizeof(T) * N : 16;
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

template <typename T, int N>
struct PackWords {
  static constexpr int bytes = sizeof(T) * N < 16 ? static_cast<int>(sizeof(T)) * N : 16;
  static constexpr int count = static_cast<int>(sizeof(T)) * N / bytes;
  using type = typename Word<bytes>::type;
};

template <int N, bool ReadOnly = false, typename A, typename T>
__device__ __forceinline__ void load_pack(const T* pointer, A (&out)[N]) {
  using Words = PackWords<T, N>;
  Pack<T, N> pack;
  const auto* words = reinterpret_cast<const typename Words::type*>(pointer);
  auto* into = reinterpret_cast<typename Words::type*>(&pack);
#pragma unroll
  for (int w = 0; w < Words::count; ++w) into[w] = load_global<ReadOnly>(words + w);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_acc<A>(pack.values[i]);
}

template <int N, typename A, typename T>
__device__ __forceinline__ void store_pack(T* pointer, const A (&in)[N]) {
  using Words = PackWords<T, N>;
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.values[i] = from_acc<T>(in[i]);
  auto* words = reinterpret_cast<typename Words::type*>(pointer);
  const auto* from = reinterpret_cast<const typename Words::type*>(&pack);
#pragma unroll
  for (int w = 0; w < Words::count; ++w) store_global(words + w, from[w]);
}

template <bool ReadOnly = false, typename A, typename T>
__device__ __forceinline__ A load_element(const T* pointer) {
  return to_acc<A>(load_global<ReadOnly>(pointer));
}
template <typename T, typename A>
__device__ __forceinline__ void store_element(T* pointer, A value) {
  store_global(pointer, from_acc<T>(value));
}

// Elements per 16-byte access of T.
template <typename T>
__host__ __device__ constexpr int pack_width() { return 16 / static_cast<int>(sizeof(T)); }

// Visits the elements [start, end) of a chunk, `N` consecutive elements per thread and step:
// packed(i) handles elements i .. i + N - 1 when `vectorized`, else single(i) handles element i.
// Indices are 64-bit (tensors of more than 2^31 elements). `Unroll` packed steps are unrolled so
// that their loads are in flight together (1 for bodies that already load several lists).
template <int N, int Unroll = 4, typename Packed, typename Single>
__device__ __forceinline__ void for_chunk_elements(int64_t start, int64_t end, bool vectorized,
                                                   Packed&& packed, Single&& single) {
  int64_t i = start;
  if (vectorized) {
    const int64_t stride = static_cast<int64_t>(blockDim.x) * N;
    const int64_t packed_end = start + (end - start) / N * N;
#pragma unroll Unroll
    for (int64_t j = start + static_cast<int64_t>(threadIdx.x) * N; j < packed_end; j += stride) packed(j);
    i = packed_end;  // the scalar tail
  }
  for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x) single(j);
}

// Every element of data[start, end) in the accumulation type, N per 16-byte access where the
// chunk is aligned: visit(x) with x by reference; with `Write`, x is stored back afterwards.
template <bool Write, typename T, typename Visit>
__device__ __forceinline__ void for_chunk_values(T* data, int64_t start, int64_t end, Visit&& visit) {
  using A = typename Accumulate<T>::type;
  constexpr int N = pack_width<T>();
  // A chunk that starts off a 16-byte boundary (an AGC unit, a tensor at an odd storage offset):
  // its first elements up to the boundary one per thread, then the rest 16 bytes at a time.
  const int64_t off_boundary = static_cast<int64_t>(reinterpret_cast<uintptr_t>(data + start) % 16 / sizeof(T));
  if (off_boundary != 0) {
    const int64_t head_end = start + (N - off_boundary < end - start ? N - off_boundary : end - start);
    for (int64_t j = start + threadIdx.x; j < head_end; j += blockDim.x) {
      A x = load_element<!Write, A>(data + j);
      visit(x);
      if constexpr (Write) store_element(data + j, x);
    }
    start = head_end;
  }
  for_chunk_elements<N>(
      start, end, pack_aligned<N>(data + start),
      [&](int64_t i) {
        A values[N];
        load_pack<N, !Write>(data + i, values);
#pragma unroll
        for (int k = 0; k < N; ++k) visit(values[k]);
        if constexpr (Write) store_pack<N>(data + i, values);
      },
      [&](int64_t i) {
        A x = load_element<!Write, A>(data + i);
        visit(x);
        if constexpr (Write) store_element(data + i, x);
      });
}

// body(data, start, end) for chunk c of list `list`: its tensor's data, typed by the tensor's
// dtype, and the chunk's elements [start, end).
template <typename Body>
__device__ __forceinline__ void with_chunk(const DeviceTable& table, int64_t list, int64_t c, Body&& body) {
  const int64_t tensor = column(table.chunk_tensor, c);
  dispatch_dtype(table_dtype(table, list, tensor), [&](auto tag) {
    body(table_pointer<decltype(tag)>(table, list, tensor), column(table.chunk_start, c), column(table.chunk_end, c));
  });
}

// The element type behind a data pointer given to a with_chunk body.
template <typename Pointer>
using ElementOf = std::remove_pointer_t<Pointer>;

// The chunks of a launch range, block by block (persistent grid).
template <typename Body>
__device__ __forceinline__ void for_each_chunk(const LaunchRange& range, Body&& body) {
  for (int64_t c = range.first_chunk + blockIdx.x; c < range.first_chunk + range.num_chunks; c += gridDim.x)
    body(c);
}

// Warp and block reductions in a fixed order (CUB's shuffle tree within a warp; its
// BLOCK_REDUCE_WARP_REDUCTIONS: each warp's result, then warp 0 over them, in warp order): the same
// inputs and block size give the same bits on every run.
template <typename A>
using WarpFold = cub::WarpReduce<A>;

// The block's combined value, valid in thread 0, for blocks of exactly Threads threads. Ends with
// a barrier, so `storage` may be reused right after.
template <int Threads, typename A>
using BlockFold = cub::BlockReduce<A, Threads, cub::BLOCK_REDUCE_WARP_REDUCTIONS>;

template <int Threads, typename A, typename Combine>
__device__ __forceinline__ A block_reduce(A value, typename BlockFold<Threads, A>::TempStorage& storage,
                                          Combine combine) {
  const A result = BlockFold<Threads, A>(storage).Reduce(value, combine);
  __syncthreads();
  return result;
}

// The last-block-arrives protocol: each block's thread 0 calls this once after its results are
// stored; true in the block that arrives last (count arrivals in all). acq_rel at device scope:
// the release publishes this thread's stores (and, through the barrier before it, its block's),
// the acquire makes every other block's published stores visible to the last block (its other
// threads see them after the barrier that follows). Counters are zeroed by the host before each
// launch (cudaMemsetAsync, captured into graphs too), so an aborted launch cannot poison the next.
__device__ __forceinline__ bool arrive_last(int* counter, int64_t count) {
  cuda::atomic_ref<int, cuda::thread_scope_device> arrivals(*counter);
  return arrivals.fetch_add(1, cuda::std::memory_order_acq_rel) + 1 == count;
}

// Blocks of `kernel` (at `threads` per block) that one multiprocessor holds at once.
template <typename Kernel>
int resident_blocks_per_multiprocessor(Kernel kernel, int threads) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the launch itself reports real problems
    blocks = 1;
  }
  return blocks > 0 ? blocks : 1;
}

// A persistent grid: one wave of resident blocks, or fewer when there are fewer chunks.
inline int persistent_grid(int blocks_per_multiprocessor, const LaunchRange& range) {
  const int64_t resident = static_cast<int64_t>(blocks_per_multiprocessor) * range.multiprocessors;
  return static_cast<int>(range.num_chunks < resident ? range.num_chunks : resident);
}

}  // namespace fastopt
