// The block functions of the update ops (AdamW / Adam, SGD, Lion) by dtype combination and
// variant: the bulk of the extension's code (every loop of kernels.h in three ISA clones), so each
// op's are compiled in a file of their own (adamw_blocks.cpp, sgd_blocks.cpp, lion_blocks.cpp)
// without torch's headers, in parallel with module.cpp, which picks them per tensor.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../common/element_math.h"
#include "kernels.h"

namespace fastopt {
namespace cpu {

// One block of an update: param, grad, up to three states (null past the op's), the element
// count, the op's constants, grad_scale and clip_coef.
template <typename Constants>
using UpdateBlockFn = void (*)(void*, const void*, void*, void*, void*, int64_t, const Constants&, double, double);
using AdamWBlockFn = UpdateBlockFn<AdamWConstants<double>>;
using SGDBlockFn = UpdateBlockFn<SGDConstants<double>>;
using LionBlockFn = UpdateBlockFn<LionConstants<double>>;

// A variant: the flags of a call that are template arguments of its loop (so that the loop has no
// branch and vectorises), as bits. kScaleDivides (only with kScaled): grad_scale has no exact
// inverse, so the loop divides by it (kernels.h, update_grad).
namespace adamw_variant {
constexpr unsigned kAMSGrad = 1, kScaled = 2, kL2 = 4, kScaleDivides = 8;
}
namespace sgd_variant {
// kFirst and kNesterov only with kMomentum.
constexpr unsigned kMomentum = 1, kFirst = 2, kNesterov = 4, kWeightDecay = 8, kScaled = 16, kScaleDivides = 32;
}
namespace lion_variant {
constexpr unsigned kScaled = 1, kScaleDivides = 2;
}

// The block function of a (param, grad, state) dtype combination and variant; nullptr for a
// combination not compiled. Without states (SGD without momentum) s is the param's dtype.
AdamWBlockFn adamw_block_fn(DType p, DType g, DType s, unsigned variant);
SGDBlockFn sgd_block_fn(DType p, DType g, DType s, unsigned variant);
LionBlockFn lion_block_fn(DType p, DType g, DType s, unsigned variant);

// ------------------------------------------------------------- for the *_blocks.cpp files

// f.template operator()<flags...>() with runtime flags as template arguments.
template <bool... Chosen, typename F>
auto with_flags(const F& f) {
  return f.template operator()<Chosen...>();
}
template <bool... Chosen, typename F, typename... Rest>
auto with_flags(const F& f, bool flag, Rest... rest) {
  return flag ? with_flags<Chosen..., true>(f, rest...) : with_flags<Chosen..., false>(f, rest...);
}

// The (param, grad, state) dtype combinations compiled, for every update op as the CUDA backend's
// AdamW (fastopt/backends/cuda.py, ADAMW_BUILDS): fp64; fp32 params and states with fp32, bf16 or fp16
// grads; bf16 / fp16 params with grads of their dtype or fp32 and states of their dtype or fp32.
// make.template operator()<P, G, S>() for one of them; nullptr otherwise.
template <typename Fn, typename Make>
Fn combination_fn(DType p, DType g, DType s, const Make& make) {
  if (p == kFloat64) return g == kFloat64 && s == kFloat64 ? make.template operator()<double, double, double>() : nullptr;
  if (p == kFloat32) {
    if (s != kFloat32) return nullptr;
    if (g == kFloat32) return make.template operator()<float, float, float>();
    if (g == kBFloat16) return make.template operator()<float, BF16, float>();
    if (g == kFloat16) return make.template operator()<float, F16, float>();
    return nullptr;
  }
  if (p == kBFloat16) {
    if (g == kBFloat16 && s == kBFloat16) return make.template operator()<BF16, BF16, BF16>();
    if (g == kBFloat16 && s == kFloat32) return make.template operator()<BF16, BF16, float>();
    if (g == kFloat32 && s == kBFloat16) return make.template operator()<BF16, float, BF16>();
    if (g == kFloat32 && s == kFloat32) return make.template operator()<BF16, float, float>();
    return nullptr;
  }
  if (p == kFloat16) {
    if (g == kFloat16 && s == kFloat16) return make.template operator()<F16, F16, F16>();
    if (g == kFloat16 && s == kFloat32) return make.template operator()<F16, F16, float>();
    if (g == kFloat32 && s == kFloat16) return make.template operator()<F16, float, F16>();
    if (g == kFloat32 && s == kFloat32) return make.template operator()<F16, float, float>();
  }
  return nullptr;
}

}  // namespace cpu
}  // namespace fastopt
