// The CPU backend's loops: what one thread does with one block (a chunk of the plan, at most
// kBlockSize consecutive elements of one tensor or one AGC unit).
//
// Plain C++ (no torch): each loop calls the per-element math of ../element_math.h, the CUDA
// kernels' own, on contiguous memory, and g++ vectorises it. Every loop is compiled three times
// (GCC target_clones: x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, and the baseline) and the
// loader picks one for the running CPU, so nothing assumes the build machine's ISA and std::fma
// is the hardware instruction on the vector paths (on the baseline it is a library call: slow,
// but correct). Build with -fno-math-errno (std::sqrt stays an instruction, so loops vectorise)
// and -ffp-contract=off (the rounding is what the code says: the fused steps are explicit).
//
// Reductions are deterministic: a block's partial is summed in fixed lanes, folded in a fixed
// tree, and the block boundaries do not depend on the number of threads.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../common/element_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASTOPT_CPU_NO_CLONES)
#define FASTOPT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTOPT_CPU_CLONES
#endif

#define FASTOPT_CPU_INLINE inline __attribute__((always_inline))

namespace fastopt {
namespace cpu {

// Elements per block: the unit of work of a thread and of every reduction's first stage.
constexpr int64_t kBlockSize = 65536;

// 16-bit storage types (the bits as torch stores them).
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
static_assert(sizeof(BF16) == 2 && sizeof(F16) == 2, "16-bit storage types");

FASTOPT_CPU_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
FASTOPT_CPU_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// condition ? a : b on bits, written without a branch (AVX2 if-conversion refuses some selects).
FASTOPT_CPU_INLINE uint32_t select_bits(bool condition, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(condition);
  return (a & mask) | (b & ~mask);
}

// bf16 <-> fp32 as c10::BFloat16 converts (round to nearest even; nan -> 0x7FC0). The nan test is
// on the bits (a signed compare: AVX2 has no unsigned one): g++ folds f != f into the select of
// AMSGrad's max and then cannot vectorise the select of two masks.
FASTOPT_CPU_INLINE float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }
// The bf16 in the high half of the result (the low half is not zeroed).
FASTOPT_CPU_INLINE uint32_t bf16_in_high_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = u + (((u >> 16) & 1u) + 0x7FFFu);
  const bool nan = int32_t(u & 0x7FFFFFFFu) > int32_t(0x7F800000u);
  return select_bits(nan, 0x7FC00000u, rounded);
}
FASTOPT_CPU_INLINE uint16_t float_to_bf16(float f) { return uint16_t(bf16_in_high_half(f) >> 16); }

