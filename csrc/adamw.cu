// The AdamW update: one read of p, g, m, v (and max v) and one write of p, m, v per element,
// with 1 / grad_scale * clip_coef applied to g on the fly, lr / grad_scale / clip_coef /
// found_inf / the step counts read on the device, and nothing at all written when found_inf != 0.
// Compiled per dtype combination (param, grad, state) so the inner loop has no dtype branches.
#include "multi_tensor.cuh"

namespace fastopt {
namespace {

enum AdamWList : int64_t { kParams = 0, kGrads = 1, kExpAvgs = 2, kExpAvgSqs = 3, kSteps = 4, kMaxExpAvgSqs = 5 };

// Elements per thread and step: 16-byte accesses for fp32 lists (8 bytes for bf16 / fp16).
constexpr int kAdamWPack = 4;

template <typename P, typename G, typename S>
__global__ void __launch_bounds__(kThreads) adamw_kernel(DeviceTable table, LaunchRange range, AdamWArgs args) {
  using A = typename Accumulate<P>::type;
  constexpr int N = kAdamWPack;
  // A skipped step changes no bit of params, states or step counts.
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  const double lr = read_scalar(args.lr);
  const A grad_scale = static_cast<A>(read_scalar(args.grad_scale));
  const A clip_coef = static_cast<A>(read_scalar(args.clip_coef));
  __shared__ double new_step;
  __shared__ AdamWConstants<A> constants;  // formed once per chunk by thread 0 (two fp64 pows)

  for_each_chunk(range, [&](int64_t c) {
    const int64_t tensor = table.chunk_tensor[c];
    const int64_t start = table.chunk_start[c], end = table.chunk_end[c];
    const bool step_is_double = table.dtype(kSteps, tensor) == kFloat64;
    if (threadIdx.x == 0) {
      new_step = step_is_double ? *table.pointer<double>(kSteps, tensor) + 1.0
                                : static_cast<double>(*table.pointer<float>(kSteps, tensor) + 1.0f);
      constants = adamw_constants<A>(lr, args.beta1, args.beta2, args.eps, args.weight_decay, new_step);
    }
    __syncthreads();

    P* param = table.pointer<P>(kParams, tensor);
    const G* grad = table.pointer<G>(kGrads, tensor);
    S* exp_avg = table.pointer<S>(kExpAvgs, tensor);
    S* exp_avg_sq = table.pointer<S>(kExpAvgSqs, tensor);
    S* max_exp_avg_sq = args.amsgrad ? table.pointer<S>(kMaxExpAvgSqs, tensor) : nullptr;
    const bool vectorized = pack_aligned<N>(param + start) && pack_aligned<N>(grad + start) &&
                            pack_aligned<N>(exp_avg + start) && pack_aligned<N>(exp_avg_sq + start) &&
                            (!args.amsgrad || pack_aligned<N>(max_exp_avg_sq + start));
    for_chunk_elements<N, 1>(
        start, end, vectorized,
        [&](int64_t i) {
          A p[N], g[N], m[N], v[N], v_max[N];
          load_pack<N>(param + i, p);
          load_pack<N>(grad + i, g);
          load_pack<N>(exp_avg + i, m);
          load_pack<N>(exp_avg_sq + i, v);
          if (args.amsgrad) load_pack<N>(max_exp_avg_sq + i, v_max);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            adamw_update(p[k], effective_grad(g[k], grad_scale, clip_coef, args.maximize), m[k], v[k],
                         args.amsgrad ? &v_max[k] : nullptr, constants);
          }
          store_pack<N>(param + i, p);
          store_pack<N>(exp_avg + i, m);
          store_pack<N>(exp_avg_sq + i, v);
          if (args.amsgrad) store_pack<N>(max_exp_avg_sq + i, v_max);
        },
        [&](int64_t i) {
          A p = to_acc<A>(param[i]), m = to_acc<A>(exp_avg[i]), v = to_acc<A>(exp_avg_sq[i]);
          A v_max = args.amsgrad ? to_acc<A>(max_exp_avg_sq[i]) : A(0);
          adamw_update(p, effective_grad(to_acc<A>(grad[i]), grad_scale, clip_coef, args.maximize), m, v,
                       args.amsgrad ? &v_max : nullptr, constants);
          param[i] = from_acc<P>(p);
          exp_avg[i] = from_acc<S>(m);
          exp_avg_sq[i] = from_acc<S>(v);
          if (args.amsgrad) max_exp_avg_sq[i] = from_acc<S>(v_max);
        });

    // The last block to finish a tensor's chunks writes its new step count: every block of the
    // tensor has read the old one by then (it arrives only after its update).
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t segment = table.chunk_segment[c];
      __threadfence();
      const int arrived = atomicAdd(&args.arrivals[segment], 1) + 1;
      if (arrived == table.segment_num_chunks[segment]) {
        if (step_is_double) {
          *table.pointer<double>(kSteps, tensor) = new_step;
        } else {
          *table.pointer<float>(kSteps, tensor) = static_cast<float>(new_step);
        }
        args.arrivals[segment] = 0;  // ready for the next call
      }
    }
  });
}

