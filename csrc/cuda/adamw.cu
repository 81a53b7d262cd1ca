// The AdamW update: one read of p, g, m, v (and max v) and one write of p, m, v per element,
// with 1 / grad_scale * clip_coef applied to g on the fly, lr / grad_scale / clip_coef /
// found_inf / the step counts read on the device, and nothing at all written when found_inf != 0.
// Compiled per dtype combination (param, grad, state) so the inner loop has no dtype branches, and
// with torch.optim.Adam's L2 weight decay (decoupled_weight_decay=False) as a build of its own.
#include "multi_tensor.cuh"

namespace fastopt {
namespace {

enum AdamWList : int64_t { kParams = 0, kGrads = 1, kExpAvgs = 2, kExpAvgSqs = 3, kSteps = 4, kMaxExpAvgSqs = 5 };

// Elements per thread and step: 16-byte accesses for fp32 and fp64 lists (8 bytes for bf16 / fp16;
// fp64 with AMSGrad one element, 8 bytes, which keeps it within 64 registers without spills).
template <typename P, bool Amsgrad>
constexpr __host__ __device__ int adamw_pack() { return sizeof(P) == 8 ? (Amsgrad ? 1 : 2) : 4; }

// Blocks of kThreads per multiprocessor that the register budget must allow (multi_tensor.cuh).
template <typename P>
constexpr __host__ __device__ int adamw_min_blocks() { return update_min_blocks<P>(); }

// element_math.h's adamw_update with its divisions by per-launch constants hoisted out of the
// element loop: g * (clip_coef / grad_scale) for g / grad_scale * clip_coef, and sqrt(v) times
// 1 / sqrt(1 - beta2^step) for the division by it (each within an ulp of the reference's order).
// One IEEE division per element is left (by the denominator), so the loop has no slow-path calls
// that would need registers. Same order of operations otherwise.
template <typename A>
struct HoistedConstants {
  A decay_factor, one_minus_beta1, beta2, one_minus_beta2, inv_bias_correction2_sqrt, eps, neg_step_size;
  A grad_factor;      // effective_grad's 1 / grad_scale * clip_coef, negated when maximizing
  A l2_weight_decay;  // Adam's L2 term (the L2 build); read from shared memory only there
};

// Volatile reads are never dropped: each build reads only the decay it uses.
template <bool L2, typename A>
__device__ __forceinline__ HoistedConstants<A> read_constants(const volatile HoistedConstants<A>& c) {
  return {L2 ? A(1) : c.decay_factor, c.one_minus_beta1, c.beta2, c.one_minus_beta2, c.inv_bias_correction2_sqrt,
          c.eps, c.neg_step_size, c.grad_factor, L2 ? c.l2_weight_decay : A(0)};
}

// Formed by thread 0 per chunk (two fp64 pows, device scalars read): nothing that these calls
// clobber stays live in the other threads' registers across them.
template <typename A>
__device__ __forceinline__ void form_constants(HoistedConstants<A>* out, double lr, const AdamWArgs& args, double step) {
  const AdamWConstants<A> c =
      adamw_constants<A>(lr, args.beta1, args.beta2, args.eps, args.weight_decay, step, args.decoupled_weight_decay);
  *out = {c.decay_factor,
          c.one_minus_beta1,
          c.beta2,
          c.one_minus_beta2,
          A(1) / c.bias_correction2_sqrt,
          c.eps,
          c.neg_step_size,
          static_cast<A>((args.maximize ? -1.0 : 1.0) * read_scalar(args.clip_coef) / read_scalar(args.grad_scale)),
          c.l2_weight_decay};
}

// The square root and the division of the update. IEEE sqrt.rn / div.rn keep a slow path for
// special operands that ptxas emits as a subroutine call, and the registers live across those
// calls spill under a 40-register budget. In fp32 (fp16 / bf16 tensors too): MUFU.SQRT
// (sqrt.approx.ftz, about 1 ulp; a denormal second moment reads as 0, which changes nothing since
// eps dominates the denominator) and __fdividef (within 2 ulp for |y| in [2^-126, 2^126]; y >= eps
// here; nan and inf still propagate). fp64 keeps IEEE sqrt and division.
__device__ __forceinline__ float update_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  float root;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(root) : "f"(x));
  return root;
#else  // a host compilation of the kernels (csrc/emulation)
  return std::sqrt(x);
#endif
}
__device__ __forceinline__ double update_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float divide(float x, float y) { return __fdividef(x, y); }
__device__ __forceinline__ double divide(double x, double y) { return x / y; }