// fp16 <-> fp32 without branches (so loops vectorise), as c10::Half converts without F16C
// (c10/util/Half.h: fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value).
FASTOPT_CPU_INLINE float f16_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = select_bits(two_w < (1u << 27), float_bits(denormalized), float_bits(normalized));
  return bits_float(sign | magnitude);
}
FASTOPT_CPU_INLINE uint16_t float_to_f16(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = select_bits(bias < 0x71000000u, 0x71000000u, bias);
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return uint16_t((sign >> 16) | select_bits(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}

// Loads into the accumulation type A, stores from it (rounding once).
template <typename A>
FASTOPT_CPU_INLINE A load(float x) {
  return A(x);
}
template <typename A>
FASTOPT_CPU_INLINE A load(double x) {
  return A(x);
}
template <typename A>
FASTOPT_CPU_INLINE A load(BF16 x) {
  return A(bf16_to_float(x.bits));
}
template <typename A>
FASTOPT_CPU_INLINE A load(F16 x) {
  return A(f16_to_float(x.bits));
}

template <typename A>
FASTOPT_CPU_INLINE void store(float& out, A x) {
  out = float(x);
}
template <typename A>
FASTOPT_CPU_INLINE void store(double& out, A x) {
  out = double(x);
}
template <typename A>
FASTOPT_CPU_INLINE void store(BF16& out, A x) {
  out.bits = float_to_bf16(float(x));
}
template <typename A>
FASTOPT_CPU_INLINE void store(F16& out, A x) {
  out.bits = float_to_f16(float(x));
}

// Two adjacent elements of a 16-bit array as one 32-bit word (little-endian: the first is the low
// half). Loops whose arrays are all 16-bit go by pairs, and convert both halves of a word in
// 32-bit lanes: element by element, g++ zero-extends, packs and permutes across AVX2's 128-bit
// halves, about twice the instructions (measured on Zen 1: bf16 scale 2x, AdamW 1.4x faster).
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
constexpr bool kPairs = true;
#else
constexpr bool kPairs = false;
#endif

template <typename A, typename T>
FASTOPT_CPU_INLINE void load_pair(const T* x, A& first, A& second) {
  uint32_t word;
  std::memcpy(&word, x, sizeof word);
  if constexpr (std::is_same_v<T, BF16>) {
    first = A(bits_float(word << 16));
    second = A(bits_float(word & 0xFFFF0000u));
  } else {
    first = A(f16_to_float(uint16_t(word)));
    second = A(f16_to_float(uint16_t(word >> 16)));
  }
}
template <typename A, typename T>
FASTOPT_CPU_INLINE void store_pair(T* x, A first, A second) {
  uint32_t word;
  if constexpr (std::is_same_v<T, BF16>)
    word = (bf16_in_high_half(float(first)) >> 16) | (bf16_in_high_half(float(second)) & 0xFFFF0000u);
  else
    word = uint32_t(float_to_f16(float(first))) | (uint32_t(float_to_f16(float(second))) << 16);
  std::memcpy(x, &word, sizeof word);
}

// The arrays of an element-wise loop: read only, read and written back, or written only (its
// elements start at 0).
template <typename T>
struct In {
  using type = T;
  const T* x;
  template <typename A>
  FASTOPT_CPU_INLINE A load(int64_t i) const {
    return cpu::load<A>(x[i]);
  }
  template <typename A>
  FASTOPT_CPU_INLINE void load_pair(int64_t i, A& first, A& second) const {
    cpu::load_pair(x + i, first, second);
  }
  template <typename A>
  FASTOPT_CPU_INLINE void store(int64_t, A) const {}
  template <typename A>
  FASTOPT_CPU_INLINE void store_pair(int64_t, A, A) const {}
};
template <typename T>
struct InOut : In<T> {
  T* out;
  explicit InOut(T* x) : In<T>{x}, out(x) {}
  template <typename A>
  FASTOPT_CPU_INLINE void store(int64_t i, A value) const {
    cpu::store(out[i], value);
  }
  template <typename A>
  FASTOPT_CPU_INLINE void store_pair(int64_t i, A first, A second) const {
    cpu::store_pair(out + i, first, second);
  }
};
template <typename T>
struct Out : InOut<T> {
  using InOut<T>::InOut;
  template <typename A>
  FASTOPT_CPU_INLINE A load(int64_t) const {
    return A(0);
  }
  template <typename A>
  FASTOPT_CPU_INLINE void load_pair(int64_t, A& first, A& second) const {
    first = second = A(0);
  }
};

template <typename A, typename Body, size_t... K, typename... Arrays>
FASTOPT_CPU_INLINE void for_elements_of(int64_t n, const Body& body, std::index_sequence<K...>, Arrays... arrays) {
  int64_t i = 0;
  if constexpr (kPairs && ((sizeof(typename Arrays::type) == 2) && ...)) {
    for (; i + 2 <= n; i += 2) {
      A first[sizeof...(K)], second[sizeof...(K)];
      (arrays.load_pair(i, first[K], second[K]), ...);
      body(first[K]...);
      body(second[K]...);
      (arrays.store_pair(i, first[K], second[K]), ...);
    }
  }
  for (; i < n; ++i) {
    A value[sizeof...(K)] = {arrays.template load<A>(i)...};
    body(value[K]...);
    (arrays.store(i, value[K]), ...);
  }
}

// body(value...) on element i of every array, for i < n: each loaded as A, passed by reference,
// and stored back (rounded once) into the InOut arrays. By pairs when every array is 16-bit.
template <typename A, typename Body, typename... Arrays>
FASTOPT_CPU_INLINE void for_elements(int64_t n, const Body& body, Arrays... arrays) {
  for_elements_of<A>(n, body, std::index_sequence_for<Arrays...>{}, arrays...);
}

// fp16 / bf16 / fp32 elements compute in fp32, fp64 in fp64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Lanes of a block's reduction: four vectors of the widest ISA, independent accumulators.
template <typename A>
constexpr int kLanes = 256 / int(sizeof(A));
// Terms summed in each of A's lanes before the lanes are folded and added into the block's double
// partial: bounds the fp32 rounding error of a sum.
constexpr int64_t kTermsPerLane = 64;

template <typename A, int L>
FASTOPT_CPU_INLINE A fold_lanes(A (&lanes)[L], NormKind kind) {
  for (int width = L / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] = norm_combine(lanes[j], lanes[j + width], kind);
  return lanes[0];
}

// The one-array loops (norm, unscale, scale, clamp) read a block as kStreams equal parts side by
// side rather than front to back: the hardware prefetchers track each part, and a core reads
// faster. Measured on a 2-core Zen 1 (norm and unscale loops over 5 M fp32, 2 threads): one
// stream 1.2-1.4 ms, two 1.0-1.06 ms, four and eight 1.25-1.6 ms. Each step reads L consecutive
// elements of every part; the elements past the parts (fewer than Parts * L) are the tail.
constexpr int kStreams = 2;

// The parts of a loop over T: one where it writes 16-bit elements, whose conversion from fp32,
// not memory, bounds it (in parts it ran 5-11% slower); L is then the lanes over the parts.
template <typename T, bool Writes>
constexpr int kParts = sizeof(T) == 2 && Writes ? 1 : kStreams;

// element(index, lane) for the steps [begin, end) of every part (`part` elements each, a multiple
// of L); lane in [0, Parts * L) says which part and which of L consecutive elements.
template <int Parts, int L, typename Element>
FASTOPT_CPU_INLINE void stream_steps(int64_t begin, int64_t end, int64_t part, const Element& element) {
  for (int64_t i = begin; i < end; i += L)
    for (int s = 0; s < Parts; ++s)
      for (int j = 0; j < L; ++j) element(s * part + i + j, s * L + j);
}

// x[i] = f(x[i]) on every element of a block of n: in parts, or by pairs for 16-bit elements.
template <typename T, typename F>
FASTOPT_CPU_INLINE void transform_streamed(T* __restrict x, int64_t n, const F& f) {
  using A = acc_t<T>;
  constexpr int Parts = kParts<T, true>, L = kLanes<A> / Parts;
  if constexpr (Parts == 1) {
    for_elements<A>(n, [&](A& v) { v = f(v); }, InOut<T>(x));
  } else {
    const int64_t part = n / (Parts * L) * L;
    stream_steps<Parts, L>(0, part, part, [&](int64_t i, int) { store(x[i], f(load<A>(x[i]))); });
    for (int64_t i = Parts * part; i < n; ++i) store(x[i], f(load<A>(x[i])));
  }
}

// One block of the norm pass: its partial (a sum of contributions, or a max) in double, and
// whether it holds an inf or nan. With Unscale, x *= scale in place, from the same read (the
// check sees the values before scaling, as torch's unscale does). Kind is a template argument so
// that the per-element switch of norm_contribution folds away. The partial is summed in a fixed
// order (parts, lanes, folds) that depends on n only: the same bits whatever the threads.
template <typename T, int Kind, bool Unscale>
FASTOPT_CPU_CLONES void norm_block(T* __restrict x, int64_t n, double p_value, double scale_value, double* partial,
                                   bool* nonfinite) {
  using A = acc_t<T>;
  constexpr NormKind kind = NormKind(Kind);
  constexpr int kAll = kLanes<A>, Parts = kParts<T, Unscale>, L = kAll / Parts;
  const A p = A(p_value), scale = A(scale_value);
  double total = 0.0;
  A zero_lanes[kAll] = {};  // x * 0: 0 for finite x, nan for inf or nan (only for kNoNorm)
  const auto visit = [&](int64_t i, A& lane, A& zero_lane) {
    const A v = load<A>(x[i]);
    if constexpr (Kind != kNoNorm) lane = norm_combine(lane, norm_contribution(v, kind, p), kind);
    if constexpr (Kind == kNoNorm) zero_lane += v * A(0);
    if constexpr (Unscale) store(x[i], v * scale);
  };
  const int64_t part = n / (Parts * L) * L, tail = Parts * part;
  if constexpr (Kind == kNoNorm && Unscale && sizeof(T) == 2 && kPairs) {
    // By pairs (see load_pair); only the inf / nan check is summed, its order does not matter.
    int64_t i = 0;
    for (; i + kAll <= n; i += kAll) {
      for (int k = 0; k < kAll / 2; ++k) {
        A first, second;
        load_pair(x + i + 2 * k, first, second);
        zero_lanes[k] += first * A(0) + second * A(0);
        store_pair(x + i + 2 * k, first * scale, second * scale);
      }
    }
    for (int j = 0; i < n; ++i, ++j) visit(i, zero_lanes[j], zero_lanes[j]);
    *nonfinite = !is_finite(fold_lanes(zero_lanes, kSumAbs));
    *partial = 0.0;
    return;
  }
  for (int64_t base = 0; base < part; base += kTermsPerLane * L) {
    const int64_t end = base + kTermsPerLane * L < part ? base + kTermsPerLane * L : part;
    A lanes[kAll] = {};
    stream_steps<Parts, L>(base, end, part, [&](int64_t i, int lane) { visit(i, lanes[lane], zero_lanes[lane]); });
    if constexpr (Kind != kNoNorm) total = norm_combine(total, double(fold_lanes(lanes, kind)), kind);
  }
  if (tail < n) {
    A lanes[kAll] = {};
    for (int64_t i = tail; i < n; ++i) visit(i, lanes[i - tail], zero_lanes[i - tail]);
    if constexpr (Kind != kNoNorm) total = norm_combine(total, double(fold_lanes(lanes, kind)), kind);
  }
  *partial = total;
  if constexpr (Kind == kNoNorm) {
    *nonfinite = !is_finite(fold_lanes(zero_lanes, kSumAbs));
  } else {
    // A finite sum (or max) of contributions proves every element finite; otherwise look again
    // (a large finite element may have overflowed its square). Unscale runs with kNoNorm only.
    bool bad = false;
    if (!is_finite(total))
      for (int64_t i = 0; i < n; ++i) bad |= !is_finite(load<A>(x[i]));
    *nonfinite = bad;
  }
}

// x *= factor in A (then rounded once to x's type).
template <typename T>
FASTOPT_CPU_CLONES void scale_block(T* __restrict x, int64_t n, double factor_value) {
  using A = acc_t<T>;
  const A factor = A(factor_value);
  transform_streamed(x, n, [&](A v) { return v * factor; });
}

// x = clamp(x, -limit, limit); nan stays nan.
template <typename T>
FASTOPT_CPU_CLONES void clamp_block(T* __restrict x, int64_t n, double limit_value) {
  using A = acc_t<T>;
  const A limit = A(limit_value);
  transform_streamed(x, n, [&](A v) { return clamp_symmetric(v, limit); });
}

// The grad as an update uses it. Scaled: g / grad_scale * clip_coef (maximize folds into a
// negative grad_scale: -(g / s) == g / -s exactly), by a division when Divides, else as g times
// the exact inverse of the scale (has_exact_inverse: the same bits). `scale` is what scale_for
// gives the loop.
template <bool Scaled, bool Divides, typename A>
FASTOPT_CPU_INLINE A update_grad(A g, A scale, A clip_coef) {
  if constexpr (!Scaled) return g;
  else if constexpr (Divides) return effective_grad(g, scale, clip_coef, false);
  else return effective_grad_by_inverse(g, scale, clip_coef);
}
template <typename A, bool Divides>
FASTOPT_CPU_INLINE A scale_for(double grad_scale) {
  return Divides ? A(grad_scale) : A(1.0 / grad_scale);
}

// The elements of one AdamW block (see adamw_block), with the lerp's end fixed. L2: Adam's weight
// decay (decoupled_weight_decay=False), added to the grad.
template <typename P, typename G, typename S, bool AMSGrad, bool Scaled, bool Divides, bool L2,
          bool LerpFromStart>
FASTOPT_CPU_INLINE void adamw_elements(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg,
                                       S* __restrict exp_avg_sq, S* __restrict max_exp_avg_sq, int64_t n,
                                       const AdamWConstants<acc_t<P>>& c, acc_t<P> grad_scale, acc_t<P> clip_coef) {
  using A = acc_t<P>;
  if constexpr (AMSGrad) {
    for_elements<A>(
        n,
        [&](A& p, A& g, A& m, A& v, A& v_max) {
          g = update_grad<Scaled, Divides>(g, grad_scale, clip_coef);
          adamw_update_fused<LerpFromStart, A, L2>(p, g, m, v, &v_max, c);
        },
        InOut<P>(param), In<G>{grad}, InOut<S>(exp_avg), InOut<S>(exp_avg_sq), InOut<S>(max_exp_avg_sq));
  } else {
    for_elements<A>(
        n,
        [&](A& p, A& g, A& m, A& v) {
          g = update_grad<Scaled, Divides>(g, grad_scale, clip_coef);
          adamw_update_fused<LerpFromStart, A, L2>(p, g, m, v, nullptr, c);
        },
        InOut<P>(param), In<G>{grad}, InOut<S>(exp_avg), InOut<S>(exp_avg_sq));
  }
}

// One block of AdamW; the grad as update_grad forms it.
template <typename P, typename G, typename S, bool AMSGrad, bool Scaled, bool Divides, bool L2>
FASTOPT_CPU_CLONES void adamw_block(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg,
                                    S* __restrict exp_avg_sq, S* __restrict max_exp_avg_sq, int64_t n,
                                    const AdamWConstants<double>& constants, double grad_scale_value,
                                    double clip_coef_value) {
  using A = acc_t<P>;
  const AdamWConstants<A> c = adamw_constants_as<A>(constants);
  const A grad_scale = scale_for<A, Divides>(grad_scale_value), clip_coef = A(clip_coef_value);
  if (lerp_from_start(c.one_minus_beta1))
    adamw_elements<P, G, S, AMSGrad, Scaled, Divides, L2, true>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                                                n, c, grad_scale, clip_coef);
  else
    adamw_elements<P, G, S, AMSGrad, Scaled, Divides, L2, false>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                                                 n, c, grad_scale, clip_coef);
}

