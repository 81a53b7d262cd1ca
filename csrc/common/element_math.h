// Per-element and per-tensor math of every fastopt op, as small __host__ __device__ functions.
//
// The kernels call these on each element; the host unit tests (csrc/tests, ctest) call the same
// functions and compare them with fastopt/backends/reference.py's formulas. No CUDA header is needed here,
// so a plain C++ compiler builds the tests. `A` is the accumulation type: float for fp16 / bf16 /
// fp32 tensors, double for fp64 (fastopt accumulates in fp32, fp64 keeps its precision).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_HD inline
#endif

namespace fastopt {

// Element types of tensors, as stored in the device-side tables.
enum DType : int64_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// What a norm pass accumulates per element.
enum NormKind : int32_t {
  kNoNorm = 0,      // only the inf/nan check (and the unscale)
  kSumAbs = 1,      // p = 1
  kSumSquares = 2,  // p = 2
  kSumPowers = 3,   // any other finite p
  kMaxAbs = 4,      // p = inf
};

FASTOPT_HD NormKind norm_kind(double p) {
  if (std::isinf(p)) return kMaxAbs;
  if (p == 1.0) return kSumAbs;
  if (p == 2.0) return kSumSquares;
  return kSumPowers;
}

// In the element's own precision (no widening to double on the device per element).
template <typename A>
FASTOPT_HD bool is_finite(A x) {
  return !std::isnan(x) && !std::isinf(x);
}

// max that propagates nan from either side (fmax would drop it: a nan grad must show in the norm).
template <typename A>
FASTOPT_HD A max_propagating_nan(A a, A b) {
  return (std::isnan(a) || a > b) ? a : b;
}

// One element's contribution to a norm: |x|, x^2, |x|^p or |x| (max).
template <typename A>
FASTOPT_HD A norm_contribution(A x, NormKind kind, A p) {
  switch (kind) {
    case kSumAbs:
    case kMaxAbs:
      return std::fabs(x);
    case kSumSquares:
      return x * x;
    case kSumPowers:
      return std::pow(std::fabs(x), p);
    default:
      return A(0);
  }
}

// Combine two partial results of one norm kind (a sum, or a nan-propagating max).
template <typename A>
FASTOPT_HD A norm_combine(A a, A b, NormKind kind) {
  return kind == kMaxAbs ? max_propagating_nan(a, b) : a + b;
}

// The norm from its accumulated partial: the p-th root of a sum, or the max itself.
template <typename A>
FASTOPT_HD A norm_finish(A accumulated, NormKind kind, A p) {
  switch (kind) {
    case kSumSquares:
      return std::sqrt(accumulated);
    case kSumPowers:
      return std::pow(accumulated, A(1) / p);
    default:
      return accumulated;
  }
}

// clamp to [-limit, limit]; nan stays nan (comparisons with nan are false), as torch.clamp.
template <typename A>
FASTOPT_HD A clamp_symmetric(A x, A limit) {
  return x < -limit ? -limit : (x > limit ? limit : x);
}

// AGC (Brock et al. 2021): a unit's grad norm may be at most clip_factor * max(||W_u||, eps);
// above that the grad is scaled down to it (the norm floored at 1e-6, as timm and torch do).
template <typename A>
FASTOPT_HD A agc_coefficient(A weight_norm, A grad_norm, A clip_factor, A eps) {
  // Written so that a nan norm stays nan (as torch's clamp_min keeps it): then no clipping.
  const A max_norm = (weight_norm < eps ? eps : weight_norm) * clip_factor;
  const A floored = grad_norm < A(1e-6) ? A(1e-6) : grad_norm;
  return grad_norm > max_norm ? max_norm / floored : A(1);
}

// torch.lerp's formula (exact at both ends): m + w (g - m), evaluated from the nearer end.
template <typename A>
FASTOPT_HD A lerp(A start, A end, A weight) {
  return weight < A(0.5) ? start + weight * (end - start) : end - (end - start) * (A(1) - weight);
}

// The per-tensor constants of one AdamW step, formed once per chunk from the device-side step
// count and learning rate. Bias corrections are taken in double, as torch forms them on the host.
template <typename A>
struct AdamWConstants {
  A decay_factor;           // 1 - lr * weight_decay
  A one_minus_beta1;        // the lerp weight of exp_avg towards g
  A beta2;
  A one_minus_beta2;
  A bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  A eps;
  A neg_step_size;          // -lr / (1 - beta1^step)
  A l2_weight_decay;        // Adam's (decoupled_weight_decay=False) weight decay, added to the grad; else 0
};

// decoupled: AdamW's decay of the param (decay_factor); otherwise torch.optim.Adam's L2 term
// (l2_weight_decay, with decay_factor 1). The update templates take the choice as L2.
template <typename A>
FASTOPT_HD AdamWConstants<A> adamw_constants(double lr, double beta1, double beta2, double eps,
                                             double weight_decay, double step, bool decoupled = true) {
  AdamWConstants<A> c;
  c.decay_factor = A(decoupled ? 1.0 - lr * weight_decay : 1.0);
  c.l2_weight_decay = A(decoupled ? 0.0 : weight_decay);
  c.one_minus_beta1 = A(1.0 - beta1);
  c.beta2 = A(beta2);
  c.one_minus_beta2 = A(1.0 - beta2);
  c.bias_correction2_sqrt = A(std::sqrt(1.0 - std::pow(beta2, step)));
  c.eps = A(eps);
  c.neg_step_size = A(-lr / (1.0 - std::pow(beta1, step)));
  return c;
}

// The gradient as the update uses it: g / grad_scale * clip_coef, negated when maximizing.
template <typename A>
FASTOPT_HD A effective_grad(A g, A grad_scale, A clip_coef, bool maximize) {
  const A value = g / grad_scale * clip_coef;
  return maximize ? -value : value;
}

// g * inverse_scale * clip_coef: effective_grad's value bit for bit (maximize folded into the
// sign) when inverse_scale is 1 / grad_scale exactly, i.e. grad_scale is a power of two:
// x / 2^k and x * 2^-k are the same real number, each rounded once. A multiply instead of a
// division, which costs several times as much on CPU vector units (GradScaler's scales and
// clipping alone, scale 1, are powers of two).
template <typename A>
FASTOPT_HD A effective_grad_by_inverse(A g, A inverse_scale, A clip_coef) {
  return g * inverse_scale * clip_coef;
}

// Whether grad_scale = +-2^k with it and its inverse normal in float (so in double too): then
// effective_grad_by_inverse may stand for effective_grad. Host code.
inline bool has_exact_inverse(double grad_scale) {
  int exponent = 0;
  const double mantissa = std::frexp(grad_scale, &exponent);
  return (mantissa == 0.5 || mantissa == -0.5) && exponent >= -124 && exponent <= 126;
}

// torch.optim.Adam's L2 weight decay: weight_decay * param added to the (negated, if maximizing)
// grad before the moments see it. torch's CPU kernels fuse it (add with alpha: one fma).
template <typename A>
FASTOPT_HD A l2_decayed_grad(A grad, A param, A weight_decay) {
  return grad + weight_decay * param;
}
template <typename A>
FASTOPT_HD A l2_decayed_grad_fused(A grad, A param, A weight_decay) {
  return std::fma(param, weight_decay, grad);
}

// One element of torch.optim.AdamW's update (decoupled weight decay), in the reference's order;
// with L2 (adamw_update<A, true>), torch.optim.Adam's: the decay added to the grad, the param not
// decayed. max_exp_avg_sq is null without AMSGrad.
template <typename A, bool L2 = false>
FASTOPT_HD void adamw_update(A& param, A grad, A& exp_avg, A& exp_avg_sq, A* max_exp_avg_sq,
                             const AdamWConstants<A>& c) {
  if (L2) {
    grad = l2_decayed_grad(grad, param, c.l2_weight_decay);
  } else {
    param *= c.decay_factor;
  }
  exp_avg = lerp(exp_avg, grad, c.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * grad * grad;
  A second_moment = exp_avg_sq;
  if (max_exp_avg_sq != nullptr) {
    *max_exp_avg_sq = max_propagating_nan(*max_exp_avg_sq, exp_avg_sq);
    second_moment = *max_exp_avg_sq;
  }
  const A denom = std::sqrt(second_moment) / c.bias_correction2_sqrt + c.eps;
  param += (c.neg_step_size * exp_avg) / denom;
}


// ---------------------------------------------------------------------------------------------
// The rounding of torch's vectorised CPU kernels, for the CPU backend (csrc/cpu/). torch's CPU
// lerp_ evaluates with one fused multiply-add (fmadd(weight, end - start, start), or from the far
// end with weight - 1), and its addcmul_ fuses the last product (self + (value * t1) * t2 as
// fma(value * t1, t2, self)); measured bit for bit against torch 2.13 on an AVX-512 host. nvcc
// contracts the plain formulas above the same way by default; here the fma is written out, so a
// host compiler that does not contract (-ffp-contract=off) gives torch's moments bit for bit.
// max_propagating_nan without short-circuit control flow (a host compiler vectorises it for AVX2).
template <typename A>
FASTOPT_HD A max_propagating_nan_select(A a, A b) {
  return (bool(a != a) | bool(a > b)) ? a : b;
}

// Written as torch's vector code is: one fma, from the start when the weight is small, else from
// the end. The end is a template argument: a step's weight is the same for every element, so a
// loop picks it once and its body has no select (with one, g++ leaves the AVX2 16-bit loops scalar).
template <bool FromStart, typename A>
FASTOPT_HD A lerp_fused(A start, A end, A weight) {
  return FromStart ? std::fma(weight, end - start, start) : std::fma(weight - A(1), end - start, end);
}

// Whether lerp_fused evaluates from the start for this weight.
template <typename A>
FASTOPT_HD bool lerp_from_start(A weight) {
  return weight < A(0.5);
}

// adamw_update with torch's CPU rounding (lerp_fused, the fused addcmul); otherwise the same order.
// LerpFromStart: lerp_from_start(c.one_minus_beta1).
template <bool LerpFromStart, typename A, bool L2 = false>
FASTOPT_HD void adamw_update_fused(A& param, A grad, A& exp_avg, A& exp_avg_sq, A* max_exp_avg_sq,
                                   const AdamWConstants<A>& c) {
  if (L2) {
    grad = l2_decayed_grad_fused(grad, param, c.l2_weight_decay);
  } else {
    param *= c.decay_factor;
  }
  exp_avg = lerp_fused<LerpFromStart>(exp_avg, grad, c.one_minus_beta1);
  exp_avg_sq = std::fma(c.one_minus_beta2 * grad, grad, exp_avg_sq * c.beta2);
  A second_moment = exp_avg_sq;
  if (max_exp_avg_sq != nullptr) {
    *max_exp_avg_sq = max_propagating_nan_select(*max_exp_avg_sq, exp_avg_sq);
    second_moment = *max_exp_avg_sq;
  }
  const A denom = std::sqrt(second_moment) / c.bias_correction2_sqrt + c.eps;
  param += (c.neg_step_size * exp_avg) / denom;
}

// The constants of one step in the accumulation type A, from those formed in double: each field
// is the same rounding of the same double expression as adamw_constants<A> gives.
template <typename A>
FASTOPT_HD AdamWConstants<A> adamw_constants_as(const AdamWConstants<double>& d) {
  return {A(d.decay_factor), A(d.one_minus_beta1), A(d.beta2), A(d.one_minus_beta2),
          A(d.bias_correction2_sqrt), A(d.eps), A(d.neg_step_size), A(d.l2_weight_decay)};
}

// ---------------------------------------------------------------------------------------------
// SGD and Lion. Their constants need no step count: formed once per call (lr may be a device
// scalar, read where the kernel reads it).

// torch.optim.SGD: weight decay added to the grad (torch skips it when 0: so do the callers, which
// keeps a nan param from reaching the grad through 0 * nan), momentum with dampening, Nesterov.
template <typename A>
struct SGDConstants {
  A weight_decay;
  A momentum;
  A one_minus_dampening;
  A neg_lr;
};

template <typename A>
FASTOPT_HD SGDConstants<A> sgd_constants(double lr, double momentum, double dampening, double weight_decay) {
  return {A(weight_decay), A(momentum), A(1.0 - dampening), A(-lr)};
}

// One element of torch.optim.SGD's update, in its order. momentum_buffer is null without momentum;
// First: the buffer holds no history yet (torch's first step: buf = grad, not dampened), and is
// only written. The flags are template arguments: a call's choice is the same for every element.
template <bool WeightDecay, bool First, bool Nesterov, typename A>
FASTOPT_HD void sgd_update(A& param, A grad, A* momentum_buffer, const SGDConstants<A>& c) {
  if (WeightDecay) grad = grad + c.weight_decay * param;
  if (momentum_buffer != nullptr) {
    const A buffer = First ? grad : *momentum_buffer * c.momentum + c.one_minus_dampening * grad;
    *momentum_buffer = buffer;
    grad = Nesterov ? grad + c.momentum * buffer : buffer;
  }
  param = param + c.neg_lr * grad;
}

// sgd_update with torch's CPU rounding: each add with alpha is one fma (add(x, alpha=a) as
// fma(x, a, self)), buf.mul_(momentum) rounds before the dampened grad is added.
template <bool WeightDecay, bool First, bool Nesterov, typename A>
FASTOPT_HD void sgd_update_fused(A& param, A grad, A* momentum_buffer, const SGDConstants<A>& c) {
  if (WeightDecay) grad = std::fma(param, c.weight_decay, grad);
  if (momentum_buffer != nullptr) {
    const A buffer = First ? grad : std::fma(grad, c.one_minus_dampening, *momentum_buffer * c.momentum);
    *momentum_buffer = buffer;
    grad = Nesterov ? std::fma(buffer, c.momentum, grad) : buffer;
  }
  param = std::fma(grad, c.neg_lr, param);
}

// torch.sign as its CPU and CUDA kernels compute it, (0 < x) - (x < 0): +-1, and +0 for a zero of
// either sign and for nan (a nan direction moves no param: the reference's torch.sign). Two
// compares and a subtraction, no select: with nested selects g++ leaves the AVX2 loops scalar.
template <typename A>
FASTOPT_HD A sign_of(A x) {
  return A(A(0) < x) - A(x < A(0));
}

// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
// interpolation of momentum and grad moves the param by lr; decoupled weight decay; the momentum
// is then interpolated with a second beta.
template <typename A>
struct LionConstants {
  A decay_factor;     // 1 - lr * weight_decay
  A one_minus_beta1;  // the interpolation that gives the update's direction
  A one_minus_beta2;  // the momentum's own update
  A neg_lr;
};

template <typename A>
FASTOPT_HD LionConstants<A> lion_constants(double lr, double beta1, double beta2, double weight_decay) {
  return {A(1.0 - lr * weight_decay), A(1.0 - beta1), A(1.0 - beta2), A(-lr)};
}

// One element of Lion's update, rounded as torch's kernels round the reference's ops: each lerp
// is lerp_fused, from the end its weight picks (the template arguments: lerp_from_start of
// one_minus_beta1 and of one_minus_beta2), and the decayed param is rounded before the signed step
// is added, as mul_ then add_ round it (an fma whose addend is that product: no compiler can
// contract p * decay into it). -lr * direction is exact (direction: +-1 or 0).
template <bool DirectionFromStart, bool MomentumFromStart, typename A>
FASTOPT_HD void lion_update(A& param, A grad, A& exp_avg, const LionConstants<A>& c) {
  const A direction = sign_of(lerp_fused<DirectionFromStart>(exp_avg, grad, c.one_minus_beta1));
  param = std::fma(c.neg_lr, direction, param * c.decay_factor);
  exp_avg = lerp_fused<MomentumFromStart>(exp_avg, grad, c.one_minus_beta2);
}

}  // namespace fastopt
