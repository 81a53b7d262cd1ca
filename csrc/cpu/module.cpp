// fastopt._cpu_torch<release>: the CPU backend's host side (torch tensors in, the loops of kernels.h run).
//
// Every op: the tensor lists become a chunk plan (../chunk_plan.h, the CUDA backend's planner)
// of blocks of at most kBlockSize elements of all tensors together; one at::parallel_for walks
// the blocks; reductions keep one partial per block and fold them on one thread in block order,
// so every result is bit-identical whatever the number of threads. Scalars that torch keeps in
// 0-d CPU tensors (lr, grad_scale, found_inf, ...) are read by fastopt/backends/cpu.py on the host, which
// costs nothing on CPU. Non-contiguous tensors run on contiguous copies, copied back when written.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/chunk_plan.h"
#include "../common/element_math.h"
#include "../common/tensor_refs.h"
#include "kernels.h"
#include "step_plan.h"
#include "update_blocks.h"

namespace fastopt {
namespace cpu {
namespace {

using at::Tensor;

// Tensors as the loops see them: contiguous (a copy where needed, written back by finish()).
// Tensors written in place have their version bumped (autograd's check of saved tensors). The
// tensors are borrowed (see tensor_refs.h); only the copies are owned.
class Contiguous {
 public:
  Contiguous(const TensorRefs& tensors, bool written) {
    work_.reserve(tensors.size());
    for (const Tensor& t : tensors) {
      if (t.is_contiguous()) {
        work_.push_back(&t);
        if (written) torch::autograd::impl::bump_version(t);
      } else {
        copies_.push_back(t.contiguous());
        work_.push_back(&copies_.back());
        if (written) copied_.emplace_back(&t, &copies_.back());
      }
    }
  }
  const Tensor& operator[](size_t i) const { return *work_[i]; }
  size_t size() const { return work_.size(); }
  void* data(size_t i) const { return work_[i]->data_ptr(); }
  // Copy the written copies back into the non-contiguous originals.
  void finish() {
    for (auto& [original, copy] : copied_) original->copy_(*copy);
  }