// One block of SGD (torch.optim.SGD's order, each add-with-alpha one fma as torch's CPU kernels
// round it). Momentum: momentum_buffer is read (unless First) and written; without it, it is
// null. The flags are template arguments so that the loop has no branch and vectorises. The
// grad as adamw_block forms it.
template <typename P, typename G, typename S, bool Momentum, bool First, bool Nesterov, bool WeightDecay, bool Scaled,
          bool Divides>
FASTOPT_CPU_CLONES void sgd_block(P* __restrict param, const G* __restrict grad, S* __restrict momentum_buffer,
                                  int64_t n, const SGDConstants<double>& constants, double grad_scale_value,
                                  double clip_coef_value) {
  using A = acc_t<P>;
  const SGDConstants<A> c{A(constants.weight_decay), A(constants.momentum), A(constants.one_minus_dampening),
                          A(constants.neg_lr)};
  const A grad_scale = scale_for<A, Divides>(grad_scale_value), clip_coef = A(clip_coef_value);
  if constexpr (Momentum) {
    // The first step writes the buffer without reading it (sgd_update_fused ignores its value).
    using Buffer = std::conditional_t<First, Out<S>, InOut<S>>;
    for_elements<A>(
        n,
        [&](A& p, A& g, A& buffer) {
          g = update_grad<Scaled, Divides>(g, grad_scale, clip_coef);
          sgd_update_fused<WeightDecay, First, Nesterov>(p, g, &buffer, c);
        },
        InOut<P>(param), In<G>{grad}, Buffer(momentum_buffer));
  } else {
    for_elements<A>(
        n,
        [&](A& p, A& g) {
          g = update_grad<Scaled, Divides>(g, grad_scale, clip_coef);
          sgd_update_fused<WeightDecay, false, false, A>(p, g, nullptr, c);
        },
        InOut<P>(param), In<G>{grad});
  }
}

