// The norm pass: per-chunk partials of sum |g|^p (or max |g|), the inf/nan check and, for
// unscale_and_check_, the in-place unscale, all from one read of the tensors; then a fold that
// turns the partials, in a fixed order, into per-tensor norms and the total. No float atomics
// anywhere: the result is bit-identical from run to run.
#include <algorithm>

#include "multi_tensor.cuh"

namespace fastopt {
namespace {

// Compiled per norm kind and with / without the unscale, so the per-element loop has no branch.
template <NormKind kind, bool unscale>
__global__ void __launch_bounds__(kThreads)
    norm_partials_kernel(DeviceTable table, LaunchRange range, int64_t list, double p, double* partials,
                         float* found_inf, ScalarArg inv_scale_arg) {
  __shared__ typename BlockFold<kThreads, double>::TempStorage storage;
  const double inv_scale = unscale ? read_scalar(inv_scale_arg) : 1.0;
  const auto combine = [](double a, double b) { return norm_combine(a, b, kind); };
  for_each_chunk(range, [&](int64_t c) {
    double partial = 0.0;
    bool nonfinite = false;
    with_chunk(table, list, c, [&](auto* data, int64_t start, int64_t end) {
      using T = ElementOf<decltype(data)>;
      using A = typename Accumulate<T>::type;
      const A factor = static_cast<A>(inv_scale), power = static_cast<A>(p);
      A accumulated = A(0);
      // Checked before the unscale, as torch's _amp_foreach_non_finite_check_and_unscale_; the
      // norm sees the value as stored after it.
      const auto visit = [&](A& x) {
        nonfinite |= !is_finite(x);
        if constexpr (unscale) x = to_acc<A>(from_acc<T>(x * factor));
        if constexpr (kind != kNoNorm) accumulated = norm_combine(accumulated, norm_contribution(x, kind, power), kind);
      };
      for_chunk_values<unscale>(data, start, end, visit);
      partial = static_cast<double>(accumulated);
    });
    // A plain store of the same value from any block: no atomic needed, never cleared.
    if (__syncthreads_or(nonfinite) && threadIdx.x == 0 && found_inf != nullptr) *found_inf = 1.0f;
    if constexpr (kind != kNoNorm) {
      const double total = block_reduce<kThreads>(partial, storage, combine);
      if (threadIdx.x == 0) partials[c] = total;
    }
  });
}

constexpr int kFinishThreads = 512;

__global__ void __launch_bounds__(kFinishThreads)
    norm_finish_kernel(DeviceTable table, const double* partials, NormKind kind, double p, float* norms,
                       float* total, double* block_totals, int* arrival) {
  __shared__ typename BlockFold<kFinishThreads, double>::TempStorage storage;
  __shared__ typename WarpFold<double>::TempStorage warp_storage[kFinishThreads / 32];
  __shared__ bool last_block;
  const auto combine = [kind](double a, double b) { return norm_combine(a, b, kind); };
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (norms != nullptr) {
    // A warp per segment of at most kWarpFoldChunks chunks, over the whole grid.
    const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
    for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; s < table.num_segments;
         s += warps) {
      const int64_t count = column(table.segment_num_chunks, s);
      if (count > kWarpFoldChunks) continue;  // uniform over the warp
      const int64_t first = column(table.segment_first_chunk, s);
      double accumulated = 0.0;
      for (int64_t i = lane; i < count; i += 32) accumulated = combine(accumulated, __ldg(partials + first + i));
      accumulated = WarpFold<double>(warp_storage[warp]).Reduce(accumulated, combine);
      if (lane == 0) norms[s] = static_cast<float>(norm_finish(accumulated, kind, p));
    }
    // A block per larger segment (a 2^31-element tensor: 65,536 partials, 128 per thread).
    for (int64_t i = blockIdx.x; i < table.num_large_segments; i += gridDim.x) {
      const int64_t s = column(table.large_segments, i);
      const int64_t first = column(table.segment_first_chunk, s), count = column(table.segment_num_chunks, s);
      double accumulated = 0.0;
      for (int64_t c = threadIdx.x; c < count; c += blockDim.x)
        accumulated = combine(accumulated, __ldg(partials + first + c));
      accumulated = block_reduce<kFinishThreads>(accumulated, storage, combine);
      if (threadIdx.x == 0) norms[s] = static_cast<float>(norm_finish(accumulated, kind, p));
    }
  }
  // The total from every chunk's partial (more exact than the norm of the rounded norms): block b
  // folds its fixed share of the chunks, then the last block to arrive folds the blocks' results.
  const int64_t begin = table.num_chunks * blockIdx.x / gridDim.x;
  const int64_t end = table.num_chunks * (blockIdx.x + 1) / gridDim.x;
  double accumulated = 0.0;
  for (int64_t c = begin + threadIdx.x; c < end; c += blockDim.x) accumulated = combine(accumulated, __ldg(partials + c));
  accumulated = block_reduce<kFinishThreads>(accumulated, storage, combine);
  if (threadIdx.x == 0) {
    __stcg(&block_totals[blockIdx.x], accumulated);
    last_block = arrive_last(arrival, gridDim.x);  // release of the store above; acquire of the others'
  }
  __syncthreads();
  if (!last_block) return;
  accumulated = 0.0;
  for (int64_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) accumulated = combine(accumulated, __ldcg(&block_totals[b]));
  accumulated = block_reduce<kFinishThreads>(accumulated, storage, combine);
  if (threadIdx.x == 0) *total = static_cast<float>(norm_finish(accumulated, kind, p));
}

template <NormKind kind, bool unscale>
void launch_partials(const DeviceTable& table, LaunchRange range, int64_t list, double p, double* partials,
                     float* found_inf, ScalarArg inv_scale, cudaStream_t stream) {
  static const int per_multiprocessor =
      resident_blocks_per_multiprocessor(norm_partials_kernel<kind, unscale>, kThreads);
  FASTOPT_LAUNCH(persistent_grid(per_multiprocessor, range), kThreads, 0, stream, norm_partials_kernel<kind, unscale>)(
      table, range, list, p, partials, found_inf, inv_scale);
}

template <NormKind kind>
void launch_partials(const DeviceTable& table, LaunchRange range, int64_t list, double p, double* partials,
                     float* found_inf, bool unscale, ScalarArg inv_scale, cudaStream_t stream) {
  if (unscale) {
    launch_partials<kind, true>(table, range, list, p, partials, found_inf, inv_scale, stream);
  } else {
    launch_partials<kind, false>(table, range, list, p, partials, found_inf, inv_scale, stream);
  }
}

}  // namespace