 private:
  std::vector<const Tensor*> work_;
  std::deque<Tensor> copies_;  // a deque: work_ points into it
  std::vector<std::pair<const Tensor*, const Tensor*>> copied_;
};

std::vector<int64_t> numels_of(const TensorRefs& tensors) {
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
// (TensorSpan, what a pass reads of one contiguous tensor, is in step_plan.h.)
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

// The norms of the tensors behind `spans` (see multi_tensor_norm), over `plan`, their chunks.
std::tuple<Tensor, Tensor> norm_of_spans(const std::vector<TensorSpan>& spans, const ChunkPlan& plan, int64_t total,
                                         double p, bool per_tensor, const std::optional<Tensor>& found_inf) {
  const NormKind kind = norm_kind(p);
  const NormPass pass = run_norm_pass(spans, plan, kind, p, false, 1.0, total);
  // With no units and one group, segment i is tensor i.
  const std::vector<double> per = segment_partials(plan, pass.partials, kind);
  double all = 0.0;
  for (double partial : per) all = norm_combine(all, partial, kind);
  Tensor total_norm = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  *total_norm.data_ptr<float>() = float(norm_finish(all, kind, p));
  Tensor norms = at::empty({per_tensor ? int64_t(spans.size()) : 0}, at::TensorOptions().dtype(at::kFloat));
  if (per_tensor) {
    float* out = norms.data_ptr<float>();
    for (size_t i = 0; i < per.size(); ++i) out[i] = float(norm_finish(per[i], kind, p));
  }
  if (pass.nonfinite) set_flag(found_inf);
  return {total_norm, norms};
}

std::vector<int64_t> numels_of(const std::vector<TensorSpan>& spans) {
  std::vector<int64_t> numels(spans.size());
  for (size_t i = 0; i < spans.size(); ++i) numels[i] = spans[i].numel;
  return numels;
}

std::tuple<Tensor, Tensor> multi_tensor_norm(const TensorRefs& tensors, double p, bool per_tensor,
                                             const std::optional<Tensor>& found_inf) {
  Contiguous work(tensors, false);
  const std::vector<TensorSpan> spans = spans_of(work);
  const std::vector<int64_t> numels = numels_of(spans);
  return norm_of_spans(spans, plan_chunks(numels, {}, {}, kBlockSize, false), sum_of(numels), p, per_tensor, found_inf);
}

void unscale_and_check_(const TensorRefs& tensors, double inv_scale_value,
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
void elementwise(const TensorRefs& tensors, const FnFor& fn_for, Value value) {
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

void scale_(const TensorRefs& tensors, double coef_value, const std::optional<Tensor>& coef_tensor) {
  const double coef = scalar_value(coef_value, coef_tensor);
  elementwise(tensors, scale_fn, [coef](int64_t) { return coef; });
}

void clamp_(const TensorRefs& tensors, double clip_value) {
  elementwise(tensors, clamp_fn, [clip_value](int64_t) { return clip_value; });
}

void adaptive_clip_(const TensorRefs& params, const TensorRefs& grads, double clip_factor,
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

// ------------------------------------------------------------------------------- update ops
//
// AdamW (and Adam's L2 variant), SGD and Lion share one machinery: the dtype combinations
// compiled, the block function of each tensor chosen before anything is written, one pass over
// the chunk plan's blocks, and the planned step of fastopt.optim (UpdatePlan). What differs is
// an op's traits (AdamWOp, SGDOp, LionOp): its state lists, its variant (the flags that are
// template arguments of its loop), its block functions (update_blocks.h) and its constants.

constexpr size_t kMaxStates = 3;  // the block functions' state pointers (update_blocks.h)

// A floating dtype (the ops have checked it) as element_math.h's code.
DType dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return kFloat16;
    case at::kBFloat16:
      return kBFloat16;
    case at::kFloat:
      return kFloat32;
    case at::kDouble:
      return kFloat64;
    default:
      TORCH_CHECK(false, "fastopt cpu backend: unsupported dtype ", type);
  }
}

// The block function of one tensor, given its states (all of one dtype; with none, as SGD without
// momentum, the param's dtype stands in). A combination not compiled raises NotImplementedError
// (fastopt/backends/cpu.py then runs the reference), always before anything is written.
template <typename Op>
typename Op::Fn update_fn(const Tensor& param, at::ScalarType grad_type, c10::ArrayRef<const Tensor*> states,
                          unsigned variant) {
  const at::ScalarType s = states.empty() ? param.scalar_type() : states[0]->scalar_type();
  bool same_states = true;
  for (const Tensor* state : states) same_states = same_states && state->scalar_type() == s;
  const typename Op::Fn fn =
      same_states ? Op::block_fn(dtype_code(param.scalar_type()), dtype_code(grad_type), dtype_code(s), variant) : nullptr;
  TORCH_CHECK_NOT_IMPLEMENTED(fn != nullptr, "fastopt cpu backend: ", Op::kName, " is not compiled for params ",
                              param.scalar_type(), ", grads ", grad_type, ", states ", s);
  return fn;
}

template <typename Op>
std::vector<typename Op::Fn> update_fns(const TensorRefs& params, const TensorRefs& grads,
                                        const std::vector<const TensorRefs*>& states, unsigned variant) {
  std::vector<typename Op::Fn> fns(params.size());
  const Tensor* at[kMaxStates];  // the states of tensor i: one tensor of each state list
  for (size_t i = 0; i < params.size(); ++i) {
    for (size_t k = 0; k < states.size(); ++k) at[k] = &(*states[k])[i];
    fns[i] = update_fn<Op>(params[i], grads[i].scalar_type(), c10::ArrayRef<const Tensor*>(at, states.size()), variant);
  }
  return fns;
}

// Where one tensor's param, grad and states start, and their element sizes.
struct UpdatePointers {
  void* p;
  const void* g;
  void* s[kMaxStates];  // null past the op's states
  int64_t p_size, g_size, s_size;
};

// One pass of an update over every block. Tensor t's constants are constants[which[t]], or
// constants[0] when `which` is empty.
template <typename Fn, typename Constants>
void run_update_pass(const ChunkPlan& plan, int64_t total_elements, const std::vector<Fn>& fns,
                     const std::vector<UpdatePointers>& pointers, const std::vector<Constants>& constants,
                     const std::vector<uint32_t>& which, double grad_scale, double clip_coef) {
  const bool shared = which.empty();
  for_blocks(plan, total_elements, [&](int64_t b) {
    const int64_t t = plan.chunk_tensor[b], start = plan.chunk_start[b];
    const UpdatePointers& q = pointers[t];
    void* s[kMaxStates];
    for (size_t k = 0; k < kMaxStates; ++k) s[k] = q.s[k] == nullptr ? nullptr : offset(q.s[k], start, q.s_size);
    fns[t](offset(q.p, start, q.p_size), offset(const_cast<void*>(q.g), start, q.g_size), s[0], s[1], s[2],
           plan.chunk_end[b] - start, constants[shared ? 0 : which[t]], grad_scale, clip_coef);
  });
}

// The step-wide scalars of an update, read: maximize is folded into the grad scale's sign
// (-(g / s) == g / -s exactly); without grad_scale, clip_coef or maximize the grads are used as
// they are (not scaled). divides: the loops divide by grad_scale, which has no exact inverse
// (else they multiply by the inverse: the same bits, and a division costs several multiplies).
struct StepScalars {
  double lr, grad_scale, clip_coef;
  bool scaled, divides;
};

// The step-wide scalars as fastopt/backends/cpu.py passes them: (value, tensor or None).
struct StepArguments {
  double lr_value;
  std::optional<Tensor> lr_tensor;
  bool maximize;
  double grad_scale_value;
  std::optional<Tensor> grad_scale_tensor, found_inf;
  double clip_coef_value;
  std::optional<Tensor> clip_coef_tensor;
  bool has_grad_scale, has_clip_coef;

  // A non-zero found_inf: the step changes no bit.
  bool skipped() const { return found_inf.has_value() && scalar_value(0.0, found_inf) != 0.0; }

  StepScalars read() const {
    const double scale = has_grad_scale ? scalar_value(grad_scale_value, grad_scale_tensor) : 1.0;
    const bool scaled = has_grad_scale || has_clip_coef || maximize;
    return {scalar_value(lr_value, lr_tensor), maximize ? -scale : scale,
            has_clip_coef ? scalar_value(clip_coef_value, clip_coef_tensor) : 1.0, scaled,
            scaled && !has_exact_inverse(scale)};
  }
};

// Each op's arguments: the step's scalars and the op's own hyperparameters.
struct AdamWArguments {
  StepArguments step;
  double beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay;
};

struct SGDArguments {
  StepArguments step;
  double momentum, dampening, weight_decay;
  bool nesterov, first_step;
};

struct LionArguments {
  StepArguments step;
  double beta1, beta2, weight_decay;
};

// Adds one to a step count (a CPU scalar, float32 or float64) and returns the new count.
// A step count (a float32 or float64 tensor, as torch keeps it), incremented in place: where it is
// and its version counter are read once, so that a plan's step touches no TensorImpl of it.
struct StepCounter {
  void* data;
  bool is_double;
  c10::VariableVersion version;

  explicit StepCounter(const Tensor& step)
      : data(step.data_ptr()),
        is_double(step.scalar_type() == at::kDouble),
        version(step.unsafeGetTensorImpl()->version_counter()) {}

  void prefetch() const {
    prefetch::lines(data, 1, /*for_write=*/true);
    prefetch::version(version);
  }

  double advance() {
    version.bump();
    return is_double ? (*static_cast<double*>(data) += 1.0) : double(*static_cast<float*>(data) += 1.0f);
  }
};

std::vector<StepCounter> counters_of(const TensorRefs& steps) {
  std::vector<StepCounter> counters;
  counters.reserve(steps.size());
  for (const Tensor& step : steps) counters.emplace_back(step);
  return counters;
}

// ------------------------------------------------------------------------------------ the ops

// AdamW; with decoupled_weight_decay=False, Adam (L2: the decay added to the grad). States:
// exp_avg, exp_avg_sq and, with AMSGrad, max_exp_avg_sq. Constants per tensor, from its step.
struct AdamWOp {
  using Constants = AdamWConstants<double>;
  using Fn = UpdateBlockFn<Constants>;
  using Arguments = AdamWArguments;
  static constexpr const char* kName = "AdamW";
  static constexpr auto block_fn = adamw_block_fn;

  // Torch skips a zero weight decay; so does the L2 loop (0 * a nan param would reach the grad).
  static unsigned variant(const Arguments& a, const StepScalars& scalars, size_t num_states) {
    using namespace adamw_variant;
    return (num_states == 3 ? kAMSGrad : 0) | (scalars.scaled ? kScaled : 0) | (scalars.divides ? kScaleDivides : 0) |
           (!a.decoupled_weight_decay && a.weight_decay != 0.0 ? kL2 : 0);
  }

  // Advances every step count and gives each tensor its constants, in double. Equal counts in a
  // row (the usual case) share one computation of the powers.
  // Advances every step count; one set of constants per distinct count (which[i]: tensor i's).
  static std::vector<Constants> constants(const Arguments& a, const StepScalars& scalars,
                                          std::vector<StepCounter>& steps, std::vector<uint32_t>& which) {
    std::vector<Constants> constants;
    std::vector<double> counts;  // of `constants`, in order: a model's counts are all equal or few
    which.resize(steps.size());
    prefetch::pipelined(
        steps.size(),
        [&](size_t i) {
          const double step = steps[i].advance();
          if (counts.empty() || counts.back() != step) {
            // (searched among a few only: counts all different would make this quadratic)
            const auto known = counts.size() <= 16 ? std::find(counts.begin(), counts.end(), step) : counts.end();
            if (known != counts.end()) {
              which[i] = uint32_t(known - counts.begin());
              return;
            }
            counts.push_back(step);
            constants.push_back(adamw_constants<double>(scalars.lr, a.beta1, a.beta2, a.eps, a.weight_decay, step,
                                                        a.decoupled_weight_decay));
          }
          which[i] = uint32_t(counts.size() - 1);
        },
        [&](size_t i) { steps[i].prefetch(); });
    return constants;
  }
};

// SGD; the state, with momentum only, is the momentum buffer. One set of constants.
struct SGDOp {
  using Constants = SGDConstants<double>;
  using Fn = UpdateBlockFn<Constants>;
  using Arguments = SGDArguments;
  static constexpr const char* kName = "SGD";
  static constexpr auto block_fn = sgd_block_fn;

  // Torch skips a zero weight decay (0 * a nan param would reach the grad); so does the loop.
  static unsigned variant(const Arguments& a, const StepScalars& scalars, size_t num_states) {
    using namespace sgd_variant;
    const bool momentum = num_states == 1;
    TORCH_CHECK(momentum == (a.momentum != 0.0), "SGD: momentum buffers go with a non-zero momentum, and only then");
    return (momentum ? kMomentum : 0) | (momentum && a.first_step ? kFirst : 0) |
           (momentum && a.nesterov ? kNesterov : 0) | (a.weight_decay != 0.0 ? kWeightDecay : 0) |
           (scalars.scaled ? kScaled : 0) | (scalars.divides ? kScaleDivides : 0);
  }

  static std::vector<Constants> constants(const Arguments& a, const StepScalars& scalars, std::vector<StepCounter>&,
                                          std::vector<uint32_t>& which) {
    which.clear();
    return {sgd_constants<double>(scalars.lr, a.momentum, a.dampening, a.weight_decay)};
  }
};

// Lion; the state is its momentum (exp_avg). One set of constants.
struct LionOp {
  using Constants = LionConstants<double>;
  using Fn = UpdateBlockFn<Constants>;
  using Arguments = LionArguments;
  static constexpr const char* kName = "Lion";
  static constexpr auto block_fn = lion_block_fn;

  static unsigned variant(const Arguments&, const StepScalars& scalars, size_t) {
    using namespace lion_variant;
    return (scalars.scaled ? kScaled : 0) | (scalars.divides ? kScaleDivides : 0);
  }

  static std::vector<Constants> constants(const Arguments& a, const StepScalars& scalars, std::vector<StepCounter>&,
                                          std::vector<uint32_t>& which) {
    which.clear();
    return {lion_constants<double>(scalars.lr, a.beta1, a.beta2, a.weight_decay)};
  }
};

// One step of an update op on lists (non-contiguous tensors run on contiguous copies, copied back).
// states: the op's state lists, in its block function's order; steps: AdamW's step counts. A
// non-zero found_inf returns before anything is touched; so does a dtype combination not compiled.
template <typename Op>
void update_(const TensorRefs& params, const TensorRefs& grads, const std::vector<const TensorRefs*>& states,
             const TensorRefs& steps, const typename Op::Arguments& a) {
  if (a.step.skipped()) return;  // no bit changes
  const StepScalars scalars = a.step.read();
  const unsigned variant = Op::variant(a, scalars, states.size());
  const std::vector<typename Op::Fn> fns = update_fns<Op>(params, grads, states, variant);
  std::vector<StepCounter> counters = counters_of(steps);
  std::vector<uint32_t> which;
  const std::vector<typename Op::Constants> constants = Op::constants(a, scalars, counters, which);
  Contiguous p(params, true), g(grads, false);
  std::vector<Contiguous> s;
  s.reserve(states.size());
  for (const TensorRefs* list : states) s.emplace_back(*list, true);
  const std::vector<int64_t> numels = numels_of(params);
  const ChunkPlan plan = plan_chunks(numels, {}, {}, kBlockSize, false);
  std::vector<UpdatePointers> pointers(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (numels[i] == 0) continue;
    UpdatePointers& q = pointers[i];
    q = {p.data(i), g.data(i), {nullptr, nullptr, nullptr}, p[i].element_size(), g[i].element_size(), 0};
    for (size_t k = 0; k < s.size(); ++k) q.s[k] = s[k].data(i);
    if (!s.empty()) q.s_size = s[0][i].element_size();
  }
  run_update_pass(plan, sum_of(numels), fns, pointers, constants, which, scalars.grad_scale, scalars.clip_coef);
  p.finish();
  for (Contiguous& list : s) list.finish();
}

void adamw_(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& exp_avgs,
            const TensorRefs& exp_avg_sqs, const TensorRefs& steps, const TensorRefs& max_exp_avg_sqs,
            const AdamWArguments& arguments) {
  std::vector<const TensorRefs*> states{&exp_avgs, &exp_avg_sqs};
  if (!max_exp_avg_sqs.empty()) states.push_back(&max_exp_avg_sqs);
  update_<AdamWOp>(params, grads, states, steps, arguments);
}

// momentum_buffers: empty without momentum.
void sgd_(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& momentum_buffers,
          const SGDArguments& arguments) {
  std::vector<const TensorRefs*> states;
  if (!momentum_buffers.empty()) states.push_back(&momentum_buffers);
  update_<SGDOp>(params, grads, states, {}, arguments);
}

void lion_(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& exp_avgs,
           const LionArguments& arguments) {
  update_<LionOp>(params, grads, {&exp_avgs}, {}, arguments);
}

// An update op for lists that stay the same from step to step but for their grads (fastopt.optim's
// step plan; fastopt/backends/cpu.py <op>_planned_): the chunk plan, the params' and states' addresses, their
// version counters, the step counts and the block functions (per variant used) are worked out
// once. A call reads the grads' addresses and dtypes (the caller has checked them: shapes and
// devices of the params, CPU, floating), from a Python list or from the step plan's GradWatch
// (which read them in its own visit: then no TensorImpl is touched here), and runs the pass. Lists
// with a non-contiguous param or state are not planned (update_ copies those).
template <typename Op>
class UpdatePlan {
 public:
  using Fn = typename Op::Fn;

  UpdatePlan(std::vector<Tensor> params, const std::vector<Tensor>& grads, std::vector<std::vector<Tensor>> states,
             const std::vector<Tensor>& steps)
      : params_(std::move(params)),
        states_(std::move(states)),
        steps_(counters_of(TensorRefs(steps))),
        numels_(numels_of(TensorRefs(params_))),
        total_(sum_of(numels_)),
        chunks_(plan_chunks(numels_, {}, {}, kBlockSize, false)) {
    TORCH_CHECK(grads.size() == params_.size(), kName, "Plan: one grad per param");
    for (const auto& list : states_) {
      TORCH_CHECK(list.size() == params_.size(), kName, "Plan: one state per param in each state list");
      for (const Tensor& t : list)
        TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), kName, "Plan: params and states must be contiguous CPU tensors");
    }
    for (const Tensor& t : params_)
      TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), kName, "Plan: params and states must be contiguous CPU tensors");
    grad_types_.reserve(grads.size());
    for (const Tensor& g : grads) grad_types_.push_back(g.scalar_type());
    pointers_.resize(params_.size());
    std::vector<c10::TensorImpl*> written;
    for (size_t i = 0; i < params_.size(); ++i) {
      written.push_back(params_[i].unsafeGetTensorImpl());
      for (const auto& list : states_) written.push_back(list[i].unsafeGetTensorImpl());
    }
    versions_ = prefetch::distinct_versions(written);
    for (size_t i = 0; i < params_.size(); ++i) {
      if (numels_[i] == 0) continue;
      UpdatePointers& q = pointers_[i];
      q = {params_[i].data_ptr(), nullptr, {nullptr, nullptr, nullptr}, params_[i].element_size(), 0, 0};
      for (size_t k = 0; k < states_.size(); ++k) q.s[k] = states_[k][i].data_ptr();
      if (!states_.empty()) q.s_size = states_[0][i].element_size();
    }
  }

