// The emulation's stand-in for CUB's cub::BlockReduce. Every algorithm runs as CUB's
// BLOCK_REDUCE_WARP_REDUCTIONS does: each warp reduces its values (cub::WarpReduce), lane 0 of
// each warp stores the warp's result in the TempStorage, a barrier, then thread 0 combines the
// warps' results in warp order. The result is valid in thread 0. Like CUB, it does not end with a
// barrier: TempStorage may be reused only after one.
#pragma once

#include <stdexcept>

#include <cub/warp/warp_reduce.cuh>

namespace cub {

enum BlockReduceAlgorithm {
  BLOCK_REDUCE_RAKING_COMMUTATIVE_ONLY,
  BLOCK_REDUCE_RAKING,
  BLOCK_REDUCE_WARP_REDUCTIONS,
  BLOCK_REDUCE_WARP_REDUCTIONS_NONDETERMINISTIC,
};

template <typename T, int BLOCK_DIM_X, BlockReduceAlgorithm ALGORITHM = BLOCK_REDUCE_WARP_REDUCTIONS,
          int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1, int LEGACY_PTX_ARCH = 0>
class BlockReduce {
  static constexpr int kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;
  static constexpr int kWarps = (kThreads + 31) / 32;

 public:
  struct TempStorage {
    T warp_aggregates[kWarps];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <typename ReductionOp>
  T Reduce(T input, ReductionOp reduction_op) {
    return Reduce(input, reduction_op, kThreads);
  }

  template <int ITEMS, typename ReductionOp>
  T Reduce(T (&inputs)[ITEMS], ReductionOp reduction_op) {
    T partial = inputs[0];
    for (int i = 1; i < ITEMS; ++i) partial = reduction_op(partial, inputs[i]);
    return Reduce(partial, reduction_op);
  }

  template <typename ReductionOp>
  T Reduce(T input, ReductionOp reduction_op, int num_valid) {
    const int linear = static_cast<int>(::fastopt_emu::current->linear);
    if (static_cast<int>(::fastopt_emu::current->block->block_dim.x * ::fastopt_emu::current->block->block_dim.y *
                         ::fastopt_emu::current->block->block_dim.z) != kThreads) {
      throw std::logic_error("cub::BlockReduce: the block does not have the BLOCK_DIM_X*Y*Z threads it was declared for");
    }
    const int warp = linear / 32, lane = linear % 32;
    int valid = num_valid - warp * 32;
    valid = valid < 0 ? 0 : (valid > 32 ? 32 : valid);
    T aggregate = WarpReduce<T, 32>(warp_storage_).Reduce(input, reduction_op, valid);
    if (lane == 0) storage_.warp_aggregates[warp] = aggregate;
    __syncthreads();
    if (linear == 0) {
      const int warps = (num_valid + 31) / 32;
      for (int w = 1; w < warps && w < kWarps; ++w) aggregate = reduction_op(aggregate, storage_.warp_aggregates[w]);
    }
    return aggregate;
  }

  T Sum(T input) { return Reduce(input, cub::Sum{}); }
  template <int ITEMS>
  T Sum(T (&inputs)[ITEMS]) {
    return Reduce(inputs, cub::Sum{});
  }
  T Sum(T input, int num_valid) { return Reduce(input, cub::Sum{}, num_valid); }

 private:
  TempStorage& storage_;
  typename WarpReduce<T, 32>::TempStorage warp_storage_{};
};

}  // namespace cub
