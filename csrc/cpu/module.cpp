// fastopt._cpu_torch<release>: the CPU backend's host side (torch tensors in, the loops of kernels.h run).
//
// Every op: the tensor lists become a chunk plan (../chunk_plan.h, the CUDA backend's planner)
// of blocks of at most kBlockSize elements of all tensors together; one at::parallel_for walks
// the blocks; reductions keep one partial per block and fold them on one thread in block order,
// so every result is bit-identical whatever the number of threads. Scalars that torch keeps in
// 0-d CPU tensors (lr, grad_scale, found_inf, ...) are read by fastopt/cpu.py on the host, which
// costs nothing on CPU. Non-contiguous tensors run on contiguous copies, copied back when written.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

#include "../chunk_plan.h"
#include "../element_math.h"
#include "kernels.h"
#include "step_plan.h"

namespace fastopt {
namespace cpu {
namespace {

using at::Tensor;

// Tensors as the loops see them: contiguous (a copy where needed, written back by finish()).
// Tensors written in place have their version bumped (autograd's check of saved tensors).
class Contiguous {
 public:
  Contiguous(const std::vector<Tensor>& tensors, bool written) {
    work_.reserve(tensors.size());
    for (const Tensor& t : tensors) {
      if (t.is_contiguous()) {
        work_.push_back(t);
        if (written) torch::autograd::impl::bump_version(t);
      } else {
        work_.push_back(t.contiguous());
        if (written) copied_.emplace_back(t, work_.back());
      }
    }
  }
  const Tensor& operator[](size_t i) const { return work_[i]; }
  size_t size() const { return work_.size(); }
  void* data(size_t i) const { return work_[i].data_ptr(); }
  // Copy the written copies back into the non-contiguous originals.
  void finish() {
    for (auto& [original, copy] : copied_) original.copy_(copy);
  }

 private:
  std::vector<Tensor> work_;
  std::vector<std::pair<Tensor, Tensor>> copied_;
};

std::vector<int64_t> numels_of(const std::vector<Tensor>& tensors) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const Tensor& t : tensors) numels.push_back(t.numel());
  return numels;
}

int64_t sum_of(const std::vector<int64_t>& values) {
  int64_t total = 0;
  for (int64_t v : values) total += v;
  return total;
}

// Run f(block) for every block of `plan` (total_elements in all); across threads when there is
// enough work to share. The threads claim work items from a shared counter, not fixed halves of
// the block range: blocks differ in size (a tensor's last block, the many small tensors of a
// layout), and a fixed split of them gave one thread 59% of a GPT-like step's elements; a thread
// slowed by another process also leaves its share to the others. A work item is a run of
// consecutive blocks of about kBlockSize elements in all, so small blocks cost one claim per item.
// f writes each block's result into that block's own slot, so who runs a block changes no bit.
template <typename F>
void for_blocks(const ChunkPlan& plan, int64_t total_elements, const F& f) {
  const int64_t num_blocks = plan.num_chunks();
  const int max_threads = at::get_num_threads();
  if (num_blocks <= 1 || total_elements < 2 * kBlockSize || max_threads <= 1 || at::in_parallel_region()) {
    for (int64_t b = 0; b < num_blocks; ++b) f(b);
    return;
  }
  std::vector<int64_t> item_ends;  // one past each work item's last block
  item_ends.reserve(total_elements / kBlockSize + 2);
  int64_t item_elements = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    item_elements += plan.chunk_end[b] - plan.chunk_start[b];
    if (item_elements >= kBlockSize || b + 1 == num_blocks) {
      item_ends.push_back(b + 1);
      item_elements = 0;
    }
  }
  const int64_t num_items = static_cast<int64_t>(item_ends.size());
  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, std::min<int64_t>(max_threads, num_items), 1, [&](int64_t, int64_t) {
    for (int64_t item = next_item.fetch_add(1, std::memory_order_relaxed); item < num_items;
         item = next_item.fetch_add(1, std::memory_order_relaxed))
      for (int64_t b = item == 0 ? 0 : item_ends[item - 1]; b < item_ends[item]; ++b) f(b);
  });
}

// Element pointer arithmetic on type-erased data.
inline void* offset(void* base, int64_t elements, int64_t element_size) {
  return static_cast<char*>(base) + elements * element_size;
}

template <typename F>
void dispatch_float_type(at::ScalarType type, const F& f) {
  switch (type) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kBFloat16:
      return f(BF16{});
    case at::kHalf:
      return f(F16{});
    default:
      TORCH_CHECK(false, "fastopt cpu backend: unsupported dtype ", type);
  }
}