  // One step with the grads of a Python list. False, with nothing done, when a param is no longer
  // what the plan holds (``p.data = x`` moved or resized it): the caller builds a new plan.
  bool step_list(const pybind11::list& grads, const typename Op::Arguments& arguments) {
    TORCH_CHECK(size_t(PyList_GET_SIZE(grads.ptr())) == params_.size(), kName, "Plan: one grad per param");
    return step(arguments, [&](std::vector<Tensor>& copies) {
      for (size_t i = 0; i < params_.size(); ++i) {
        if (!holds(params_[i], i)) return false;
        PyObject* item = PyList_GET_ITEM(grads.ptr(), i);
        TORCH_CHECK(THPVariable_Check(item), kName, "Plan: grads must be tensors");
        const Tensor& g = THPVariable_Unpack(item);
        TORCH_CHECK(g.defined(), kName, "Plan: a grad is missing");
        take_grad(i, span_of(g), g.is_contiguous(), [&]() -> const Tensor& { return g; }, copies);
      }
      return true;
    });
  }

  // The same with the grads of entries first, first + 1, ... of the step plan's GradWatch, as its
  // refresh read them. The params are checked against the plan's at a watch's first use only:
  // from then on each refresh checks them against what they were when the watch was made.
  bool step_watched(const GradWatch& watch, int64_t first, const typename Op::Arguments& arguments) {
    watch.check_fresh();
    TORCH_CHECK(first >= 0 && first + params_.size() <= watch.num_entries(), kName, "Plan: entries past the watch's");
    const bool trusted = watch.id() == trusted_watch_ && first == trusted_first_;
    return step(arguments, [&](std::vector<Tensor>& copies) {
      if (!trusted) {
        for (size_t i = 0; i < params_.size(); ++i) {
          const Tensor& p = watch.param(first + i);
          if (p.unsafeGetTensorImpl() != params_[i].unsafeGetTensorImpl() || !holds(p, i)) return false;
        }
        trusted_watch_ = watch.id(), trusted_first_ = first;
      }
      for (size_t i = 0; i < params_.size(); ++i) {
        const size_t k = first + i;
        take_grad(i, watch.span(k), watch.contiguous(k), [&]() -> const Tensor& { return watch.grad(k); }, copies);
      }
      return true;
    });
  }

