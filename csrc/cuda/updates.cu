// SGD and Lion: one read of p, g (and the one state: SGD's momentum buffer, Lion's exp_avg) and one
// write of p (and the state) per element, through one kernel template whose per-element step is a
// functor (SGDStep, LionStep). lr / grad_scale / clip_coef / found_inf are read on the device, and
// nothing at all is written when found_inf != 0. Neither needs a step count, so their constants are
// per launch: every thread forms them once (no per-chunk constants, no arrival counters, as AdamW
// has). Compiled per dtype combination (param, grad, state), as AdamW.
#include "multi_tensor.cuh"

namespace fastopt {
namespace {

enum UpdateList : int64_t { kParams = 0, kGrads = 1, kStates = 2 };

// The effective grad, g / grad_scale * clip_coef (negated when maximizing), as g * (1 / grad_scale) *
// clip_coef: the same bits whenever grad_scale is a power of two (GradScaler's scales, 1), where
// 1 / grad_scale is exact and both forms round the same real number; within an ulp otherwise. A
// per-element IEEE division would bring its slow-path call, and the registers live across it spill
// under the 40-register budget. Each product is rounded on its own (rounded_product), as torch
// rounds the effective grad before the update uses it (nvcc may not contract it into the update).
template <typename A>
struct EffectiveGrad {
  A inv_grad_scale, clip_coef;
  bool maximize;

  __device__ EffectiveGrad(const ScalarArg& scale, const ScalarArg& clip, bool maximize_)
      : inv_grad_scale(static_cast<A>(1.0 / read_scalar(scale))), clip_coef(static_cast<A>(read_scalar(clip))),
        maximize(maximize_) {}
  __device__ __forceinline__ A operator()(A g) const {
    const A value = rounded_product(rounded_product(g, inv_grad_scale), clip_coef);
    return maximize ? -value : value;
  }
};

// torch.optim.SGD's step with torch's rounding (sgd_update_fused: each add with alpha one fma, as
// nvcc contracts torch's own CUDA kernels too). The momentum mode decides which lists the kernel
// reads: no buffers, buffers only written (the first step), buffers read and written. Weight decay
// and Nesterov change only arithmetic: uniform branches, not builds.
enum class Momentum { kNone, kFirstStep, kRunning };

template <typename A, Momentum Mode>
struct SGDStep {
  using Args = SGDArgs;
  static constexpr bool kReadsState = Mode == Momentum::kRunning;
  static constexpr bool kWritesState = Mode != Momentum::kNone;

  EffectiveGrad<A> grad;
  SGDConstants<A> c;
  bool weight_decay, nesterov;

  __device__ explicit SGDStep(const SGDArgs& args)
      : grad(args.grad_scale, args.clip_coef, args.maximize),
        c(sgd_constants<A>(read_scalar(args.lr), args.momentum, args.dampening, args.weight_decay)),
        weight_decay(args.weight_decay != 0.0),  // torch adds no 0 * param (an inf param would give nan)
        nesterov(args.nesterov) {}

  __device__ __forceinline__ void operator()(A& param, A g, A& buffer) const {
    constexpr bool First = Mode == Momentum::kFirstStep;
    A* const momentum_buffer = kWritesState ? &buffer : nullptr;
    g = grad(g);
    if (weight_decay) {
      nesterov ? sgd_update_fused<true, First, true>(param, g, momentum_buffer, c)
               : sgd_update_fused<true, First, false>(param, g, momentum_buffer, c);
    } else {
      nesterov ? sgd_update_fused<false, First, true>(param, g, momentum_buffer, c)
               : sgd_update_fused<false, First, false>(param, g, momentum_buffer, c);
    }
  }
};

// torch.lerp as torch's kernels round it: one fma, from the nearer end (what nvcc makes of torch's
// CUDA lerp, and what its CPU kernels do). Written out, so the host build of these kernels
// (csrc/emulation), which contracts nothing, rounds as the GPU does. The weight is per launch.
template <typename A>
__device__ __forceinline__ A torch_lerp(A start, A end, A weight) {
  return lerp_from_start(weight) ? lerp_fused<true>(start, end, weight) : lerp_fused<false>(start, end, weight);
}

// Lion's step: lion_update's order with torch's rounding, bit for bit as the reference. The lerps
// are torch_lerp (a plain lerp would round the direction's interpolation differently, and an
// interpolation that is 0 in one rounding is not in the other: a step of lr apart). The decayed
// param is rounded before the signed step is added, as torch's mul_ then add_ round it
// (rounded_product: nvcc may not contract the two); -lr * direction is exact (direction: +-1, 0).
template <typename A>
struct LionStep {
  using Args = LionArgs;
  static constexpr bool kReadsState = true;
  static constexpr bool kWritesState = true;