// A scalar argument: a float, or the value of a 1-element CPU tensor of any floating dtype, read
// from memory here (no dispatcher call, no sync: it is host memory).
double scalar_value(double value, const std::optional<Tensor>& tensor) {
  if (!tensor.has_value()) return value;
  const Tensor& t = *tensor;
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), "fastopt cpu backend: a scalar tensor must be 1-element on CPU");
  switch (t.scalar_type()) {
    case at::kFloat:
      return *t.const_data_ptr<float>();
    case at::kDouble:
      return *t.const_data_ptr<double>();
    case at::kBFloat16:
      return float(*t.const_data_ptr<at::BFloat16>());
    case at::kHalf:
      return float(*t.const_data_ptr<at::Half>());
    default:
      TORCH_CHECK(false, "fastopt cpu backend: a scalar tensor must be floating, got ", t.scalar_type());
  }
}

// ------------------------------------------------------------------------------------ norm pass

using NormBlockFn = void (*)(void*, int64_t, double, double, double*, bool*);

template <int Kind, bool Unscale>
NormBlockFn norm_block_for(at::ScalarType type) {
  NormBlockFn fn = nullptr;
  dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    fn = [](void* x, int64_t n, double p, double scale, double* partial, bool* nonfinite) {
      norm_block<T, Kind, Unscale>(static_cast<T*>(x), n, p, scale, partial, nonfinite);
    };
  });
  return fn;
}

NormBlockFn norm_block_fn(NormKind kind, at::ScalarType type) {
  switch (kind) {
    case kSumAbs:
      return norm_block_for<kSumAbs, false>(type);
    case kSumSquares:
      return norm_block_for<kSumSquares, false>(type);
    case kSumPowers:
      return norm_block_for<kSumPowers, false>(type);
    case kMaxAbs:
      return norm_block_for<kMaxAbs, false>(type);
    default:
      return norm_block_for<kNoNorm, false>(type);
  }
}

struct NormPass {
  std::vector<double> partials;  // per block
  bool nonfinite = false;
};

// The norm pass over the blocks of `plan` (whose chunks index `tensors`).
// What a pass reads of one contiguous tensor: gathered in one visit of each tensor, so that the
// pass itself never touches a TensorImpl again (with thousands of small tensors, those visits are
// cache misses, the cost of a call).
struct TensorSpan {
  void* data;  // null when empty
  int64_t numel;
  at::ScalarType type;
  int64_t element_size;
};

std::vector<TensorSpan> spans_of(const Contiguous& tensors) {
  std::vector<TensorSpan> spans(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t numel = tensors[i].numel();
    spans[i] = {numel > 0 ? tensors.data(i) : nullptr, numel, tensors[i].scalar_type(), tensors[i].element_size()};
  }
  return spans;
}

NormPass run_norm_pass(const std::vector<TensorSpan>& spans, const ChunkPlan& plan, NormKind kind, double p,
                       bool unscale, double scale, int64_t total_elements) {
  const size_t count = spans.size();
  std::vector<NormBlockFn> fns(count);
  for (size_t i = 0; i < count; ++i) {
    // The unscale runs without a norm (unscale_and_check_); the check rides on its read.
    fns[i] = unscale ? norm_block_for<kNoNorm, true>(spans[i].type) : norm_block_fn(kind, spans[i].type);
  }
  NormPass pass;
  const int64_t num_blocks = plan.num_chunks();
  pass.partials.assign(num_blocks, 0.0);
  std::vector<uint8_t> nonfinite(num_blocks, 0);
  for_blocks(plan, total_elements, [&](int64_t b) {
    const int64_t t = plan.chunk_tensor[b], start = plan.chunk_start[b];
    bool bad = false;
    fns[t](offset(spans[t].data, start, spans[t].element_size), plan.chunk_end[b] - start, p, scale,
           &pass.partials[b], &bad);
    nonfinite[b] = bad;
  });
  for (uint8_t bad : nonfinite) pass.nonfinite |= bad != 0;
  return pass;
}

NormPass run_norm_pass(const Contiguous& tensors, const ChunkPlan& plan, NormKind kind, double p, bool unscale,
                       double scale, int64_t total_elements) {
  return run_norm_pass(spans_of(tensors), plan, kind, p, unscale, scale, total_elements);
}

// Fold the block partials of each segment, in block order.
std::vector<double> segment_partials(const ChunkPlan& plan, const std::vector<double>& partials, NormKind kind) {
  std::vector<double> out(plan.num_segments(), 0.0);
  for (int64_t s = 0; s < plan.num_segments(); ++s) {
    double acc = 0.0;
    const int64_t first = plan.segment_first_chunk[s];
    for (int64_t b = first; b < first + plan.segment_num_chunks[s]; ++b) acc = norm_combine(acc, partials[b], kind);
    out[s] = acc;
  }
  return out;
}

void set_flag(const std::optional<Tensor>& found_inf) {
  if (found_inf.has_value()) {
    *found_inf->data_ptr<float>() = 1.0f;
    torch::autograd::impl::bump_version(*found_inf);
  }
}