 private:
  static constexpr const char* kName = Op::kName;

  // read_grads(copies) puts each grad's address into pointers_ (false: a param moved, nothing done).
  template <typename ReadGrads>
  bool step(const typename Op::Arguments& a, const ReadGrads& read_grads) {
    if (a.step.skipped()) return true;  // no bit changes
    const StepScalars scalars = a.step.read();
    const unsigned variant = Op::variant(a, scalars, states_.size());
    fns_for(variant);  // may raise: nothing written yet
    // One read-only visit per grad: its address, and the block functions again where its dtype
    // changed (this may raise: nothing is written yet).
    std::vector<Tensor> copies;  // contiguous copies of non-contiguous grads, alive for the pass
    if (!read_grads(copies)) return false;
    // The writes begin: step counts and constants, the version counters of what the pass updates
    // in place.
    const std::vector<typename Op::Constants> constants = Op::constants(a, scalars, steps_, which_);
    prefetch::bump_versions(versions_);
    run_update_pass(chunks_, total_, fns_for(variant), pointers_, constants, which_, scalars.grad_scale, scalars.clip_coef);
    return true;
  }

  // Whether param i is still where and what the plan has it.
  bool holds(const Tensor& p, size_t i) const {
    return p.numel() == numels_[i] && (numels_[i] == 0 || p.const_data_ptr() == pointers_[i].p) && p.is_contiguous();
  }

