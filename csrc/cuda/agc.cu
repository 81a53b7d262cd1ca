// Adaptive gradient clipping: the unit-wise norms of params and grads from one pass (each chunk
// lies inside one unit, so its partials belong to exactly one unit), then one coefficient per
// unit; the grads are then scaled by their unit's coefficient (launch_scale, elementwise.cu).
#include "multi_tensor.cuh"

namespace fastopt {
namespace {

// This block's share of chunk c's norm contribution in list `list` (the block's sum, not reduced).
__device__ __forceinline__ double chunk_contribution(const DeviceTable& table, int64_t list, int64_t c,
                                                     NormKind kind, double p) {
  double partial = 0.0;
  with_chunk(table, list, c, [&](auto* data, int64_t start, int64_t end) {
    using A = typename Accumulate<ElementOf<decltype(data)>>::type;
    const A power = static_cast<A>(p);
    A accumulated = A(0);
    for_chunk_values<false>(data, start, end, [&](A& x) {
      accumulated = norm_combine(accumulated, norm_contribution(x, kind, power), kind);
    });
    partial = static_cast<double>(accumulated);
  });
  return partial;
}

__global__ void __launch_bounds__(kThreads)
    pair_norm_partials_kernel(DeviceTable table, LaunchRange range, NormKind kind, double p, double* partials) {
  __shared__ typename BlockFold<kThreads, double>::TempStorage storage;
  const auto combine = [kind](double a, double b) { return norm_combine(a, b, kind); };
  for_each_chunk(range, [&](int64_t c) {
    for (int64_t list = 0; list < 2; ++list) {
      const double total = block_reduce<kThreads>(chunk_contribution(table, list, c, kind, p), storage, combine);
      if (threadIdx.x == 0) partials[list * table.num_chunks + c] = total;
    }
  });
}

constexpr int kCoefficientThreads = 256;

// The coefficient of segment s from its folded param and grad norms (written by one thread).
__device__ __forceinline__ void write_coefficient(const DeviceTable& table, int64_t s, double weight, double grad,
                                                  NormKind kind, double p, double clip_factor, double eps,
                                                  double* coefficients) {
  weight = norm_finish(weight, kind, p);
  grad = norm_finish(grad, kind, p);
  // The norms in the accumulation type of the grads' math (fp32), as the reference forms them.
  const DType dtype = table_dtype(table, 1, column(table.segment_tensor, s));
  coefficients[s] = dtype == kFloat64
                        ? agc_coefficient(weight, grad, clip_factor, eps)
                        : agc_coefficient(static_cast<float>(weight), static_cast<float>(grad),
                                          static_cast<float>(clip_factor), static_cast<float>(eps));
}

__global__ void __launch_bounds__(kCoefficientThreads)
    agc_coefficients_kernel(DeviceTable table, const double* partials, NormKind kind, double p, double clip_factor,
                            double eps, double* coefficients) {
  using Fold = BlockFold<kCoefficientThreads, double>;
  __shared__ typename Fold::TempStorage storage;
  __shared__ typename WarpFold<double>::TempStorage warp_storage[kCoefficientThreads / 32];
  const auto combine = [kind](double a, double b) { return norm_combine(a, b, kind); };
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  // A warp per unit of at most kWarpFoldChunks chunks, the partials folded in a fixed order.
  for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; s < table.num_segments;
       s += warps) {
    const int64_t count = column(table.segment_num_chunks, s);
    if (count > kWarpFoldChunks) continue;  // uniform over the warp
    const int64_t first = column(table.segment_first_chunk, s);
    double weight = 0.0, grad = 0.0;
    for (int64_t i = lane; i < count; i += 32) {
      weight = combine(weight, __ldg(partials + first + i));
      grad = combine(grad, __ldg(partials + table.num_chunks + first + i));
    }
    weight = WarpFold<double>(warp_storage[warp]).Reduce(weight, combine);
    __syncwarp();
    grad = WarpFold<double>(warp_storage[warp]).Reduce(grad, combine);
    if (lane == 0) write_coefficient(table, s, weight, grad, kind, p, clip_factor, eps, coefficients);
  }
  // A block per larger unit (whole-tensor AGC of a huge tensor).
  for (int64_t i = blockIdx.x; i < table.num_large_segments; i += gridDim.x) {
    const int64_t s = column(table.large_segments, i);
    const int64_t first = column(table.segment_first_chunk, s), count = column(table.segment_num_chunks, s);
    double weight = 0.0, grad = 0.0;
    for (int64_t c = threadIdx.x; c < count; c += blockDim.x) {
      weight = combine(weight, __ldg(partials + first + c));
      grad = combine(grad, __ldg(partials + table.num_chunks + first + c));
    }
    weight = block_reduce<kCoefficientThreads>(weight, storage, combine);
    grad = block_reduce<kCoefficientThreads>(grad, storage, combine);
    if (threadIdx.x == 0) write_coefficient(table, s, weight, grad, kind, p, clip_factor, eps, coefficients);
  }
}

}  // namespace

void launch_pair_norm_partials(const DeviceTable& table, LaunchRange range, NormKind kind, double p,
                               double* partials, cudaStream_t stream) {
  if (range.num_chunks == 0) return;
  static const int per_multiprocessor = resident_blocks_per_multiprocessor(pair_norm_partials_kernel, kThreads);
  FASTOPT_LAUNCH(persistent_grid(per_multiprocessor, range), kThreads, 0, stream, pair_norm_partials_kernel)(
      table, range, kind, p, partials);
}

void launch_agc_coefficients(const DeviceTable& table, const double* partials, NormKind kind,
                             double p, double clip_factor, double eps, double* coefficients,
                             cudaStream_t stream) {
  if (table.num_segments == 0) return;
  const int64_t warps_per_block = kCoefficientThreads / 32;
  int64_t blocks = (table.num_segments + warps_per_block - 1) / warps_per_block;
  if (blocks < table.num_large_segments) blocks = table.num_large_segments;
  FASTOPT_LAUNCH(static_cast<int>(blocks < 65535 ? blocks : 65535), kCoefficientThreads, 0, stream,
                 agc_coefficients_kernel)(table, partials, kind, p, clip_factor, eps, coefficients);
}

}  // namespace fastopt