// --------------------------------------------------------------------------------------- ops

// The norms of the tensors behind `spans` (see multi_tensor_norm).
std::tuple<Tensor, Tensor> norm_of_spans(const std::vector<TensorSpan>& spans, double p, bool per_tensor,
                                         const std::optional<Tensor>& found_inf) {
  const NormKind kind = norm_kind(p);
  std::vector<int64_t> numels(spans.size());
  for (size_t i = 0; i < spans.size(); ++i) numels[i] = spans[i].numel;
  const ChunkPlan plan = plan_chunks(numels, {}, {}, kBlockSize, false);
  const NormPass pass = run_norm_pass(spans, plan, kind, p, false, 1.0, sum_of(numels));
  // With no units and one group, segment i is tensor i.
  const std::vector<double> per = segment_partials(plan, pass.partials, kind);
  double all = 0.0;
  for (double partial : per) all = norm_combine(all, partial, kind);
  Tensor total = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *total.data_ptr<float>() = float(norm_finish(all, kind, p));
  Tensor norms = at::empty({per_tensor ? int64_t(spans.size()) : 0}, at::TensorOptions().dtype(at::kFloat));
  if (per_tensor) {
    float* out = norms.data_ptr<float>();
    for (size_t i = 0; i < per.size(); ++i) out[i] = float(norm_finish(per[i], kind, p));
  }
  if (pass.nonfinite) set_flag(found_inf);
  return {total, norms};
}

std::tuple<Tensor, Tensor> multi_tensor_norm(const std::vector<Tensor>& tensors, double p, bool per_tensor,
                                             const std::optional<Tensor>& found_inf) {
  Contiguous work(tensors, false);
  return norm_of_spans(spans_of(work), p, per_tensor, found_inf);
}

void unscale_and_check_(const std::vector<Tensor>& tensors, double inv_scale_value,
                        const std::optional<Tensor>& inv_scale_tensor, const Tensor& found_inf) {
  const double inv_scale = scalar_value(inv_scale_value, inv_scale_tensor);
  Contiguous work(tensors, true);
  const std::vector<int64_t> numels = numels_of(tensors);
  const ChunkPlan plan = plan_chunks(numels, {}, {}, kBlockSize, false);
  const NormPass pass = run_norm_pass(work, plan, kNoNorm, 0.0, true, inv_scale, sum_of(numels));
  work.finish();
  if (pass.nonfinite) set_flag(found_inf);
}

// An element-wise op over every tensor: fn_for(dtype) gives the block function.
template <typename FnFor, typename Value>
void elementwise(const std::vector<Tensor>& tensors, const FnFor& fn_for, Value value) {
  Contiguous work(tensors, true);
  const std::vector<int64_t> numels = numels_of(tensors);
  const ChunkPlan plan = plan_chunks(numels, {}, {}, kBlockSize, false);
  using Fn = void (*)(void*, int64_t, double);
  std::vector<Fn> fns(tensors.size());
  std::vector<void*> data(tensors.size());
  std::vector<int64_t> sizes(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    fns[i] = fn_for(work[i].scalar_type());
    data[i] = numels[i] > 0 ? work.data(i) : nullptr;
    sizes[i] = work[i].element_size();
  }
  for_blocks(plan, sum_of(numels), [&](int64_t b) {
    const int64_t t = plan.chunk_tensor[b], start = plan.chunk_start[b];
    fns[t](offset(data[t], start, sizes[t]), plan.chunk_end[b] - start, value(t));
  });
  work.finish();
}

using ElementFn = void (*)(void*, int64_t, double);

ElementFn scale_fn(at::ScalarType type) {
  ElementFn fn = nullptr;
  dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    fn = [](void* x, int64_t n, double factor) { scale_block<T>(static_cast<T*>(x), n, factor); };
  });
  return fn;
}

ElementFn clamp_fn(at::ScalarType type) {
  ElementFn fn = nullptr;
  dispatch_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    fn = [](void* x, int64_t n, double limit) { clamp_block<T>(static_cast<T*>(x), n, limit); };
  });
  return fn;
}

void scale_(const std::vector<Tensor>& tensors, double coef_value, const std::optional<Tensor>& coef_tensor) {
  const double coef = scalar_value(coef_value, coef_tensor);
  elementwise(tensors, scale_fn, [coef](int64_t) { return coef; });
}

void clamp_(const std::vector<Tensor>& tensors, double clip_value) {
  elementwise(tensors, clamp_fn, [clip_value](int64_t) { return clip_value; });
}