  // Grad i: its span, or a contiguous copy's (kept in copies) when it is strided.
  template <typename TensorOf>
  void take_grad(size_t i, const TensorSpan& span, bool contiguous, const TensorOf& tensor_of,
                 std::vector<Tensor>& copies) {
    if (span.type != grad_types_[i]) retype(i, span.type);
    if (numels_[i] == 0) return;
    UpdatePointers& q = pointers_[i];
    q.g_size = span.element_size;
    if (contiguous) {
      q.g = span.data;
      return;
    }
    copies.push_back(tensor_of().contiguous());
    q.g = copies.back().const_data_ptr();
  }

  std::vector<const Tensor*> states_of(size_t i) const {
    std::vector<const Tensor*> states;
    for (const auto& list : states_) states.push_back(&list[i]);
    return states;
  }

  // The block functions of a variant (a call's flags), worked out on its first use.
  std::vector<Fn>& fns_for(unsigned variant) {
    for (auto& [known, fns] : fns_)
      if (known == variant) return fns;
    std::vector<Fn> fns(params_.size());
    for (size_t i = 0; i < params_.size(); ++i)
      fns[i] = update_fn<Op>(params_[i], grad_types_[i], states_of(i), variant);
    fns_.emplace_back(variant, std::move(fns));
    return fns_.back().second;
  }

