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
  __shared__ double scratch[32];
  const auto combine = [kind](double a, double b) { return norm_combine(a, b, kind); };
  for_each_chunk(range, [&](int64_t c) {
    for (int64_t list = 0; list < 2; ++list) {
      const double total = block_reduce(chunk_contribution(table, list, c, kind, p), 0.0, scratch, combine);
      if (threadIdx.x == 0) partials[list * table.num_chunks + c] = total;
    }
  });
}

constexpr int kCoefficientThreads = 256;

__global__ void __launch_bounds__(kCoefficientThreads)
    agc_coefficients_kernel(DeviceTable table, const double* partials, NormKind kind, double p, double clip_factor,
                            double eps, double* coefficients) {
  const auto combine = [kind](double a, double b) { return norm_combine(a, b, kind); };
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  // A warp per unit, the partials folded in a fixed order.
  for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; s < table.num_segments;
       s += warps) {
    const int64_t first = table.segment_first_chunk[s], count = table.segment_num_chunks[s];
    double weight = 0.0, grad = 0.0;
    for (int64_t i = lane; i < count; i += 32) {
      weight = combine(weight, partials[first + i]);
      grad = combine(grad, partials[table.num_chunks + first + i]);
    }
    weight = norm_finish(warp_reduce(weight, combine), kind, p);
    grad = norm_finish(warp_reduce(grad, combine), kind, p);
    // The norms in the accumulation type of the grads' math (fp32), as the reference forms them.
    if (lane == 0) {
      const DType dtype = table.dtype(1, table.segment_tensor[s]);
      coefficients[s] = dtype == kFloat64
                            ? agc_coefficient(weight, grad, clip_factor, eps)
                            : agc_coefficient(static_cast<float>(weight), static_cast<float>(grad),
                                              static_cast<float>(clip_factor), static_cast<float>(eps));
    }
  }
}

}  // namespace

void launch_pair_norm_partials(const DeviceTable& table, LaunchRange range, NormKind kind, double p,
                               double* partials, cudaStream_t stream) {
  if (range.num_chunks == 0) return;
  static const int per_multiprocessor = resident_blocks_per_multiprocessor(pair_norm_partials_kernel, kThreads);
  pair_norm_partials_kernel<<<persistent_grid(per_multiprocessor, range), kThreads, 0, stream>>>(table, range, kind,
                                                                                              p, partials);
}

void launch_agc_coefficients(const DeviceTable& table, const double* partials, NormKind kind,
                             double p, double clip_factor, double eps, double* coefficients,
                             cudaStream_t stream) {
  if (table.num_segments == 0) return;
  const int64_t warps_per_block = kCoefficientThreads / 32;
  const int64_t blocks = (table.num_segments + warps_per_block - 1) / warps_per_block;
  agc_coefficients_kernel<<<static_cast<int>(blocks < 65535 ? blocks : 65535), kCoefficientThreads, 0, stream>>>(
      table, partials, kind, p, clip_factor, eps, coefficients);
}

}  // namespace fastopt
