// In-place element-wise passes over one list: scale (by a scalar, or by a per-segment factor for
// AGC's final pass) and symmetric clamp (clip_grad_value_). One read and one write per element.
#include "multi_tensor.cuh"

namespace fastopt {
namespace {

// x = op(x) for every element of list `list` in the range's chunks, math in the accumulation
// type; make_op(c) gives chunk c's op, so that what it reads per chunk is read once.
template <typename MakeOp>
__device__ __forceinline__ void transform_chunks(const DeviceTable& table, const LaunchRange& range,
                                                 int64_t list, MakeOp&& make_op) {
  for_each_chunk(range, [&](int64_t c) {
    const auto op = make_op(c);
    with_chunk(table, list, c, [&](auto* data, int64_t start, int64_t end) {
      for_chunk_values<true>(data, start, end, [&](auto& x) { x = op(x); });
    });
  });
}

__global__ void __launch_bounds__(kThreads)
    scale_kernel(DeviceTable table, LaunchRange range, int64_t list, ScalarArg factor_arg,
                 const double* segment_factors) {
  const double scalar = read_scalar(factor_arg);
  transform_chunks(table, range, list, [&](int64_t c) {
    const double factor = segment_factors != nullptr ? __ldg(segment_factors + column(table.chunk_segment, c)) : scalar;
    return [factor](auto x) { return x * static_cast<decltype(x)>(factor); };
  });
}

__global__ void __launch_bounds__(kThreads) clamp_kernel(DeviceTable table, LaunchRange range, double limit) {
  transform_chunks(table, range, 0, [limit](int64_t) {
    return [limit](auto x) { return clamp_symmetric(x, static_cast<decltype(x)>(limit)); };
  });
}

}  // namespace

void launch_scale(const DeviceTable& table, LaunchRange range, int64_t list, ScalarArg factor,
                  const double* segment_factors, cudaStream_t stream) {
  if (range.num_chunks == 0) return;
  static const int per_multiprocessor = resident_blocks_per_multiprocessor(scale_kernel, kThreads);
  FASTOPT_LAUNCH(persistent_grid(per_multiprocessor, range), kThreads, 0, stream, scale_kernel)(table, range, list,
                                                                                              factor, segment_factors);
}

void launch_clamp(const DeviceTable& table, LaunchRange range, double limit, cudaStream_t stream) {
  if (range.num_chunks == 0) return;
  static const int per_multiprocessor = resident_blocks_per_multiprocessor(clamp_kernel, kThreads);
  FASTOPT_LAUNCH(persistent_grid(per_multiprocessor, range), kThreads, 0, stream, clamp_kernel)(table, range, limit);
}

}  // namespace fastopt