  // A grad of another dtype than before: its block functions in every variant known (raises,
  // before any write, when the combination is not compiled).
  void retype(size_t i, at::ScalarType grad_type) {
    for (auto& [variant, fns] : fns_) fns[i] = update_fn<Op>(params_[i], grad_type, states_of(i), variant);
    grad_types_[i] = grad_type;
  }

  std::vector<Tensor> params_;
  std::vector<std::vector<Tensor>> states_;  // the op's state lists, in its block function's order
  std::vector<StepCounter> steps_;  // AdamW's step counts; empty for the others
  std::vector<c10::VariableVersion> versions_;  // of the params and states, each once, bumped by a step
  std::vector<int64_t> numels_;
  int64_t total_;
  ChunkPlan chunks_;
  std::vector<at::ScalarType> grad_types_;
  std::vector<std::pair<unsigned, std::vector<Fn>>> fns_;  // by variant (a few at most)
  std::vector<UpdatePointers> pointers_;
  std::vector<uint32_t> which_;  // each tensor's constants (Op::constants), kept to spare an allocation
  uint64_t trusted_watch_ = 0;  // the GradWatch (id) and first entry whose params were checked
  int64_t trusted_first_ = -1;
};

// multi_tensor_norm of the grads of some entries of the step plan's GradWatch (the ranges
// [first, first + count) of the lists on one device, in order), as its refresh read them: the
// chunk plan is made once (the plan's grads keep their sizes), and no TensorImpl is touched.
class NormPlan {
 public:
  NormPlan(const GradWatch& watch, const std::vector<std::pair<int64_t, int64_t>>& ranges) {
    for (const auto& [first, count] : ranges) {
      TORCH_CHECK(first >= 0 && count >= 0 && size_t(first + count) <= watch.num_entries(),
                  "NormPlan: entries past the watch's");
      for (int64_t k = first; k < first + count; ++k) entries_.push_back(size_t(k));
    }
    std::vector<int64_t> numels(entries_.size());
    for (size_t i = 0; i < entries_.size(); ++i) numels[i] = watch.span(entries_[i]).numel;
    numels_ = numels;
    total_ = sum_of(numels);
    chunks_ = plan_chunks(numels, {}, {}, kBlockSize, false);
  }

