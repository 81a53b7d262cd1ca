// SGD's block functions: update_blocks.h.
#include "update_blocks.h"

namespace fastopt {
namespace cpu {

// Without momentum there is no state (s is the param's dtype) and no first step or Nesterov: those
// loops are compiled once per (param, grad) pair.
SGDBlockFn sgd_block_fn(DType p_type, DType g_type, DType s_type, unsigned variant) {
  using namespace sgd_variant;
  return combination_fn<SGDBlockFn>(p_type, g_type, s_type, [variant]<typename P, typename G, typename S>() {
    if (variant & kMomentum)
      return with_flags(
          []<bool First, bool Nesterov, bool WeightDecay, bool Scaled, bool Divides>() -> SGDBlockFn {
            if constexpr (Divides && !Scaled) {
              return nullptr;  // not a variant (kScaleDivides goes with kScaled)
            } else {
              return [](void* p, const void* g, void* buffer, void*, void*, int64_t n, const SGDConstants<double>& c,
                        double gs, double cc) {
                sgd_block<P, G, S, true, First, Nesterov, WeightDecay, Scaled, Divides>(
                    static_cast<P*>(p), static_cast<const G*>(g), static_cast<S*>(buffer), n, c, gs, cc);
              };
            }
          },
          variant & kFirst, variant & kNesterov, variant & kWeightDecay, variant & kScaled, variant & kScaleDivides);
    if constexpr (std::is_same_v<P, S>) {
      return with_flags(
          []<bool WeightDecay, bool Scaled, bool Divides>() -> SGDBlockFn {
            if constexpr (Divides && !Scaled) {
              return nullptr;  // not a variant (kScaleDivides goes with kScaled)
            } else {
              return [](void* p, const void* g, void*, void*, void*, int64_t n, const SGDConstants<double>& c,
                        double gs, double cc) {
                sgd_block<P, G, P, false, false, false, WeightDecay, Scaled, Divides>(
                    static_cast<P*>(p), static_cast<const G*>(g), nullptr, n, c, gs, cc);
              };
            }
          },
          variant & kWeightDecay, variant & kScaled, variant & kScaleDivides);
    } else {
      return SGDBlockFn(nullptr);  // never asked: without a state, s is the param's dtype
    }
  });
}

}  // namespace cpu
}  // namespace fastopt