// The elements of one Lion block (see lion_block), with the lerps' ends fixed.
template <typename P, typename G, typename S, bool Scaled, bool Divides, bool DirectionFromStart,
          bool MomentumFromStart>
FASTOPT_CPU_INLINE void lion_elements(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg, int64_t n,
                                      const LionConstants<acc_t<P>>& c, acc_t<P> grad_scale, acc_t<P> clip_coef) {
  using A = acc_t<P>;
  for_elements<A>(
      n,
      [&](A& p, A& g, A& m) {
        g = update_grad<Scaled, Divides>(g, grad_scale, clip_coef);
        lion_update<DirectionFromStart, MomentumFromStart>(p, g, m, c);
      },
      InOut<P>(param), In<G>{grad}, InOut<S>(exp_avg));
}

// One block of Lion; the grad as adamw_block forms it.
template <typename P, typename G, typename S, bool Scaled, bool Divides>
FASTOPT_CPU_CLONES void lion_block(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg, int64_t n,
                                   const LionConstants<double>& constants, double grad_scale_value,
                                   double clip_coef_value) {
  using A = acc_t<P>;
  const LionConstants<A> c{A(constants.decay_factor), A(constants.one_minus_beta1), A(constants.one_minus_beta2),
                           A(constants.neg_lr)};
  const A grad_scale = scale_for<A, Divides>(grad_scale_value), clip_coef = A(clip_coef_value);
  const bool direction_from_start = lerp_from_start(c.one_minus_beta1);
  if (lerp_from_start(c.one_minus_beta2)) {
    if (direction_from_start)
      lion_elements<P, G, S, Scaled, Divides, true, true>(param, grad, exp_avg, n, c, grad_scale, clip_coef);
    else
      lion_elements<P, G, S, Scaled, Divides, false, true>(param, grad, exp_avg, n, c, grad_scale, clip_coef);
  } else {
    if (direction_from_start)
      lion_elements<P, G, S, Scaled, Divides, true, false>(param, grad, exp_avg, n, c, grad_scale, clip_coef);
    else
      lion_elements<P, G, S, Scaled, Divides, false, false>(param, grad, exp_avg, n, c, grad_scale, clip_coef);
  }
}

}  // namespace cpu
}  // namespace fastopt
