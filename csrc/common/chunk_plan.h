// The chunk planner: how one kernel launch splits any number of tensors into work items.
//
// Host C++ only (no CUDA, no torch), so the unit tests in csrc/tests exercise it with ctest.
// host_runtime.cpp turns a plan into the device-side table of multi_tensor.cuh.
//
// A *segment* is a run of elements whose reduction belongs together: a whole tensor, or for
// AGC one unit (a slice along dim 0) of it. A *chunk* is at most `chunk_size` consecutive
// elements of one segment: one block of a launch handles one chunk at a time. Tensors are
// ordered by a group key (their dtype combination, for kernels compiled per combination), so
// that each group's chunks form one contiguous range: one launch per group.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace fastopt {

struct ChunkGroup {
  int64_t key;          // the group key shared by the group's tensors
  int64_t first_chunk;  // the group's chunks are [first_chunk, first_chunk + num_chunks)
  int64_t num_chunks;
};

struct ChunkPlan {
  // One entry per chunk: its tensor, its segment, and its elements [start, end) of the tensor.
  std::vector<int64_t> chunk_tensor, chunk_segment, chunk_start, chunk_end;
  // One entry per segment: its tensor, its first chunk and number of chunks. Segments are in
  // tensor order within a group; with one group and no units, segment i is tensor i.
  std::vector<int64_t> segment_tensor, segment_first_chunk, segment_num_chunks;
  std::vector<ChunkGroup> groups;  // in increasing key order

  int64_t num_chunks() const { return static_cast<int64_t>(chunk_tensor.size()); }
  int64_t num_segments() const { return static_cast<int64_t>(segment_tensor.size()); }
};

// numels[i]: tensor i's element count. units[i] (empty: all 1): how many equal segments tensor i
// splits into (a divisor of numels[i], or 0 / 1 for the whole tensor). group_keys (empty: one
// group). min_one_chunk: an empty segment still gets one (empty) chunk, for kernels that must
// visit every tensor (AdamW increments every step count).
inline ChunkPlan plan_chunks(const std::vector<int64_t>& numels, const std::vector<int64_t>& units,
                             const std::vector<int64_t>& group_keys, int64_t chunk_size,
                             bool min_one_chunk) {
  const int64_t num_tensors = static_cast<int64_t>(numels.size());
  if (chunk_size <= 0) throw std::invalid_argument("chunk_size must be positive");
  if (!units.empty() && static_cast<int64_t>(units.size()) != num_tensors)
    throw std::invalid_argument("units must have one entry per tensor");
  if (!group_keys.empty() && static_cast<int64_t>(group_keys.size()) != num_tensors)
    throw std::invalid_argument("group_keys must have one entry per tensor");

  std::vector<int64_t> order(num_tensors);
  std::iota(order.begin(), order.end(), 0);
  if (!group_keys.empty())
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return group_keys[a] < group_keys[b]; });

  ChunkPlan plan;
  plan.chunk_tensor.reserve(num_tensors);
  for (int64_t position = 0; position < num_tensors; ++position) {
    const int64_t tensor = order[position];
    const int64_t key = group_keys.empty() ? 0 : group_keys[tensor];
    if (plan.groups.empty() || plan.groups.back().key != key)
      plan.groups.push_back({key, plan.num_chunks(), 0});

    const int64_t numel = numels[tensor];
    if (numel < 0) throw std::invalid_argument("numels must be non-negative");
    if (!units.empty() && units[tensor] < 0) throw std::invalid_argument("units must be non-negative");
    const int64_t unit_count = units.empty() ? 1 : std::max<int64_t>(units[tensor], 1);
    if (numel % unit_count != 0) throw std::invalid_argument("units must divide the tensor's numel");
    const int64_t unit_length = numel / unit_count;
    for (int64_t unit = 0; unit < unit_count; ++unit) {
      const int64_t segment = plan.num_segments();
      const int64_t start = unit * unit_length, end = start + unit_length;
      int64_t count = (unit_length + chunk_size - 1) / chunk_size;
      if (count == 0 && min_one_chunk) count = 1;
      plan.segment_tensor.push_back(tensor);
      plan.segment_first_chunk.push_back(plan.num_chunks());
      plan.segment_num_chunks.push_back(count);
      for (int64_t c = 0; c < count; ++c) {
        plan.chunk_tensor.push_back(tensor);
        plan.chunk_segment.push_back(segment);
        plan.chunk_start.push_back(std::min(start + c * chunk_size, end));
        plan.chunk_end.push_back(std::min(start + (c + 1) * chunk_size, end));
      }
    }
    plan.groups.back().num_chunks = plan.num_chunks() - plan.groups.back().first_chunk;
  }
  return plan;
}

}  // namespace fastopt