void adaptive_clip_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, double clip_factor,
                    double eps, double p, bool unitwise) {
  const NormKind kind = norm_kind(p);
  Contiguous weights(params, false), work(grads, true);
  const std::vector<int64_t> numels = numels_of(grads);
  std::vector<int64_t> units(grads.size(), 1);
  for (size_t i = 0; i < grads.size(); ++i)
    if (unitwise && grads[i].dim() >= 2) units[i] = grads[i].size(0);
  const ChunkPlan plan = plan_chunks(numels, units, {}, kBlockSize, false);
  const int64_t total = sum_of(numels);
  // Pass 1: unit norms of weights and grads (two reads, one block pass each).
  const NormPass weight_pass = run_norm_pass(weights, plan, kind, p, false, 1.0, total);
  const NormPass grad_pass = run_norm_pass(work, plan, kind, p, false, 1.0, total);
  const std::vector<double> weight_partials = segment_partials(plan, weight_pass.partials, kind);
  const std::vector<double> grad_partials = segment_partials(plan, grad_pass.partials, kind);
  // One coefficient per unit, in the precision the reference forms it (fp32; fp64 with fp64).
  std::vector<double> coefs(plan.num_segments());
  for (int64_t s = 0; s < plan.num_segments(); ++s) {
    const int64_t t = plan.segment_tensor[s];
    const bool wide = params[t].scalar_type() == at::kDouble || grads[t].scalar_type() == at::kDouble;
    const double w = norm_finish(weight_partials[s], kind, p), g = norm_finish(grad_partials[s], kind, p);
    coefs[s] = wide ? agc_coefficient<double>(w, g, clip_factor, eps)
                    : double(agc_coefficient<float>(float(w), float(g), float(clip_factor), float(eps)));
  }
  // Pass 2: scale the grads of the units that are clipped.
  std::vector<ElementFn> fns(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) fns[i] = scale_fn(work[i].scalar_type());
  for_blocks(plan, total, [&](int64_t b) {
    const double coef = coefs[plan.chunk_segment[b]];
    if (coef == 1.0) return;
    const int64_t t = plan.chunk_tensor[b], start = plan.chunk_start[b];
    fns[t](offset(work.data(t), start, work[t].element_size()), plan.chunk_end[b] - start, coef);
  });
  work.finish();
}

// ----------------------------------------------------------------------------------------- AdamW

using AdamWBlockFn = void (*)(void*, const void*, void*, void*, void*, int64_t, const AdamWConstants<double>&,
                              double, double);

template <typename P, typename G, typename S>
AdamWBlockFn adamw_fn(bool amsgrad, bool scaled) {
#define FASTOPT_ADAMW_FN(AMS, SCALED)                                                                         \
  [](void* p, const void* g, void* m, void* v, void* vmax, int64_t n, const AdamWConstants<double>& c,       \
     double gs, double cc) {                                                                                  \
    adamw_block<P, G, S, AMS, SCALED>(static_cast<P*>(p), static_cast<const G*>(g), static_cast<S*>(m),      \
                                      static_cast<S*>(v), static_cast<S*>(vmax), n, c, gs, cc);              \
  }
  if (amsgrad) return scaled ? AdamWBlockFn(FASTOPT_ADAMW_FN(true, true)) : AdamWBlockFn(FASTOPT_ADAMW_FN(true, false));
  return scaled ? AdamWBlockFn(FASTOPT_ADAMW_FN(false, true)) : AdamWBlockFn(FASTOPT_ADAMW_FN(false, false));
#undef FASTOPT_ADAMW_FN
}

// The (param, grad, state) dtype combinations compiled, as the CUDA backend's (fastopt/cuda.py,
// ADAMW_BUILDS): fp64; fp32 params and states with fp32, bf16 or fp16 grads; bf16 / fp16 params
// with grads of their dtype or fp32 and states of their dtype or fp32. nullptr otherwise.
AdamWBlockFn adamw_fn_for(at::ScalarType p, at::ScalarType g, at::ScalarType s, bool amsgrad, bool scaled) {
  using at::kBFloat16;
  using at::kDouble;
  using at::kFloat;
  using at::kHalf;
  if (p == kDouble) return g == kDouble && s == kDouble ? adamw_fn<double, double, double>(amsgrad, scaled) : nullptr;
  if (p == kFloat) {
    if (s != kFloat) return nullptr;
    if (g == kFloat) return adamw_fn<float, float, float>(amsgrad, scaled);
    if (g == kBFloat16) return adamw_fn<float, BF16, float>(amsgrad, scaled);
    if (g == kHalf) return adamw_fn<float, F16, float>(amsgrad, scaled);
    return nullptr;
  }
  if (p == kBFloat16) {
    if (g == kBFloat16 && s == kBFloat16) return adamw_fn<BF16, BF16, BF16>(amsgrad, scaled);
    if (g == kBFloat16 && s == kFloat) return adamw_fn<BF16, BF16, float>(amsgrad, scaled);
    if (g == kFloat && s == kBFloat16) return adamw_fn<BF16, float, BF16>(amsgrad, scaled);
    if (g == kFloat && s == kFloat) return adamw_fn<BF16, float, float>(amsgrad, scaled);
    return nullptr;
  }
  if (p == kHalf) {
    if (g == kHalf && s == kHalf) return adamw_fn<F16, F16, F16>(amsgrad, scaled);
    if (g == kHalf && s == kFloat) return adamw_fn<F16, F16, float>(amsgrad, scaled);
    if (g == kFloat && s == kHalf) return adamw_fn<F16, float, F16>(amsgrad, scaled);
    if (g == kFloat && s == kFloat) return adamw_fn<F16, float, float>(amsgrad, scaled);
  }
  return nullptr;
}