  std::tuple<Tensor, Tensor> norm(const GradWatch& watch, double p, bool per_tensor,
                                  const std::optional<Tensor>& found_inf) {
    watch.check_fresh();
    TORCH_CHECK(entries_.empty() || entries_.back() < watch.num_entries(), "NormPlan: entries past the watch's");
    std::vector<TensorSpan> spans(entries_.size());
    bool contiguous = true;
    for (size_t i = 0; i < entries_.size(); ++i) {
      spans[i] = watch.span(entries_[i]);
      contiguous = contiguous && watch.contiguous(entries_[i]);
      TORCH_CHECK(spans[i].numel == numels_[i], "NormPlan: a grad changed size (the step plan is void)");
    }
    if (contiguous && !per_tensor) {
      // Grads that move every step (made anew by each backward) are not looked at for runs: only
      // a layout seen at two steps in a row.
      const std::pair<uint64_t, uint64_t> layout{watch.id(), watch.layout()};
      if (layout == last_layout_ && layout != runs_for_) find_runs(spans, layout);
      last_layout_ = layout;
      if (layout == runs_for_ && !runs_.empty()) return norm_of_spans(runs_, run_chunks_, total_, p, false, found_inf);
    }
    if (contiguous) return norm_of_spans(spans, chunks_, total_, p, per_tensor, found_inf);
    TensorRefs tensors;  // a strided grad: the general path, which reads a contiguous copy
    tensors.reserve(entries_.size());
    for (size_t k : entries_) tensors.push_back(&watch.grad(k));
    return multi_tensor_norm(tensors, p, per_tensor, found_inf);
  }

  size_t runs() const { return last_layout_ == runs_for_ ? runs_.size() : 0; }

 private:
  // Grads that lie end to end in memory with one dtype (flat grads: views of one buffer) make one
  // run, read as one tensor: a few large blocks instead of one block per grad (the sum's order
  // changes with the blocks, so the norm can differ from the per-grad plan's in its last bits; it
  // is the same at every step and thread count). Kept while the watch's layout() stays; runs_ is
  // left empty when few grads touch (each grad its own allocation): the per-grad plan serves.
  void find_runs(const std::vector<TensorSpan>& spans, std::pair<uint64_t, uint64_t> layout) {
    runs_.clear();
    for (const TensorSpan& span : spans) {
      if (span.numel == 0) continue;
      TensorSpan* last = runs_.empty() ? nullptr : &runs_.back();
      if (last != nullptr && last->type == span.type &&
          static_cast<char*>(last->data) + last->numel * last->element_size == span.data) {
        last->numel += span.numel;
        continue;
      }
      runs_.push_back(span);
    }
    if (runs_.size() * 2 > spans.size()) {
      runs_.clear();  // too few grads touch to be worth a second plan
    } else {
      std::vector<int64_t> numels(runs_.size());
      for (size_t i = 0; i < runs_.size(); ++i) numels[i] = runs_[i].numel;
      run_chunks_ = plan_chunks(numels, {}, {}, kBlockSize, false);
    }
    runs_for_ = layout;
  }

