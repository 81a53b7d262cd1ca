// The interface between the torch side (host_runtime.cpp) and the kernels (*.cu): plain structs of raw
// device pointers and one launcher per kernel. No torch here, so the .cu files that include it
// compile with CUDA headers only (seconds, not minutes).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/element_math.h"

namespace fastopt {

// Per-tensor metadata in device memory (one int64 buffer, see host_runtime.cpp's TableCache), so that one
// launch covers any number of tensors: only these few pointers travel in the kernel arguments.
struct DeviceTable {
  const int64_t* addresses;  // [num_lists][num_tensors] data pointers (the column refreshed per call)
  const int64_t* dtypes;     // [num_lists][num_tensors] DType codes
  const int64_t* numels;     // [num_tensors]
  const int64_t* chunk_tensor;
  const int64_t* chunk_segment;
  const int64_t* chunk_start;
  const int64_t* chunk_end;  // [num_chunks] each
  const int64_t* segment_tensor;
  const int64_t* segment_first_chunk;
  const int64_t* segment_num_chunks;  // [num_segments] each
  // The segments of more than kWarpFoldChunks chunks, ascending: their partials are folded by a
  // block each (a warp folds the others), so a huge tensor's fold is not serial on one warp.
  const int64_t* large_segments;  // [num_large_segments]
  int64_t num_lists, num_tensors, num_chunks, num_segments, num_large_segments;

  template <typename T>
  FASTOPT_HD T* pointer(int64_t list, int64_t tensor) const {
    return reinterpret_cast<T*>(addresses[list * num_tensors + tensor]);
  }
  FASTOPT_HD DType dtype(int64_t list, int64_t tensor) const {
    return static_cast<DType>(dtypes[list * num_tensors + tensor]);
  }
};

// A float argument that is either a host value or a device scalar (read by the kernel, so the
// host never waits for it). dtype: the DType of *pointer.
struct ScalarArg {
  double value;
  const void* pointer;  // null: use value
  int64_t dtype;
};

// A range of chunks for one launch. The grid is persistent: as many blocks as the device holds
// at once (each kernel's occupancy times the multiprocessors), each walking chunks
// first_chunk + blockIdx.x, + gridDim.x, ...
struct LaunchRange {
  int64_t first_chunk;
  int64_t num_chunks;
  int multiprocessors;
};

// Pass 1 of every norm, the inf/nan check and the unscale, from one read of list 0:
// partials[c] = the accumulated norm contribution of chunk c (kind != kNoNorm; then partials
// may be null); *found_inf = 1 when an element is inf/nan (found_inf may be null); with
// `unscale`, each element is multiplied by `inv_scale` in place (the check sees it before) and
// the norm accumulates the unscaled value.
void launch_norm_partials(const DeviceTable& table, LaunchRange range, int64_t list, NormKind kind,
                          double p, double* partials, float* found_inf, bool unscale,
                          ScalarArg inv_scale, cudaStream_t stream);

// Pass 2 of a norm: norms[s] for every segment (when norms is non-null; a warp per segment, a
// block per large segment) and the total over all chunks (each block folds a fixed range of chunks
// into block_totals, the last block to arrive folds those), all in a fixed order: deterministic.
// block_totals: at least kMaxFinishBlocks doubles; arrival: one int, zeroed on `stream` here
// before the launch (so an aborted earlier launch cannot leave it wrong).
constexpr int kMaxFinishBlocks = 256;
void launch_norm_finish(const DeviceTable& table, const double* partials, NormKind kind, double p,
                        float* norms, float* total, double* block_totals, int* arrival,
                        int multiprocessors, cudaStream_t stream);

// t *= factor (a scalar, or segment_factors[segment of the element] when non-null) in list `list`.
void launch_scale(const DeviceTable& table, LaunchRange range, int64_t list, ScalarArg factor,
                  const double* segment_factors, cudaStream_t stream);

// t = clamp(t, -limit, limit) in list 0.
void launch_clamp(const DeviceTable& table, LaunchRange range, double limit, cudaStream_t stream);

// AGC pass 1: partials[c] and partials[num_chunks + c] for lists 0 (params) and 1 (grads).
void launch_pair_norm_partials(const DeviceTable& table, LaunchRange range, NormKind kind, double p,
                               double* partials, cudaStream_t stream);

// AGC pass 2: coefficients[s] = agc_coefficient of segment s's param and grad norms.
void launch_agc_coefficients(const DeviceTable& table, const double* partials, NormKind kind,
                             double p, double clip_factor, double eps, double* coefficients,
                             cudaStream_t stream);

// The AdamW update over lists (params, grads, exp_avgs, exp_avg_sqs, steps[, max_exp_avg_sqs]),
// all tensors of the range having the dtypes (param, grad, state); steps are 0-d tensors,
// incremented by the last block to finish each tensor (arrivals: one int32 per segment, zeroed by
// the caller on `stream` before the call's first launch). Nothing changes when *found_inf != 0.
struct AdamWArgs {
  ScalarArg lr, grad_scale, clip_coef;
  const float* found_inf;  // may be null
  double beta1, beta2, eps, weight_decay;
  bool maximize, amsgrad;
  bool decoupled_weight_decay;  // false: torch.optim.Adam's L2 term, weight_decay * param added to the grad
  int* arrivals;
};
bool adamw_supports(DType param, DType grad, DType state);
void launch_adamw(const DeviceTable& table, LaunchRange range, DType param, DType grad, DType state,
                  const AdamWArgs& args, cudaStream_t stream);

// The SGD update (torch.optim.SGD) over lists (params, grads[, momentum_buffers]): momentum
// buffers are there when `momentum_buffers` (a list of the table) is set; `first_step`: they are
// only written (set to the decayed grad). Without buffers, `state` is the param's dtype.
// Nothing changes when *found_inf != 0.
struct SGDArgs {
  ScalarArg lr, grad_scale, clip_coef;
  const float* found_inf;  // may be null
  double momentum, dampening, weight_decay;
  bool nesterov, maximize, momentum_buffers, first_step;
};
bool sgd_supports(DType param, DType grad, DType state);
void launch_sgd(const DeviceTable& table, LaunchRange range, DType param, DType grad, DType state,
                const SGDArgs& args, cudaStream_t stream);

// The Lion update over lists (params, grads, exp_avgs). Nothing changes when *found_inf != 0.
struct LionArgs {
  ScalarArg lr, grad_scale, clip_coef;
  const float* found_inf;  // may be null
  double beta1, beta2, weight_decay;
  bool maximize;
};
bool lion_supports(DType param, DType grad, DType state);
void launch_lion(const DeviceTable& table, LaunchRange range, DType param, DType grad, DType state,
                 const LionArgs& args, cudaStream_t stream);

// Threads per block of the chunk kernels, and elements per chunk (64 per thread).
constexpr int kThreads = 512;
constexpr int64_t kChunkSize = 32768;

// Segments of at most this many chunks have their partials folded by one warp (at most 32 loads
// per lane); larger ones by a block (DeviceTable::large_segments).
constexpr int64_t kWarpFoldChunks = 1024;

}  // namespace fastopt