// The block function of each tensor, decided before anything is written: a dtype combination not
// compiled raises NotImplementedError (fastopt/cpu.py then runs the reference).
std::vector<AdamWBlockFn> adamw_fns(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                                    const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                                    const std::vector<Tensor>& max_exp_avg_sqs, bool scaled) {
  const bool amsgrad = !max_exp_avg_sqs.empty();
  std::vector<AdamWBlockFn> fns(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::ScalarType s = exp_avgs[i].scalar_type();
    const bool same_states = exp_avg_sqs[i].scalar_type() == s && (!amsgrad || max_exp_avg_sqs[i].scalar_type() == s);
    fns[i] = same_states ? adamw_fn_for(params[i].scalar_type(), grads[i].scalar_type(), s, amsgrad, scaled) : nullptr;
    TORCH_CHECK_NOT_IMPLEMENTED(fns[i] != nullptr, "fastopt cpu backend: AdamW is not compiled for params ",
                                params[i].scalar_type(), ", grads ", grads[i].scalar_type(), ", states ", s);
  }
  return fns;
}

// The hyperparameters of one call, with the scalars read from their tensors.
struct AdamWCall {
  double lr, beta1, beta2, eps, weight_decay, grad_scale, clip_coef;
  bool scaled;  // grads go through grad_scale / clip_coef / maximize's sign
};

// Adds one to every step count (CPU scalars, read and written here) and gives each tensor its
// constants, in double. Equal counts (the usual case) share one computation of the powers.
// Adds one to a step count (a CPU scalar, float32 or float64) and returns the new count.
double advance_step(const Tensor& step) {
  double value;
  if (step.scalar_type() == at::kDouble) {
    double* data = step.data_ptr<double>();
    value = *data += 1.0;
  } else {
    float* data = step.data_ptr<float>();
    value = *data += 1.0f;
  }
  torch::autograd::impl::bump_version(step);
  return value;
}

// The per-tensor constants of a call by step count: equal counts in a row (the usual case) share
// one computation of the powers.
class ConstantsByStep {
 public:
  explicit ConstantsByStep(const AdamWCall& call) : call_(call) {}
  const AdamWConstants<double>& operator()(double step) {
    if (step != last_step_) {
      constants_ = adamw_constants<double>(call_.lr, call_.beta1, call_.beta2, call_.eps, call_.weight_decay, step);
      last_step_ = step;
    }
    return constants_;
  }

 private:
  const AdamWCall& call_;
  double last_step_ = -1.0;  // no step count is negative
  AdamWConstants<double> constants_{};
};

std::vector<AdamWConstants<double>> advance_steps(const std::vector<Tensor>& steps, const AdamWCall& call) {
  std::vector<AdamWConstants<double>> constants(steps.size());
  ConstantsByStep constants_by_step(call);
  for (size_t i = 0; i < steps.size(); ++i) constants[i] = constants_by_step(advance_step(steps[i]));
  return constants;
}

// Where one tensor's param, grad and states start, and their element sizes.
struct AdamWPointers {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;
  int64_t p_size, g_size, s_size;
};

void run_adamw_pass(const ChunkPlan& plan, int64_t total_elements, const std::vector<AdamWBlockFn>& fns,
                    const std::vector<AdamWPointers>& pointers, const std::vector<AdamWConstants<double>>& constants,
                    const AdamWCall& call) {
  for_blocks(plan, total_elements, [&](int64_t b) {
    const int64_t t = plan.chunk_tensor[b], start = plan.chunk_start[b];
    const AdamWPointers& q = pointers[t];
    fns[t](offset(q.p, start, q.p_size), offset(const_cast<void*>(q.g), start, q.g_size),
           offset(q.m, start, q.s_size), offset(q.v, start, q.s_size),
           q.vmax == nullptr ? nullptr : offset(q.vmax, start, q.s_size), plan.chunk_end[b] - start, constants[t],
           call.grad_scale, call.clip_coef);
  });
}