  std::vector<size_t> entries_;
  std::vector<int64_t> numels_;
  int64_t total_ = 0;
  ChunkPlan chunks_;
  std::vector<TensorSpan> runs_;  // see find_runs
  ChunkPlan run_chunks_;
  // The watch (id) and its layout() that runs_ was found for, and at the last call.
  std::pair<uint64_t, uint64_t> runs_for_{0, 0}, last_layout_{0, 0};
};

}  // namespace
}  // namespace cpu
}  // namespace fastopt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  using namespace fastopt::cpu;
  module.doc() = "fastopt's CPU backend: multi-tensor norm, unscale, scale, clamp, AGC, AdamW, SGD and Lion (csrc/cpu)";
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
  register_step_plan(module);  // GradWatch first: the plans and NormPlan take one
  pybind11::class_<StepArguments>(module, "StepArguments", "the step-wide scalars of an update")
      .def(pybind11::init<double, std::optional<at::Tensor>, bool, double, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, double, std::optional<at::Tensor>, bool, bool>(),
           pybind11::arg("lr_value"), pybind11::arg("lr_tensor"), pybind11::arg("maximize"),
           pybind11::arg("grad_scale_value"), pybind11::arg("grad_scale_tensor"), pybind11::arg("found_inf"),
           pybind11::arg("clip_coef_value"), pybind11::arg("clip_coef_tensor"), pybind11::arg("has_grad_scale"),
           pybind11::arg("has_clip_coef"));
  pybind11::class_<AdamWArguments>(module, "AdamWArguments", "the scalars of one AdamW (Adam) step")
      .def(pybind11::init<StepArguments, double, double, double, double, bool>(), pybind11::arg("step"),
           pybind11::arg("beta1"), pybind11::arg("beta2"), pybind11::arg("eps"), pybind11::arg("weight_decay"),
           pybind11::arg("decoupled_weight_decay"));
  pybind11::class_<SGDArguments>(module, "SGDArguments", "the scalars of one SGD step")
      .def(pybind11::init<StepArguments, double, double, double, bool, bool>(), pybind11::arg("step"),
           pybind11::arg("momentum"), pybind11::arg("dampening"), pybind11::arg("weight_decay"),
           pybind11::arg("nesterov"), pybind11::arg("first_step"));
  pybind11::class_<LionArguments>(module, "LionArguments", "the scalars of one Lion step")
      .def(pybind11::init<StepArguments, double, double, double>(), pybind11::arg("step"), pybind11::arg("beta1"),
           pybind11::arg("beta2"), pybind11::arg("weight_decay"));
  module.def("adamw_", &adamw_, "one AdamW (Adam) step", pybind11::arg("params"), pybind11::arg("grads"),
             pybind11::arg("exp_avgs"), pybind11::arg("exp_avg_sqs"), pybind11::arg("steps"),
             pybind11::arg("max_exp_avg_sqs"), pybind11::arg("arguments"));
  module.def("sgd_", &sgd_, "one SGD step (momentum_buffers empty without momentum)", pybind11::arg("params"),
             pybind11::arg("grads"), pybind11::arg("momentum_buffers"), pybind11::arg("arguments"));
  module.def("lion_", &lion_, "one Lion step", pybind11::arg("params"), pybind11::arg("grads"),
             pybind11::arg("exp_avgs"), pybind11::arg("arguments"));
  using Tensors = std::vector<at::Tensor>;
  pybind11::class_<UpdatePlan<AdamWOp>>(module, "AdamWPlan", "adamw_ for lists that keep their params and states")
      .def(pybind11::init([](Tensors params, const Tensors& grads, Tensors exp_avgs, Tensors exp_avg_sqs,
                             Tensors max_exp_avg_sqs, Tensors steps) {
             std::vector<Tensors> states{std::move(exp_avgs), std::move(exp_avg_sqs)};
             if (!max_exp_avg_sqs.empty()) states.push_back(std::move(max_exp_avg_sqs));
             return new UpdatePlan<AdamWOp>(std::move(params), grads, std::move(states), std::move(steps));
           }),
           pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("exp_avgs"), pybind11::arg("exp_avg_sqs"),
           pybind11::arg("max_exp_avg_sqs"), pybind11::arg("steps"))
      .def("step_list", &UpdatePlan<AdamWOp>::step_list, "one step with these grads (checked by the caller)")
      .def("step_watched", &UpdatePlan<AdamWOp>::step_watched, "one step with the grads of a GradWatch's entries");
  pybind11::class_<UpdatePlan<SGDOp>>(module, "SGDPlan", "sgd_ for lists that keep their params and states")
      .def(pybind11::init([](Tensors params, const Tensors& grads, Tensors momentum_buffers) {
             std::vector<Tensors> states;
             if (!momentum_buffers.empty()) states.push_back(std::move(momentum_buffers));
             return new UpdatePlan<SGDOp>(std::move(params), grads, std::move(states), {});
           }),
           pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("momentum_buffers"))
      .def("step_list", &UpdatePlan<SGDOp>::step_list, "one step with these grads (checked by the caller)")
      .def("step_watched", &UpdatePlan<SGDOp>::step_watched, "one step with the grads of a GradWatch's entries");
  pybind11::class_<UpdatePlan<LionOp>>(module, "LionPlan", "lion_ for lists that keep their params and states")
      .def(pybind11::init([](Tensors params, const Tensors& grads, Tensors exp_avgs) {
             return new UpdatePlan<LionOp>(std::move(params), grads, {std::move(exp_avgs)}, {});
           }),
           pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("exp_avgs"))
      .def("step_list", &UpdatePlan<LionOp>::step_list, "one step with these grads (checked by the caller)")
      .def("step_watched", &UpdatePlan<LionOp>::step_watched, "one step with the grads of a GradWatch's entries");
  pybind11::class_<NormPlan>(module, "NormPlan", "multi_tensor_norm of the grads of a GradWatch's entries")
      .def(pybind11::init<const GradWatch&, const std::vector<std::pair<int64_t, int64_t>>&>(),
           pybind11::arg("watch"), pybind11::arg("ranges"))
      .def("norm", &NormPlan::norm, pybind11::arg("watch"), pybind11::arg("norm_type"), pybind11::arg("per_tensor"),
           pybind11::arg("found_inf"))
      .def_property_readonly("runs", &NormPlan::runs, "runs of grads read as one by the last norm (0: one per grad)");
}
