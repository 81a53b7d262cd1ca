// AdamW's (and Adam's) block functions: update_blocks.h.
#include "update_blocks.h"

namespace fastopt {
namespace cpu {

AdamWBlockFn adamw_block_fn(DType p_type, DType g_type, DType s_type, unsigned variant) {
  using namespace adamw_variant;
  return combination_fn<AdamWBlockFn>(p_type, g_type, s_type, [variant]<typename P, typename G, typename S>() {
    return with_flags(
        []<bool AMSGrad, bool Scaled, bool Divides, bool L2>() -> AdamWBlockFn {
          if constexpr (Divides && !Scaled) {
            return nullptr;  // not a variant (kScaleDivides goes with kScaled)
          } else {
            return [](void* p, const void* g, void* m, void* v, void* vmax, int64_t n, const AdamWConstants<double>& c,
                      double gs, double cc) {
              adamw_block<P, G, S, AMSGrad, Scaled, Divides, L2>(static_cast<P*>(p), static_cast<const G*>(g),
                                                                 static_cast<S*>(m), static_cast<S*>(v),
                                                                 static_cast<S*>(vmax), n, c, gs, cc);
            };
          }
        },
        variant & kAMSGrad, variant & kScaled, variant & kScaleDivides, variant & kL2);
  });
}

}  // namespace cpu
}  // namespace fastopt