template <typename P, typename G, typename S>
void launch(const DeviceTable& table, LaunchRange range, const AdamWArgs& args, cudaStream_t stream) {
  static const int per_multiprocessor = resident_blocks_per_multiprocessor(adamw_kernel<P, G, S>, kThreads);
  adamw_kernel<P, G, S><<<persistent_grid(per_multiprocessor, range), kThreads, 0, stream>>>(table, range, args);
}

using Launcher = void (*)(const DeviceTable&, LaunchRange, const AdamWArgs&, cudaStream_t);

// The compiled combinations (param, grad, state): fp64 alone; fp32 params and states with fp32,
// bf16 or fp16 grads; bf16 / fp16 params with grads of their dtype or fp32, and states of their
// dtype or fp32. Others run on the reference backend (ops.cpp raises NotImplementedError).
Launcher find_launcher(DType param, DType grad, DType state) {
#define FASTOPT_ADAMW_CASE(P_CODE, G_CODE, S_CODE, P, G, S) \
  if (param == P_CODE && grad == G_CODE && state == S_CODE) return &launch<P, G, S>;
  FASTOPT_ADAMW_CASE(kFloat64, kFloat64, kFloat64, double, double, double)
  FASTOPT_ADAMW_CASE(kFloat32, kFloat32, kFloat32, float, float, float)
  FASTOPT_ADAMW_CASE(kFloat32, kBFloat16, kFloat32, float, __nv_bfloat16, float)
  FASTOPT_ADAMW_CASE(kFloat32, kFloat16, kFloat32, float, __half, float)
  FASTOPT_ADAMW_CASE(kBFloat16, kBFloat16, kBFloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
  FASTOPT_ADAMW_CASE(kBFloat16, kBFloat16, kFloat32, __nv_bfloat16, __nv_bfloat16, float)
  FASTOPT_ADAMW_CASE(kBFloat16, kFloat32, kFloat32, __nv_bfloat16, float, float)
  FASTOPT_ADAMW_CASE(kBFloat16, kFloat32, kBFloat16, __nv_bfloat16, float, __nv_bfloat16)
  FASTOPT_ADAMW_CASE(kFloat16, kFloat16, kFloat16, __half, __half, __half)
  FASTOPT_ADAMW_CASE(kFloat16, kFloat16, kFloat32, __half, __half, float)
  FASTOPT_ADAMW_CASE(kFloat16, kFloat32, kFloat32, __half, float, float)
  FASTOPT_ADAMW_CASE(kFloat16, kFloat32, kFloat16, __half, float, __half)
#undef FASTOPT_ADAMW_CASE
  return nullptr;
}

}  // namespace

bool adamw_supports(DType param, DType grad, DType state) { return find_launcher(param, grad, state) != nullptr; }

void launch_adamw(const DeviceTable& table, LaunchRange range, DType param, DType grad, DType state,
                  const AdamWArgs& args, cudaStream_t stream) {
  if (range.num_chunks == 0) return;
  find_launcher(param, grad, state)(table, range, args, stream);
}

}  // namespace fastopt