  EffectiveGrad<A> grad;
  LionConstants<A> c;

  __device__ explicit LionStep(const LionArgs& args)
      : grad(args.grad_scale, args.clip_coef, args.maximize),
        c(lion_constants<A>(read_scalar(args.lr), args.beta1, args.beta2, args.weight_decay)) {}

  __device__ __forceinline__ void operator()(A& param, A g, A& exp_avg) const {
    g = grad(g);
    const A direction = sign_of(torch_lerp(exp_avg, g, c.one_minus_beta1));
    param = rounded_product(param, c.decay_factor) + c.neg_lr * direction;
    exp_avg = torch_lerp(exp_avg, g, c.one_minus_beta2);
  }
};

// Elements per thread and step: 16-byte accesses for fp32 and fp64 params (8 bytes for bf16 / fp16).
template <typename P>
constexpr __host__ __device__ int update_pack() { return sizeof(P) == 8 ? 2 : 4; }

// One chunk at a time (persistent grid), N elements per thread and step where every list's chunk is
// aligned for its pack, one at a time otherwise and in the tail.
template <typename Step, typename P, typename G, typename S>
__global__ void __launch_bounds__(kThreads, update_min_blocks<P>())
    update_kernel(DeviceTable table, LaunchRange range, typename Step::Args args) {
  using A = typename Accumulate<P>::type;
  constexpr int N = update_pack<P>();
  // A skipped step changes no bit of params or states.
  if (args.found_inf != nullptr && load_global<true>(args.found_inf) != 0.0f) return;
  const Step step(args);

  for_each_chunk(range, [&](int64_t c) {
    const int64_t tensor = column(table.chunk_tensor, c);
    const int64_t start = column(table.chunk_start, c), end = column(table.chunk_end, c);
    // 32-bit offsets from the chunk's first element (a chunk has at most kChunkSize elements).
    P* param = table_pointer<P>(table, kParams, tensor) + start;
    const G* grad = table_pointer<G>(table, kGrads, tensor) + start;
    S* state = Step::kWritesState ? table_pointer<S>(table, kStates, tensor) + start : nullptr;
    const int count = static_cast<int>(end - start);
    const bool vectorized =
        pack_aligned<N>(param) && pack_aligned<N>(grad) && (!Step::kWritesState || pack_aligned<N>(state));
    const int packed_end = vectorized ? count / N * N : 0;
#pragma unroll 1
    for (int i = static_cast<int>(threadIdx.x) * N; i < packed_end; i += static_cast<int>(blockDim.x) * N) {
      A p[N], g[N], s[N] = {};
      load_pack<N>(param + i, p);
      load_pack<N, /*ReadOnly=*/true>(grad + i, g);
      if constexpr (Step::kReadsState) load_pack<N>(state + i, s);
#pragma unroll
      for (int k = 0; k < N; ++k) step(p[k], g[k], s[k]);
      store_pack<N>(param + i, p);
      if constexpr (Step::kWritesState) store_pack<N>(state + i, s);
    }
#pragma unroll 1
    for (int i = packed_end + static_cast<int>(threadIdx.x); i < count; i += static_cast<int>(blockDim.x)) {
      A p = load_element<false, A>(param + i), s = A(0);
      if constexpr (Step::kReadsState) s = load_element<false, A>(state + i);
      step(p, load_element<true, A>(grad + i), s);
      store_element(param + i, p);
      if constexpr (Step::kWritesState) store_element(state + i, s);
    }
  });
}

template <typename Step, typename P, typename G, typename S>
void launch_build(const DeviceTable& table, LaunchRange range, const typename Step::Args& args, cudaStream_t stream) {
  static const int per_multiprocessor = resident_blocks_per_multiprocessor(update_kernel<Step, P, G, S>, kThreads);
  FASTOPT_LAUNCH(persistent_grid(per_multiprocessor, range), kThreads, 0, stream, update_kernel<Step, P, G, S>)(
      table, range, args);
}

template <typename P, typename G, typename S>
void launch_sgd_combination(const DeviceTable& table, LaunchRange range, const SGDArgs& args, cudaStream_t stream) {
  using A = typename Accumulate<P>::type;
  if (!args.momentum_buffers) {
    // Without buffers the group key names the param's dtype as the state's: one build per (P, G).
    if constexpr (std::is_same_v<S, P>) launch_build<SGDStep<A, Momentum::kNone>, P, G, P>(table, range, args, stream);
  } else if (args.first_step) {
    launch_build<SGDStep<A, Momentum::kFirstStep>, P, G, S>(table, range, args, stream);
  } else {
    launch_build<SGDStep<A, Momentum::kRunning>, P, G, S>(table, range, args, stream);
  }
}

template <typename P, typename G, typename S>
void launch_lion_combination(const DeviceTable& table, LaunchRange range, const LionArgs& args, cudaStream_t stream) {
  launch_build<LionStep<typename Accumulate<P>::type>, P, G, S>(table, range, args, stream);
}

template <typename Args>
using Launcher = void (*)(const DeviceTable&, LaunchRange, const Args&, cudaStream_t);

Launcher<SGDArgs> find_sgd_launcher(DType param, DType grad, DType state) {
#define FASTOPT_SGD_CASE(P_CODE, G_CODE, S_CODE, P, G, S) \
  if (param == P_CODE && grad == G_CODE && state == S_CODE) return &launch_sgd_combination<P, G, S>;
  FASTOPT_UPDATE_COMBINATIONS(FASTOPT_SGD_CASE)
#undef FASTOPT_SGD_CASE
  return nullptr;
}

Launcher<LionArgs> find_lion_launcher(DType param, DType grad, DType state) {
#define FASTOPT_LION_CASE(P_CODE, G_CODE, S_CODE, P, G, S) \
  if (param == P_CODE && grad == G_CODE && state == S_CODE) return &launch_lion_combination<P, G, S>;
  FASTOPT_UPDATE_COMBINATIONS(FASTOPT_LION_CASE)
#undef FASTOPT_LION_CASE
  return nullptr;
}

}  // namespace

bool sgd_supports(DType param, DType grad, DType state) { return find_sgd_launcher(param, grad, state) != nullptr; }

void launch_sgd(const DeviceTable& table, LaunchRange range, DType param, DType grad, DType state,
                const SGDArgs& args, cudaStream_t stream) {
  if (range.num_chunks == 0) return;
  find_sgd_launcher(param, grad, state)(table, range, args, stream);
}

bool lion_supports(DType param, DType grad, DType state) { return find_lion_launcher(param, grad, state) != nullptr; }

void launch_lion(const DeviceTable& table, LaunchRange range, DType param, DType grad, DType state,
                 const LionArgs& args, cudaStream_t stream) {
  if (range.num_chunks == 0) return;
  find_lion_launcher(param, grad, state)(table, range, args, stream);
}

}  // namespace fastopt