// A planned step's arguments as fastopt/cpu.py passes them (the scalars of adamw_).
struct AdamWArguments {
  double lr_value;
  std::optional<Tensor> lr_tensor;
  double beta1, beta2, eps, weight_decay;
  bool maximize;
  double grad_scale_value;
  std::optional<Tensor> grad_scale_tensor, found_inf;
  double clip_coef_value;
  std::optional<Tensor> clip_coef_tensor;
  bool has_grad_scale, has_clip_coef;
};

// The scalars of a call (value, or a 1-element CPU tensor) as numbers. maximize is folded into
// the grad scale's sign (-(g / s) == g / -s exactly); without grad_scale, clip_coef or maximize
// the grads are used as they are.
AdamWCall adamw_call(double lr_value, const std::optional<Tensor>& lr_tensor, double beta1, double beta2, double eps,
                     double weight_decay, bool maximize, double grad_scale_value,
                     const std::optional<Tensor>& grad_scale_tensor, double clip_coef_value,
                     const std::optional<Tensor>& clip_coef_tensor, bool has_grad_scale, bool has_clip_coef) {
  const double scale = has_grad_scale ? scalar_value(grad_scale_value, grad_scale_tensor) : 1.0;
  return {scalar_value(lr_value, lr_tensor),
          beta1,
          beta2,
          eps,
          weight_decay,
          maximize ? -scale : scale,
          has_clip_coef ? scalar_value(clip_coef_value, clip_coef_tensor) : 1.0,
          has_grad_scale || has_clip_coef || maximize};
}

bool skipped(const std::optional<Tensor>& found_inf) {
  return found_inf.has_value() && scalar_value(0.0, found_inf) != 0.0;
}

// One AdamW step. Scalars come as (value, tensor or None); a non-zero found_inf returns before
// anything is touched.
void adamw_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs,
            const std::vector<Tensor>& exp_avg_sqs, const std::vector<Tensor>& steps, double lr_value,
            const std::optional<Tensor>& lr_tensor, double beta1, double beta2, double eps, double weight_decay,
            bool maximize, const std::vector<Tensor>& max_exp_avg_sqs, double grad_scale_value,
            const std::optional<Tensor>& grad_scale_tensor, const std::optional<Tensor>& found_inf,
            double clip_coef_value, const std::optional<Tensor>& clip_coef_tensor, bool has_grad_scale,
            bool has_clip_coef) {
  if (skipped(found_inf)) return;  // no bit changes
  const AdamWCall call = adamw_call(lr_value, lr_tensor, beta1, beta2, eps, weight_decay, maximize, grad_scale_value,
                                    grad_scale_tensor, clip_coef_value, clip_coef_tensor, has_grad_scale, has_clip_coef);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const std::vector<AdamWBlockFn> fns = adamw_fns(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, call.scaled);
  const std::vector<AdamWConstants<double>> constants = advance_steps(steps, call);
  Contiguous p(params, true), g(grads, false), m(exp_avgs, true), v(exp_avg_sqs, true),
      vmax(amsgrad ? max_exp_avg_sqs : std::vector<Tensor>{}, true);
  const std::vector<int64_t> numels = numels_of(params);
  const ChunkPlan plan = plan_chunks(numels, {}, {}, kBlockSize, false);
  std::vector<AdamWPointers> pointers(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (numels[i] == 0) continue;
    pointers[i] = {p.data(i), g.data(i), m.data(i), v.data(i), amsgrad ? vmax.data(i) : nullptr,
                   p[i].element_size(), g[i].element_size(), m[i].element_size()};
  }
  run_adamw_pass(plan, sum_of(numels), fns, pointers, constants, call);
  p.finish();
  m.finish();
  v.finish();
  vmax.finish();
}