// L2: torch.optim.Adam's weight decay, added to the grad (nvcc contracts it into one fma, as torch's
// CPU kernels fuse it), instead of AdamW's decay of the param.
template <bool L2, typename A>
__device__ __forceinline__ void adamw_update_hoisted(A& param, A grad, A& exp_avg, A& exp_avg_sq, bool amsgrad,
                                                     A& max_exp_avg_sq, const HoistedConstants<A>& c) {
  if constexpr (L2) {
    grad = l2_decayed_grad(grad, param, c.l2_weight_decay);
  } else {
    param *= c.decay_factor;
  }
  exp_avg = lerp(exp_avg, grad, c.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * grad * grad;
  A second_moment = exp_avg_sq;
  if (amsgrad) {
    max_exp_avg_sq = max_propagating_nan(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const A denom = update_sqrt(second_moment) * c.inv_bias_correction2_sqrt + c.eps;
  param += divide(c.neg_step_size * exp_avg, denom);
}

// Compiled with and without AMSGrad (`Amsgrad`): the max list's values and pointer take registers
// only in the build that uses them; L2 (Adam's weight decay) likewise, so AdamW's code is as before.
template <typename P, typename G, typename S, bool Amsgrad, bool L2>
__global__ void __launch_bounds__(kThreads, adamw_min_blocks<P>())
    adamw_kernel(DeviceTable table, LaunchRange range, AdamWArgs args) {
  using A = typename Accumulate<P>::type;
  constexpr int N = adamw_pack<P, Amsgrad>();
  // A skipped step changes no bit of params, states or step counts.
  if (args.found_inf != nullptr && load_global<true>(args.found_inf) != 0.0f) return;
  __shared__ double new_step;
  __shared__ HoistedConstants<A> constants;  // formed once per chunk by thread 0 (two fp64 pows)

  for_each_chunk(range, [&](int64_t c) {
    const int64_t tensor = column(table.chunk_tensor, c);
    const int64_t start = column(table.chunk_start, c), end = column(table.chunk_end, c);
    if (threadIdx.x == 0) {
      const bool step_is_double = table_dtype(table, kSteps, tensor) == kFloat64;
      // Steps pass between blocks (read by every block of a tensor, written by its last): L2 accesses.
      new_step = step_is_double ? __ldcg(table_pointer<double>(table, kSteps, tensor)) + 1.0
                                : static_cast<double>(__ldcg(table_pointer<float>(table, kSteps, tensor)) + 1.0f);
      form_constants(&constants, read_scalar(args.lr), args, new_step);
    }
    __syncthreads();

    // The chunk's elements by 32-bit offsets from its first element (a chunk has at most
    // kChunkSize elements): fewer registers than 64-bit indices into the whole tensor.
    P* param = table_pointer<P>(table, kParams, tensor) + start;
    const G* grad = table_pointer<G>(table, kGrads, tensor) + start;
    S* exp_avg = table_pointer<S>(table, kExpAvgs, tensor) + start;
    S* exp_avg_sq = table_pointer<S>(table, kExpAvgSqs, tensor) + start;
    S* max_exp_avg_sq = Amsgrad ? table_pointer<S>(table, kMaxExpAvgSqs, tensor) + start : nullptr;
    const int count = static_cast<int>(end - start);
    const bool vectorized = pack_aligned<N>(param) && pack_aligned<N>(grad) && pack_aligned<N>(exp_avg) &&
                            pack_aligned<N>(exp_avg_sq) && (!Amsgrad || pack_aligned<N>(max_exp_avg_sq));
    const int packed_end = vectorized ? count / N * N : 0;
    // The constants are re-read from shared memory where they are used (volatile), so that they
    // take no registers across the loop.
    const volatile HoistedConstants<A>& shared_constants = constants;
#pragma unroll 1
    for (int i = static_cast<int>(threadIdx.x) * N; i < packed_end; i += static_cast<int>(blockDim.x) * N) {
      A p[N], g[N], m[N], v[N], v_max[N];
      load_pack<N>(param + i, p);
      load_pack<N, /*ReadOnly=*/true>(grad + i, g);
      load_pack<N>(exp_avg + i, m);
      load_pack<N>(exp_avg_sq + i, v);
      if constexpr (Amsgrad) load_pack<N>(max_exp_avg_sq + i, v_max);
      const HoistedConstants<A> c = read_constants<L2>(shared_constants);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        adamw_update_hoisted<L2>(p[k], g[k] * c.grad_factor, m[k], v[k], Amsgrad, v_max[k], c);
      }
      store_pack<N>(param + i, p);
      store_pack<N>(exp_avg + i, m);
      store_pack<N>(exp_avg_sq + i, v);
      if constexpr (Amsgrad) store_pack<N>(max_exp_avg_sq + i, v_max);
    }
#pragma unroll 1
    for (int i = packed_end + static_cast<int>(threadIdx.x); i < count; i += static_cast<int>(blockDim.x)) {
      A p = load_element<false, A>(param + i), m = load_element<false, A>(exp_avg + i),
        v = load_element<false, A>(exp_avg_sq + i);
      A v_max = Amsgrad ? load_element<false, A>(max_exp_avg_sq + i) : A(0);
      const HoistedConstants<A> c = read_constants<L2>(shared_constants);
      adamw_update_hoisted<L2>(p, load_element<true, A>(grad + i) * c.grad_factor, m, v, Amsgrad, v_max, c);
      store_element(param + i, p);
      store_element(exp_avg + i, m);
      store_element(exp_avg_sq + i, v);
      if constexpr (Amsgrad) store_element(max_exp_avg_sq + i, v_max);
    }

    // The last block to finish a tensor's chunks writes its new step count: every block of the
    // tensor has read the old one by then (its thread 0 read it before the barriers that precede
    // its arrival, and the arrival's release / the last block's acquire order the write after).
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t segment = column(table.chunk_segment, c);
      if (arrive_last(&args.arrivals[segment], column(table.segment_num_chunks, segment))) {
        if (table_dtype(table, kSteps, tensor) == kFloat64) {
          __stcg(table_pointer<double>(table, kSteps, tensor), static_cast<double>(new_step));
        } else {
          __stcg(table_pointer<float>(table, kSteps, tensor), static_cast<float>(new_step));
        }
      }
    }
  });
}

template <typename P, typename G, typename S, bool Amsgrad, bool L2>
void launch_build(const DeviceTable& table, LaunchRange range, const AdamWArgs& args, cudaStream_t stream) {
  static const int per_multiprocessor =
      resident_blocks_per_multiprocessor(adamw_kernel<P, G, S, Amsgrad, L2>, kThreads);
  FASTOPT_LAUNCH(persistent_grid(per_multiprocessor, range), kThreads, 0, stream, adamw_kernel<P, G, S, Amsgrad, L2>)(
      table, range, args);
}

template <typename P, typename G, typename S>
void launch(const DeviceTable& table, LaunchRange range, const AdamWArgs& args, cudaStream_t stream) {
  // torch adds no L2 term when weight_decay is 0 (0 * an inf param would be nan): the plain build,
  // whose decay factor is then 1.
  const bool l2 = !args.decoupled_weight_decay && args.weight_decay != 0.0;
  if (args.amsgrad) {
    l2 ? launch_build<P, G, S, true, true>(table, range, args, stream)
       : launch_build<P, G, S, true, false>(table, range, args, stream);
  } else {
    l2 ? launch_build<P, G, S, false, true>(table, range, args, stream)
       : launch_build<P, G, S, false, false>(table, range, args, stream);
  }
}

using Launcher = void (*)(const DeviceTable&, LaunchRange, const AdamWArgs&, cudaStream_t);

// The compiled combinations (FASTOPT_UPDATE_COMBINATIONS). Others run on the reference backend
// (host_runtime.cpp raises NotImplementedError).
Launcher find_launcher(DType param, DType grad, DType state) {
#define FASTOPT_ADAMW_CASE(P_CODE, G_CODE, S_CODE, P, G, S) \
  if (param == P_CODE && grad == G_CODE && state == S_CODE) return &launch<P, G, S>;
  FASTOPT_UPDATE_COMBINATIONS(FASTOPT_ADAMW_CASE)
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
