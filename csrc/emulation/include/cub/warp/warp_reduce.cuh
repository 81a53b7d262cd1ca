// The emulation's stand-in for CUB's cub::WarpReduce (CUB's device code is PTX that g++ cannot
// compile). Same interface and the same reduction tree as CUB's shuffle specialisation
// (WarpReduceShfl: shfl.down by 1, 2, 4, ... lanes, lane i combining its value with lane
// i + offset's while that lane is valid; the result valid in lane 0), written with the emulated
// __shfl_down_sync, so the order of the combine calls, and the bits, are CUB's.
#pragma once

#include <cuda/std/functional>

namespace cub {

struct Sum {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return a + b;
  }
};
struct Max {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return a < b ? b : a;
  }
};
struct Min {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return b < a ? b : a;
  }
};

template <typename T, int LOGICAL_WARP_THREADS = 32, int LEGACY_PTX_ARCH = 0>
class WarpReduce {
  static_assert(LOGICAL_WARP_THREADS >= 1 && LOGICAL_WARP_THREADS <= 32 &&
                    (LOGICAL_WARP_THREADS & (LOGICAL_WARP_THREADS - 1)) == 0,
                "the emulated WarpReduce supports logical warps of a power of two lanes");

 public:
  struct TempStorage {
    unsigned char unused;  // the shuffle specialisation keeps nothing in shared memory
  };

  explicit WarpReduce(TempStorage&) {}

  template <typename ReductionOp>
  T Reduce(T input, ReductionOp reduction_op) {
    return Reduce(input, reduction_op, LOGICAL_WARP_THREADS);
  }

  template <typename ReductionOp>
  T Reduce(T input, ReductionOp reduction_op, int valid_items) {
    const unsigned lane_in_warp = ::fastopt_emu::current->linear % 32u;
    const unsigned logical_lane = lane_in_warp % LOGICAL_WARP_THREADS;
    const unsigned first = lane_in_warp - logical_lane;
    const unsigned mask =
        LOGICAL_WARP_THREADS == 32 ? 0xffffffffu : (((1u << LOGICAL_WARP_THREADS) - 1u) << first);
    const int last_lane = valid_items - 1;
    for (int offset = 1; offset < LOGICAL_WARP_THREADS; offset *= 2) {
      const T other = __shfl_down_sync(mask, input, static_cast<unsigned>(offset), LOGICAL_WARP_THREADS);
      if (static_cast<int>(logical_lane) + offset <= last_lane) input = reduction_op(input, other);
    }
    return input;
  }

  T Sum(T input) { return Reduce(input, cub::Sum{}); }
  T Sum(T input, int valid_items) { return Reduce(input, cub::Sum{}, valid_items); }
};

}  // namespace cub
