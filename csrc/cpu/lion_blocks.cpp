// Lion's block functions: update_blocks.h.
#include "update_blocks.h"

namespace fastopt {
namespace cpu {

LionBlockFn lion_block_fn(DType p_type, DType g_type, DType s_type, unsigned variant) {
  using namespace lion_variant;
  return combination_fn<LionBlockFn>(p_type, g_type, s_type, [variant]<typename P, typename G, typename S>() {
    return with_flags(
        []<bool Scaled, bool Divides>() -> LionBlockFn {
          if constexpr (Divides && !Scaled) {
            return nullptr;  // not a variant (kScaleDivides goes with kScaled)
          } else {
            return [](void* p, const void* g, void* m, void*, void*, int64_t n, const LionConstants<double>& c,
                      double gs, double cc) {
              lion_block<P, G, S, Scaled, Divides>(static_cast<P*>(p), static_cast<const G*>(g), static_cast<S*>(m),
                                                   n, c, gs, cc);
            };
          }
        },
        variant & kScaled, variant & kScaleDivides);
  });
}

}  // namespace cpu
}  // namespace fastopt
