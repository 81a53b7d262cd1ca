// The multi-tensor machinery shared by the kernels: walking the device-side chunk table with a
// persistent grid, element loads and stores with fp32 (fp64) accumulation, 16-byte vector
// accesses where every pointer of a chunk allows them, and deterministic block reductions.
// CUDA headers only (see kernels.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace fastopt {

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
  double value = 0.0;
  dispatch_dtype(static_cast<DType>(arg.dtype), [&](auto tag) {
    using T = decltype(tag);
    value = to_acc<double>(*static_cast<const T*>(arg.pointer));
  });
  return value;
}

// N elements moved by one instruction (16 bytes for N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T values[N];
};

template <int N, typename T>
__device__ __forceinline__ bool pack_aligned(const T* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % (sizeof(T) * N) == 0;
}

template <int N, typename A, typename T>
__device__ __forceinline__ void load_pack(const T* pointer, A (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(pointer);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_acc<A>(pack.values[i]);
}

template <int N, typename A, typename T>
__device__ __forceinline__ void store_pack(T* pointer, const A (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.values[i] = from_acc<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(pointer) = pack;
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
  for_chunk_elements<N>(
      start, end, pack_aligned<N>(data + start),
      [&](int64_t i) {
        A values[N];
        load_pack<N>(data + i, values);
#pragma unroll
        for (int k = 0; k < N; ++k) visit(values[k]);
        if constexpr (Write) store_pack<N>(data + i, values);
      },
      [&](int64_t i) {
        A x = to_acc<A>(data[i]);
        visit(x);
        if constexpr (Write) data[i] = from_acc<T>(x);
      });
}

// body(data, start, end) for chunk c of list `list`: its tensor's data, typed by the tensor's
// dtype, and the chunk's elements [start, end).
template <typename Body>
__device__ __forceinline__ void with_chunk(const DeviceTable& table, int64_t list, int64_t c, Body&& body) {
  const int64_t tensor = table.chunk_tensor[c];
  dispatch_dtype(table.dtype(list, tensor), [&](auto tag) {
    body(table.pointer<decltype(tag)>(list, tensor), table.chunk_start[c], table.chunk_end[c]);
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

// Warp and block reductions in a fixed order (xor butterfly, then warp 0 over the warps' results):
// the same inputs give the same bits on every run.
template <typename A, typename Combine>
__device__ __forceinline__ A warp_reduce(A value, Combine combine) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value = combine(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// The block's combined value, valid in thread 0. `scratch`: at least 32 entries of shared memory.
// Ends with a barrier, so scratch may be reused right after.
template <typename A, typename Combine>
__device__ __forceinline__ A block_reduce(A value, A identity, A* scratch, Combine combine) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int num_warps = (blockDim.x + 31) / 32;
  value = warp_reduce(value, combine);
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  A result = identity;
  if (warp == 0) {
    result = warp_reduce(lane < num_warps ? scratch[lane] : identity, combine);
  }
  __syncthreads();
  return result;
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