// adamw_ for lists that stay the same from step to step but for their grads (fastopt.optim's step
// plan; fastopt/cpu.py adamw_planned_): the chunk plan, the params' and states' addresses and the
// block functions are worked out once. A call reads the grads' addresses and dtypes (the caller
// has checked them: shapes and devices of the params, CPU, floating), from a Python list or from
// the plan's GradWatch (no Python object per grad), and runs the pass. Lists with a non-contiguous
// param or state are not planned (adamw_ copies those).
class AdamWPlan {
 public:
  AdamWPlan(std::vector<Tensor> params, const std::vector<Tensor>& grads, std::vector<Tensor> exp_avgs,
            std::vector<Tensor> exp_avg_sqs, std::vector<Tensor> max_exp_avg_sqs, std::vector<Tensor> steps)
      : params_(std::move(params)),
        exp_avgs_(std::move(exp_avgs)),
        exp_avg_sqs_(std::move(exp_avg_sqs)),
        max_exp_avg_sqs_(std::move(max_exp_avg_sqs)),
        steps_(std::move(steps)),
        numels_(numels_of(params_)),
        total_(sum_of(numels_)),
        chunks_(plan_chunks(numels_, {}, {}, kBlockSize, false)) {
    const bool amsgrad = !max_exp_avg_sqs_.empty();
    for (const auto* list : {&params_, &exp_avgs_, &exp_avg_sqs_, &max_exp_avg_sqs_})
      for (const Tensor& t : *list)
        TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "AdamWPlan: params and states must be contiguous CPU tensors");
    grad_types_.reserve(grads.size());
    for (const Tensor& g : grads) grad_types_.push_back(g.scalar_type());
    for (bool scaled : {false, true})
      fns_[scaled] = adamw_fns(params_, grads, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, scaled);
    pointers_.resize(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      if (numels_[i] == 0) continue;
      pointers_[i] = {params_[i].data_ptr(), nullptr, exp_avgs_[i].data_ptr(), exp_avg_sqs_[i].data_ptr(),
                      amsgrad ? max_exp_avg_sqs_[i].data_ptr() : nullptr, params_[i].element_size(), 0,
                      exp_avgs_[i].element_size()};
    }
  }

  // One step with the grads of a Python list. False, with nothing done, when a param is no longer
  // what the plan holds (``p.data = x`` moved or resized it): the caller builds a new plan.
  bool step_list(const pybind11::list& grads, const AdamWArguments& arguments) {
    TORCH_CHECK(size_t(PyList_GET_SIZE(grads.ptr())) == params_.size(), "AdamWPlan: one grad per param");
    return step([&](size_t i) -> const Tensor& {
      PyObject* item = PyList_GET_ITEM(grads.ptr(), i);
      TORCH_CHECK(THPVariable_Check(item), "AdamWPlan: grads must be tensors");
      return THPVariable_Unpack(item);
    }, arguments);
  }

  // The same with the grads of entries first, first + 1, ... of the step plan's GradWatch.
  bool step_watched(const GradWatch& watch, int64_t first, const AdamWArguments& arguments) {
    const std::vector<Tensor>& grads = watch.grads();
    TORCH_CHECK(first >= 0 && first + params_.size() <= grads.size(), "AdamWPlan: entries past the watch's");
    return step([&](size_t i) -> const Tensor& { return grads[first + i]; }, arguments);
  }

 private:
  template <typename GradAt>
  bool step(const GradAt& grad_at, const AdamWArguments& a) {
    if (skipped(a.found_inf)) return true;  // no bit changes
    const AdamWCall call = adamw_call(a.lr_value, a.lr_tensor, a.beta1, a.beta2, a.eps, a.weight_decay, a.maximize,
                                      a.grad_scale_value, a.grad_scale_tensor, a.clip_coef_value, a.clip_coef_tensor,
                                      a.has_grad_scale, a.has_clip_coef);
    // One read-only visit per tensor: the param still where the plan has it, the grad's address,
    // and the block functions again where a grad's dtype changed (this may raise: nothing is
    // written yet).
    std::vector<Tensor> copies;  // contiguous copies of non-contiguous grads, alive for the pass
    copies.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      const Tensor& p = params_[i];
      if (p.numel() != numels_[i] || (numels_[i] > 0 && p.const_data_ptr() != pointers_[i].p) || !p.is_contiguous())
        return false;
      const Tensor* g = &grad_at(i);
      TORCH_CHECK(g->defined(), "AdamWPlan: a grad is missing");
      if (g->scalar_type() != grad_types_[i]) retype(i, *g);
      if (numels_[i] == 0) continue;
      if (!g->is_contiguous()) {
        copies.push_back(g->contiguous());
        g = &copies.back();
      }
      pointers_[i].g = g->const_data_ptr();
      pointers_[i].g_size = g->element_size();
    }
    // One writing visit per tensor: its step count, its constants, the version counters of what
    // the pass updates in place.
    const bool amsgrad = !max_exp_avg_sqs_.empty();
    std::vector<AdamWConstants<double>> constants(params_.size());
    ConstantsByStep constants_by_step(call);
    for (size_t i = 0; i < params_.size(); ++i) {
      constants[i] = constants_by_step(advance_step(steps_[i]));
      torch::autograd::impl::bump_version(params_[i]);
      torch::autograd::impl::bump_version(exp_avgs_[i]);
      torch::autograd::impl::bump_version(exp_avg_sqs_[i]);
      if (amsgrad) torch::autograd::impl::bump_version(max_exp_avg_sqs_[i]);
    }
    run_adamw_pass(chunks_, total_, fns_[call.scaled], pointers_, constants, call);
    return true;
  }

  // A grad of another dtype than before: its block functions (raises, before any write, when the
  // combination is not compiled).
  void retype(size_t i, const Tensor& grad) {
    const std::vector<Tensor> one_param{params_[i]}, one_grad{grad}, one_m{exp_avgs_[i]}, one_v{exp_avg_sqs_[i]};
    const std::vector<Tensor> one_vmax = max_exp_avg_sqs_.empty() ? std::vector<Tensor>{}
                                                                   : std::vector<Tensor>{max_exp_avg_sqs_[i]};
    const AdamWBlockFn plain = adamw_fns(one_param, one_grad, one_m, one_v, one_vmax, false)[0];
    const AdamWBlockFn scaled = adamw_fns(one_param, one_grad, one_m, one_v, one_vmax, true)[0];
    fns_[false][i] = plain;
    fns_[true][i] = scaled;
    grad_types_[i] = grad.scalar_type();
  }

  std::vector<Tensor> params_, exp_avgs_, exp_avg_sqs_, max_exp_avg_sqs_, steps_;
  std::vector<int64_t> numels_;
  int64_t total_;
  ChunkPlan chunks_;
  std::vector<at::ScalarType> grad_types_;
  std::vector<AdamWBlockFn> fns_[2];  // without and with the grad scale
  std::vector<AdamWPointers> pointers_;
};

