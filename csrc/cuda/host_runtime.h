// The interface between the CUDA backend's registration (registration.cpp) and its host runtime
// (host_runtime.cpp): the ops' CUDA implementations, which registration.cpp registers as torch ops,
// and the table cache's test hooks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

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

// Schemas and the meaning of the arguments: registration.cpp.
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm(const TensorList& tensors, double norm_type, bool per_tensor,
                                                     const std::optional<at::Tensor>& found_inf);
std::tuple<at::Tensor, at::Tensor> unscale_and_check_(const TensorList& tensors, double inv_scale,
                                                      const std::optional<at::Tensor>& inv_scale_tensor,
                                                      const at::Tensor& found_inf, std::optional<double> norm_type,
                                                      bool per_tensor);
void scale_(const TensorList& tensors, double coef, const std::optional<at::Tensor>& coef_tensor);
void clamp_(const TensorList& tensors, double clip_value);
void adaptive_clip_(const TensorList& params, const TensorList& grads, double clip_factor, double eps, double norm_type,
                    bool unitwise);
void adamw_(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs, const TensorList& exp_avg_sqs,
            const TensorList& steps, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
            double eps, double weight_decay, bool maximize, const TensorList& max_exp_avg_sqs, double grad_scale,
            const std::optional<at::Tensor>& grad_scale_tensor, const std::optional<at::Tensor>& found_inf,
            double clip_coef, const std::optional<at::Tensor>& clip_coef_tensor, bool decoupled_weight_decay);
void sgd_(const TensorList& params, const TensorList& grads, const TensorList& momentum_buffers, double lr,
          const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening, double weight_decay,
          bool nesterov, bool maximize, bool first_step, double grad_scale,
          const std::optional<at::Tensor>& grad_scale_tensor, const std::optional<at::Tensor>& found_inf,
          double clip_coef, const std::optional<at::Tensor>& clip_coef_tensor);
void lion_(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs, double lr,
           const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double weight_decay, bool maximize,
           double grad_scale, const std::optional<at::Tensor>& grad_scale_tensor,
           const std::optional<at::Tensor>& found_inf, double clip_coef,
           const std::optional<at::Tensor>& clip_coef_tensor);

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
