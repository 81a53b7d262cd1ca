// The interface between the CUDA backend's registration (registration.cpp) and its host runtime
// (host_runtime.cpp): the ops' CUDA implementations, which registration.cpp registers as torch ops,
// and the table cache's test hooks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/tensor_refs.h"

// What these ops are registered as. The build on the host emulation of the device
// (csrc/emulation/ops_emulated.cpp) defines its own: torch.ops.fastopt_emulated.* for CPU tensors
// in fastopt._C_emulated, table uploads from plain host memory.
#ifndef FASTOPT_OPS_LIBRARY
#define FASTOPT_OPS_LIBRARY fastopt
#define FASTOPT_OPS_DISPATCH_KEY CUDA
#define FASTOPT_OPS_DEVICE_TYPE at::kCUDA
#define FASTOPT_OPS_PINNED true
#define FASTOPT_OPS_MODULE "fastopt._C"
#define FASTOPT_OPS_MODULE_INIT PyInit__C
#endif

namespace fastopt {

using TensorList = std::vector<at::Tensor>;

// Schemas and the meaning of the arguments: registration.cpp. The lists are borrowed
// (tensor_refs.h): registration.cpp hands over the dispatcher's lists, or, for eager calls from
// fastopt/backends/cuda.py, the Python lists themselves (no boxing, no copy of a tensor).
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm(const TensorRefs& tensors, double norm_type, bool per_tensor,
                                                     const std::optional<at::Tensor>& found_inf);
std::tuple<at::Tensor, at::Tensor> unscale_and_check_(const TensorRefs& tensors, double inv_scale,
                                                      const std::optional<at::Tensor>& inv_scale_tensor,
                                                      const at::Tensor& found_inf, std::optional<double> norm_type,
                                                      bool per_tensor);
void scale_(const TensorRefs& tensors, double coef, const std::optional<at::Tensor>& coef_tensor);
void clamp_(const TensorRefs& tensors, double clip_value);
void adaptive_clip_(const TensorRefs& params, const TensorRefs& grads, double clip_factor, double eps, double norm_type,
                    bool unitwise);
void adamw_(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& exp_avgs, const TensorRefs& exp_avg_sqs,
            const TensorRefs& steps, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
            double eps, double weight_decay, bool maximize, const TensorRefs& max_exp_avg_sqs, double grad_scale,
            const std::optional<at::Tensor>& grad_scale_tensor, const std::optional<at::Tensor>& found_inf,
            double clip_coef, const std::optional<at::Tensor>& clip_coef_tensor, bool decoupled_weight_decay);
void sgd_(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& momentum_buffers, double lr,
          const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening, double weight_decay,
          bool nesterov, bool maximize, bool first_step, double grad_scale,
          const std::optional<at::Tensor>& grad_scale_tensor, const std::optional<at::Tensor>& found_inf,
          double clip_coef, const std::optional<at::Tensor>& clip_coef_tensor);
void lion_(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& exp_avgs, double lr,
           const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double weight_decay, bool maximize,
           double grad_scale, const std::optional<at::Tensor>& grad_scale_tensor,
           const std::optional<at::Tensor>& found_inf, double clip_coef,
           const std::optional<at::Tensor>& clip_coef_tensor);

// A planned update (fastopt.optim's step plan, through fastopt/backends/cuda.py's *_planned_; bound
// in Python by registration.cpp, not a torch op, so no boxing of the lists): built once from the
// params, grads and states of one op, validated then with the op's checks and errors, and holding
// their addresses and a device table per stream, private to it. A step reads only what may change:
// the grads (checked: defined, dense, contiguous, same dtype, numel and device as planned), the
// params' addresses (unchanged, or the caller plans again; the states are trusted to stay, as the
// step plan trusts them) and the step-wide scalars.
enum class PlannedOp : int64_t { kAdamW = 0, kSGD = 1, kLion = 2 };
// kDone: launched. kReplan: nothing done; a param moved (p.data = x), or a grad's dtype or
// contiguity changed: the caller builds a new plan from its lists. kUnplanned: nothing done; the
// stream is capturing a CUDA graph, whose tables are the op's (its capture rules): run the op.
// kNeedsGrads (step_addresses only): nothing done; the plan has no table for the current stream
// yet, which is made from the grads as tensors: call step().
enum class PlanStatus : int64_t { kDone = 0, kReplan = 1, kUnplanned = 2, kNeedsGrads = 3 };

// A step's scalars, as the ops take them (a float, or a device scalar when the tensor is given);
// each op reads its own.
struct PlannedScalars {
  double lr = 0.0, grad_scale = 1.0, clip_coef = 1.0;
  std::optional<at::Tensor> lr_tensor, grad_scale_tensor, clip_coef_tensor, found_inf;
  bool maximize = false;
  double beta1 = 0.0, beta2 = 0.0, eps = 0.0, weight_decay = 0.0;  // AdamW; Lion (betas, weight_decay)
  bool decoupled_weight_decay = true;                              // AdamW
  double momentum = 0.0, dampening = 0.0;                          // SGD (and weight_decay)
  bool nesterov = false, first_step = false;                       // SGD
};

class UpdatePlan {
 public:
  // states: AdamW (exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs or empty); SGD (momentum_buffers
  // or empty); Lion (exp_avgs). Raises the op's errors; "fastopt: UpdatePlan: ..." for lists the
  // op takes but a plan does not (a non-contiguous tensor).
  UpdatePlan(PlannedOp op, const TensorList& params, const TensorList& grads, const std::vector<TensorList>& states);
  ~UpdatePlan();
  // grads: one per param, borrowed for the call. Raises, before any write, the op's error for a
  // grad the op would refuse.
  PlanStatus step(const TensorRefs& grads, const PlannedScalars& scalars);
  // The same with the grads given by their addresses (int64, CPU, one per param), for a caller that
  // has checked the grads as step() does and knows the params stay where they were (fastopt.optim's
  // step plan with its GradWatch, whose refresh checks both each step): nothing per tensor is read.
  PlanStatus step_addresses(const at::Tensor& grad_addresses, const PlannedScalars& scalars);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// The norm of one list of grads for fastopt.optim's step plan (fastopt/backends/cuda.py's
// multi_tensor_norm_planned): built from the grads, checked as multi_tensor_norm checks them (and
// contiguous), with a device table for the current stream; a call takes the grads' addresses (a
// caller that has checked them: same dtypes, sizes and device, contiguous) and runs the op's passes.
class NormPlan {
 public:
  explicit NormPlan(const TensorList& grads);
  ~NormPlan();
  // (total, per-tensor norms) as multi_tensor_norm returns them; nullopt, nothing done, while the
  // stream captures a CUDA graph or on a stream without a table of this plan (run the op).
  std::optional<std::tuple<at::Tensor, at::Tensor>> norm(const at::Tensor& addresses, double norm_type,
                                                         bool per_tensor, const std::optional<at::Tensor>& found_inf);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Test hooks, not API (the table cache: host_runtime.cpp).
struct CacheStats {
  int64_t cached = 0;         // tables in the cache
  int64_t graph_only = 0;     // replaced or evicted tables kept because a live graph reads them
  int64_t graph_tables = 0;   // tables (cached or not) that a live graph reads
};
// What the cache holds.
CacheStats table_cache_stats();
// Every cached table's arrival counters set to `value` on the current stream, as an aborted launch
// could leave them.
void set_arrival_counters(int value);

}  // namespace fastopt