// multi_tensor_norm of the grads of some entries of the step plan's GradWatch (the ranges
// [first, first + count) of the lists on one device, in order), with no Python object per grad.
std::tuple<Tensor, Tensor> planned_norm(const GradWatch& watch, const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                        double p, bool per_tensor, const std::optional<Tensor>& found_inf) {
  const std::vector<Tensor>& grads = watch.grads();
  std::vector<TensorSpan> spans;
  bool contiguous = true;
  for (const auto& [first, count] : ranges) {
    TORCH_CHECK(first >= 0 && count >= 0 && size_t(first + count) <= grads.size(), "planned_norm: entries past the watch's");
    for (int64_t k = first; k < first + count; ++k) {
      const Tensor& g = grads[k];
      TORCH_CHECK(g.defined(), "planned_norm: a grad is missing");
      contiguous = contiguous && g.is_contiguous();
      const int64_t numel = g.numel();
      spans.push_back({numel > 0 ? const_cast<void*>(g.const_data_ptr()) : nullptr, numel, g.scalar_type(),
                       int64_t(g.element_size())});
    }
  }
  if (contiguous) return norm_of_spans(spans, p, per_tensor, found_inf);
  std::vector<Tensor> tensors;  // a strided grad: the general path, which reads a contiguous copy
  for (const auto& [first, count] : ranges) tensors.insert(tensors.end(), grads.begin() + first, grads.begin() + first + count);
  return multi_tensor_norm(tensors, p, per_tensor, found_inf);
}

}  // namespace
}  // namespace cpu
}  // namespace fastopt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  using namespace fastopt::cpu;
  module.doc() = "fastopt's CPU backend: multi-tensor norm, unscale, scale, clamp, AGC and AdamW (csrc/cpu)";
  module.attr("BLOCK_SIZE") = kBlockSize;
#ifdef FASTOPT_TORCH_VERSION
  module.attr("TORCH_VERSION") = FASTOPT_TORCH_VERSION;  // the torch it was built against (setup.py)
#endif
  module.def("multi_tensor_norm", &multi_tensor_norm, "norms of tensors: (total, per-tensor norms or empty)",
             pybind11::arg("tensors"), pybind11::arg("norm_type"), pybind11::arg("per_tensor"),
             pybind11::arg("found_inf"));
  module.def("unscale_and_check_", &unscale_and_check_, "t *= inv_scale; found_inf = 1 on inf/nan");
  module.def("scale_", &scale_, "t *= coef");
  module.def("clamp_", &clamp_, "clamp to [-clip_value, clip_value]");
  module.def("adaptive_clip_", &adaptive_clip_, "adaptive gradient clipping");
  module.def("adamw_", &adamw_, "one AdamW step (not skipped)");
  register_step_plan(module);  // GradWatch first: AdamWPlan and planned_norm take one
  pybind11::class_<AdamWArguments>(module, "AdamWArguments", "the scalars of one planned AdamW step")
      .def(pybind11::init<double, std::optional<at::Tensor>, double, double, double, double, bool, double,
                          std::optional<at::Tensor>, std::optional<at::Tensor>, double, std::optional<at::Tensor>,
                          bool, bool>());
  pybind11::class_<AdamWPlan>(module, "AdamWPlan", "adamw_ for lists that keep their params and states")
      .def(pybind11::init<std::vector<at::Tensor>, const std::vector<at::Tensor>&, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(),
           pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("exp_avgs"), pybind11::arg("exp_avg_sqs"),
           pybind11::arg("max_exp_avg_sqs"), pybind11::arg("steps"))
      .def("step_list", &AdamWPlan::step_list, "one AdamW step with these grads (checked by the caller)")
      .def("step_watched", &AdamWPlan::step_watched, "one AdamW step with the grads of a GradWatch's entries");
  module.def("planned_norm", &planned_norm, "multi_tensor_norm of the grads of a GradWatch's entries");
}