void launch_norm_partials(const DeviceTable& table, LaunchRange range, int64_t list, NormKind kind,
                          double p, double* partials, float* found_inf, bool unscale,
                          ScalarArg inv_scale, cudaStream_t stream) {
  if (range.num_chunks == 0) return;
  switch (kind) {
    case kNoNorm: return launch_partials<kNoNorm>(table, range, list, p, partials, found_inf, unscale, inv_scale, stream);
    case kSumAbs: return launch_partials<kSumAbs>(table, range, list, p, partials, found_inf, unscale, inv_scale, stream);
    case kSumSquares:
      return launch_partials<kSumSquares>(table, range, list, p, partials, found_inf, unscale, inv_scale, stream);
    case kSumPowers:
      return launch_partials<kSumPowers>(table, range, list, p, partials, found_inf, unscale, inv_scale, stream);
    case kMaxAbs: return launch_partials<kMaxAbs>(table, range, list, p, partials, found_inf, unscale, inv_scale, stream);
  }
}

void launch_norm_finish(const DeviceTable& table, const double* partials, NormKind kind, double p,
                        float* norms, float* total, double* block_totals, int* arrival,
                        int multiprocessors, cudaStream_t stream) {
  // Enough blocks that neither the chunks per block nor the segments per warp run long; the
  // count depends only on the layout and the device, so the fold order (and result) is fixed.
  // (Per-tensor norms do not depend on the count: a segment's fold order is fixed by its size.)
  const int64_t warps_per_block = kFinishThreads / 32;
  int64_t blocks = table.num_chunks / 4096;
  if (norms != nullptr) {
    blocks = std::max(blocks, table.num_segments / (4 * warps_per_block));
    blocks = std::max(blocks, table.num_large_segments);
  }
  const int64_t most = std::min<int64_t>(multiprocessors, kMaxFinishBlocks);
  blocks = std::max<int64_t>(1, std::min(blocks, most));
  if (cudaMemsetAsync(arrival, 0, sizeof(int), stream) != cudaSuccess) return;  // reported by the launch check
  FASTOPT_LAUNCH(static_cast<int>(blocks), kFinishThreads, 0, stream, norm_finish_kernel)(
      table, partials, kind, p, norms, total, block_totals, arrival);
}

}  // namespace fastopt
