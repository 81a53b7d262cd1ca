// Host unit test of csrc/common/chunk_plan.h: plan_chunks on hand-made and many random layouts (fixed
// seeds). Every plan is checked two ways: against an expected plan built here independently
// (groups by distinct key, tensors in index order within a group), and for the properties the
// kernels rely on (chunks cover each segment exactly once, in order, at most chunk_size long;
// segment and group ranges consistent with the chunk rows).
#include "common/chunk_plan.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"

namespace {

using fastopt::ChunkPlan;
using fastopt::plan_chunks;

struct Layout {
  std::vector<int64_t> numels, units, group_keys;
  int64_t chunk_size = 1;
  bool min_one_chunk = false;
};

std::string describe(const Layout& layout) {
  std::string out = "chunk_size " + std::to_string(layout.chunk_size) + (layout.min_one_chunk ? " min_one_chunk" : "") +
                    " numels [";
  for (size_t i = 0; i < layout.numels.size() && i < 12; ++i) out += (i ? " " : "") + std::to_string(layout.numels[i]);
  if (layout.numels.size() > 12) out += " ...";
  out += "] units [";
  for (size_t i = 0; i < layout.units.size() && i < 12; ++i) out += (i ? " " : "") + std::to_string(layout.units[i]);
  out += "] keys [";
  for (size_t i = 0; i < layout.group_keys.size() && i < 12; ++i) out += (i ? " " : "") + std::to_string(layout.group_keys[i]);
  return out + "]";
}

ChunkPlan plan(const Layout& layout) {
  return plan_chunks(layout.numels, layout.units, layout.group_keys, layout.chunk_size, layout.min_one_chunk);
}

// The plan built independently: for each distinct key in increasing order, that key's tensors
// in index order; each tensor's units in order; each unit split into chunk_size pieces from its
// start (an empty unit: no chunk, or one empty chunk with min_one_chunk).
ChunkPlan expected_plan(const Layout& layout) {
  const int64_t num_tensors = static_cast<int64_t>(layout.numels.size());
  std::map<int64_t, std::vector<int64_t>> by_key;  // ordered by key; tensors appended in index order
  for (int64_t i = 0; i < num_tensors; ++i) by_key[layout.group_keys.empty() ? 0 : layout.group_keys[i]].push_back(i);
  ChunkPlan expected;
  for (const auto& [key, tensors] : by_key) {
    fastopt::ChunkGroup group{key, static_cast<int64_t>(expected.chunk_tensor.size()), 0};
    for (int64_t tensor : tensors) {
      const int64_t numel = layout.numels[tensor];
      const int64_t units = layout.units.empty() || layout.units[tensor] == 0 ? 1 : layout.units[tensor];
      const int64_t length = numel / units;
      for (int64_t unit = 0; unit < units; ++unit) {
        const int64_t segment = static_cast<int64_t>(expected.segment_tensor.size());
        expected.segment_tensor.push_back(tensor);
        expected.segment_first_chunk.push_back(static_cast<int64_t>(expected.chunk_tensor.size()));
        int64_t chunks = 0;
        const int64_t segment_start = unit * length, segment_end = segment_start + length;
        for (int64_t start = segment_start; start < segment_end; start += layout.chunk_size) {
          expected.chunk_tensor.push_back(tensor);
          expected.chunk_segment.push_back(segment);
          expected.chunk_start.push_back(start);
          expected.chunk_end.push_back(segment_end - start > layout.chunk_size ? start + layout.chunk_size : segment_end);
          ++chunks;
        }
        if (chunks == 0 && layout.min_one_chunk) {
          expected.chunk_tensor.push_back(tensor);
          expected.chunk_segment.push_back(segment);
          expected.chunk_start.push_back(segment_start);
          expected.chunk_end.push_back(segment_start);
          ++chunks;
        }
        expected.segment_num_chunks.push_back(chunks);
      }
    }
    group.num_chunks = static_cast<int64_t>(expected.chunk_tensor.size()) - group.first_chunk;
    expected.groups.push_back(group);
  }
  return expected;
}

// Properties of a plan that the kernels rely on, checked without the expected plan. Returns
// whether all held (so that a random sweep can stop reporting after the first bad layout).
bool check_properties(const Layout& layout, const ChunkPlan& p) {
  const std::string where = describe(layout);
  const int64_t num_tensors = static_cast<int64_t>(layout.numels.size());
  const int64_t chunks = p.num_chunks(), segments = p.num_segments();
  bool ok = true;
  ok &= CHECK(static_cast<int64_t>(p.chunk_segment.size()) == chunks && static_cast<int64_t>(p.chunk_start.size()) == chunks &&
                  static_cast<int64_t>(p.chunk_end.size()) == chunks,
              where, ": chunk columns of one length");
  ok &= CHECK(static_cast<int64_t>(p.segment_first_chunk.size()) == segments &&
                  static_cast<int64_t>(p.segment_num_chunks.size()) == segments,
              where, ": segment columns of one length");
  if (!ok) return false;

  auto key_of = [&](int64_t tensor) { return layout.group_keys.empty() ? int64_t{0} : layout.group_keys[tensor]; };
  auto units_of = [&](int64_t tensor) {
    return layout.units.empty() || layout.units[tensor] == 0 ? int64_t{1} : layout.units[tensor];
  };

  // Segments: each tensor's units, consecutive and in order; tensors in a stable key order.
  std::vector<int64_t> seen_segments(num_tensors, 0);
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t tensor = p.segment_tensor[s];
    if (!CHECK(tensor >= 0 && tensor < num_tensors, where, ": segment ", s, " tensor ", tensor)) return false;
    ++seen_segments[tensor];
    if (s > 0) {
      const int64_t previous = p.segment_tensor[s - 1];
      if (previous != tensor) {
        ok &= CHECK(seen_segments[tensor] == 1, where, ": tensor ", tensor, "'s segments are not consecutive");
        ok &= CHECK(key_of(previous) < key_of(tensor) || (key_of(previous) == key_of(tensor) && previous < tensor), where,
                    ": tensors ", previous, " then ", tensor, " out of (key, index) order");
      }
    }
    // Chunk ranges of segments follow each other.
    const int64_t first = p.segment_first_chunk[s], count = p.segment_num_chunks[s];
    ok &= CHECK(first == (s == 0 ? 0 : p.segment_first_chunk[s - 1] + p.segment_num_chunks[s - 1]), where, ": segment ", s,
                " first chunk ", first);
    ok &= CHECK(count >= 0 && first >= 0 && first + count <= chunks, where, ": segment ", s, " chunk range");
    if (!ok) return false;
    // The segment's elements [start, end) of the tensor, from its unit index.
    const int64_t unit = seen_segments[tensor] - 1, length = layout.numels[tensor] / units_of(tensor);
    const int64_t start = unit * length, end = start + length;
    if (length == 0) {
      ok &= CHECK(count == (layout.min_one_chunk ? 1 : 0), where, ": empty segment ", s, " has ", count, " chunks");
    } else {
      ok &= CHECK(count == (length + layout.chunk_size - 1) / layout.chunk_size, where, ": segment ", s, " has ", count,
                  " chunks for ", length, " elements");
    }
    int64_t position = start;
    for (int64_t c = first; c < first + count; ++c) {
      ok &= CHECK(p.chunk_segment[c] == s && p.chunk_tensor[c] == tensor, where, ": chunk ", c, " belongs to segment ", s);
      ok &= CHECK(p.chunk_start[c] == position, where, ": chunk ", c, " starts at ", p.chunk_start[c], ", expected ", position);
      const int64_t size = p.chunk_end[c] - p.chunk_start[c];
      ok &= CHECK(size <= layout.chunk_size, where, ": chunk ", c, " has ", size, " elements");
      ok &= CHECK(size > 0 || (length == 0 && layout.min_one_chunk), where, ": chunk ", c, " is empty");
      ok &= CHECK(size >= 0, where, ": chunk ", c, " ends before it starts");
      position = p.chunk_end[c];
    }
    ok &= CHECK(position == end, where, ": segment ", s, "'s chunks end at ", position, ", expected ", end);
    if (!ok) return false;
  }
  // Every tensor's units are all there (and with them, every element exactly once).
  for (int64_t t = 0; t < num_tensors; ++t)
    ok &= CHECK(seen_segments[t] == units_of(t), where, ": tensor ", t, " has ", seen_segments[t], " segments");
  if (segments > 0)
    ok &= CHECK(p.segment_first_chunk.back() + p.segment_num_chunks.back() == chunks, where, ": segments cover the chunks");
  else
    ok &= CHECK(chunks == 0, where, ": chunks without segments");

  // Each tensor's chunks, in chunk order, tile [0, numel) exactly once.
  std::vector<int64_t> covered(num_tensors, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t tensor = p.chunk_tensor[c];
    ok &= CHECK(p.chunk_start[c] == covered[tensor], where, ": chunk ", c, " of tensor ", tensor, " starts at ",
                p.chunk_start[c], " but the tensor is covered up to ", covered[tensor]);
    covered[tensor] = p.chunk_end[c];
  }
  for (int64_t t = 0; t < num_tensors; ++t)
    ok &= CHECK(covered[t] == layout.numels[t], where, ": tensor ", t, " covered up to ", covered[t]);

  // Groups: keys strictly increasing, one per distinct key, chunk ranges contiguous, each chunk's
  // tensor carries its group's key.
  std::vector<int64_t> keys;
  for (int64_t t = 0; t < num_tensors; ++t) keys.push_back(key_of(t));
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  ok &= CHECK(p.groups.size() == keys.size(), where, ": ", p.groups.size(), " groups for ", keys.size(), " keys");
  int64_t next_chunk = 0;
  for (size_t g = 0; g < p.groups.size(); ++g) {
    const fastopt::ChunkGroup& group = p.groups[g];
    if (g < keys.size()) ok &= CHECK(group.key == keys[g], where, ": group ", g, " key ", group.key);
    ok &= CHECK(group.first_chunk == next_chunk && group.num_chunks >= 0, where, ": group ", g, " range");
    for (int64_t c = group.first_chunk; c < group.first_chunk + group.num_chunks && c < chunks; ++c)
      ok &= CHECK(key_of(p.chunk_tensor[c]) == group.key, where, ": chunk ", c, " in group ", g);
    next_chunk = group.first_chunk + group.num_chunks;
  }
  ok &= CHECK(next_chunk == chunks, where, ": groups cover ", next_chunk, " of ", chunks, " chunks");
  return ok;
}

bool check_equal(const Layout& layout, const ChunkPlan& actual, const ChunkPlan& expected) {
  const std::string where = describe(layout);
  bool ok = true;
  ok &= CHECK(actual.chunk_tensor == expected.chunk_tensor, where, ": chunk_tensor");
  ok &= CHECK(actual.chunk_segment == expected.chunk_segment, where, ": chunk_segment");
  ok &= CHECK(actual.chunk_start == expected.chunk_start, where, ": chunk_start");
  ok &= CHECK(actual.chunk_end == expected.chunk_end, where, ": chunk_end");
  ok &= CHECK(actual.segment_tensor == expected.segment_tensor, where, ": segment_tensor");
  ok &= CHECK(actual.segment_first_chunk == expected.segment_first_chunk, where, ": segment_first_chunk");
  ok &= CHECK(actual.segment_num_chunks == expected.segment_num_chunks, where, ": segment_num_chunks");
  bool groups_equal = actual.groups.size() == expected.groups.size();
  for (size_t g = 0; groups_equal && g < actual.groups.size(); ++g)
    groups_equal = actual.groups[g].key == expected.groups[g].key &&
                   actual.groups[g].first_chunk == expected.groups[g].first_chunk &&
                   actual.groups[g].num_chunks == expected.groups[g].num_chunks;
  ok &= CHECK(groups_equal, where, ": groups");
  return ok;
}

bool check_layout(const Layout& layout) {
  const ChunkPlan actual = plan(layout);
  const bool properties = check_properties(layout, actual);
  return check_equal(layout, actual, expected_plan(layout)) && properties;
}

// ------------------------------------------------------------------------------ hand-made cases

void test_simple() {
  // Three tensors, one group, chunk_size 4: 10 -> [0,4) [4,8) [8,10); 4 -> [0,4); 1 -> [0,1).
  Layout layout{{10, 4, 1}, {}, {}, 4, false};
  const ChunkPlan p = plan(layout);
  CHECK(p.chunk_tensor == std::vector<int64_t>({0, 0, 0, 1, 2}), "simple: chunk_tensor");
  CHECK(p.chunk_start == std::vector<int64_t>({0, 4, 8, 0, 0}), "simple: chunk_start");
  CHECK(p.chunk_end == std::vector<int64_t>({4, 8, 10, 4, 1}), "simple: chunk_end");
  CHECK(p.chunk_segment == std::vector<int64_t>({0, 0, 0, 1, 2}), "simple: chunk_segment");
  CHECK(p.segment_tensor == std::vector<int64_t>({0, 1, 2}), "simple: segment i is tensor i");
  CHECK(p.segment_first_chunk == std::vector<int64_t>({0, 3, 4}), "simple: segment_first_chunk");
  CHECK(p.segment_num_chunks == std::vector<int64_t>({3, 1, 1}), "simple: segment_num_chunks");
  CHECK(p.groups.size() == 1 && p.groups[0].key == 0 && p.groups[0].first_chunk == 0 && p.groups[0].num_chunks == 5,
        "simple: one group of all chunks");
  check_layout(layout);

  // No tensors: nothing at all.
  const ChunkPlan empty = plan_chunks({}, {}, {}, 8, true);
  CHECK(empty.num_chunks() == 0 && empty.num_segments() == 0 && empty.groups.empty(), "no tensors: empty plan");
}

void test_zero_element_tensors() {
  // Zero-element tensors get no chunks, but keep their segment (with no chunks).
  {
    Layout layout{{0, 5, 0}, {}, {}, 2, false};
    const ChunkPlan p = plan(layout);
    CHECK(p.chunk_tensor == std::vector<int64_t>({1, 1, 1}), "zero-element: only tensor 1 has chunks");
    CHECK(p.segment_tensor == std::vector<int64_t>({0, 1, 2}), "zero-element: segments of all tensors");
    CHECK(p.segment_num_chunks == std::vector<int64_t>({0, 3, 0}), "zero-element: no chunks for empty tensors");
    CHECK(p.segment_first_chunk == std::vector<int64_t>({0, 0, 3}), "zero-element: first chunks");
    check_layout(layout);
  }
  // With min_one_chunk, one empty chunk each ([0, 0)).
  {
    Layout layout{{0, 5, 0}, {}, {}, 2, true};
    const ChunkPlan p = plan(layout);
    CHECK(p.chunk_tensor == std::vector<int64_t>({0, 1, 1, 1, 2}), "min_one_chunk: chunk_tensor");
    CHECK(p.chunk_start == std::vector<int64_t>({0, 0, 2, 4, 0}), "min_one_chunk: chunk_start");
    CHECK(p.chunk_end == std::vector<int64_t>({0, 2, 4, 5, 0}), "min_one_chunk: chunk_end");
    CHECK(p.segment_num_chunks == std::vector<int64_t>({1, 3, 1}), "min_one_chunk: segment_num_chunks");
    CHECK(p.segment_first_chunk == std::vector<int64_t>({0, 1, 4}), "min_one_chunk: segment_first_chunk");
    check_layout(layout);
  }
  // Only zero-element tensors: no chunks, but their (empty) group is still listed.
  {
    Layout layout{{0, 0}, {}, {7, 7}, 16, false};
    const ChunkPlan p = plan(layout);
    CHECK(p.num_chunks() == 0 && p.num_segments() == 2, "all empty: no chunks, two segments");
    CHECK(p.groups.size() == 1 && p.groups[0].key == 7 && p.groups[0].num_chunks == 0, "all empty: one empty group");
    check_layout(layout);
    layout.min_one_chunk = true;
    const ChunkPlan q = plan(layout);
    CHECK(q.num_chunks() == 2 && q.groups.size() == 1 && q.groups[0].num_chunks == 2, "all empty, min_one_chunk: 2 chunks");
    check_layout(layout);
  }
  // units 0 on an empty tensor is the whole (empty) tensor.
  check_layout({{0, 12}, {0, 3}, {}, 5, true});
}

void test_units() {
  // Tensor 0: 12 elements in 3 units of 4, chunk_size 3 -> [0,3) [3,4) | [4,7) [7,8) | [8,11) [11,12).
  // Tensor 1: 5 elements, units 0 = whole. Tensor 2: 6 elements in 6 units of 1.
  Layout layout{{12, 5, 6}, {3, 0, 6}, {}, 3, false};
  const ChunkPlan p = plan(layout);
  CHECK(p.segment_tensor == std::vector<int64_t>({0, 0, 0, 1, 2, 2, 2, 2, 2, 2}), "units: segment_tensor");
  CHECK(p.segment_num_chunks == std::vector<int64_t>({2, 2, 2, 2, 1, 1, 1, 1, 1, 1}), "units: segment_num_chunks");
  CHECK(p.chunk_start == std::vector<int64_t>({0, 3, 4, 7, 8, 11, 0, 3, 0, 1, 2, 3, 4, 5}), "units: chunk_start");
  CHECK(p.chunk_end == std::vector<int64_t>({3, 4, 7, 8, 11, 12, 3, 5, 1, 2, 3, 4, 5, 6}), "units: chunk_end");
  CHECK(p.chunk_segment == std::vector<int64_t>({0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9}), "units: chunk_segment");
  check_layout(layout);
  // units == numel == 1, and units == numel for a long tensor.
  check_layout({{1, 64}, {1, 64}, {}, 8, false});
}

void test_groups() {
  // Keys 5, 2, 5, 2, 9 -> tensors 1, 3 (key 2), then 0, 2 (key 5), then 4 (key 9), stable.
  Layout layout{{3, 4, 5, 6, 7}, {}, {5, 2, 5, 2, 9}, 4, false};
  const ChunkPlan p = plan(layout);
  CHECK(p.segment_tensor == std::vector<int64_t>({1, 3, 0, 2, 4}), "groups: tensor order");
  CHECK(p.chunk_tensor == std::vector<int64_t>({1, 3, 3, 0, 2, 2, 4, 4}), "groups: chunk_tensor");
  CHECK(p.groups.size() == 3, "groups: three groups");
  if (p.groups.size() == 3) {
    CHECK(p.groups[0].key == 2 && p.groups[0].first_chunk == 0 && p.groups[0].num_chunks == 3, "groups: key 2");
    CHECK(p.groups[1].key == 5 && p.groups[1].first_chunk == 3 && p.groups[1].num_chunks == 3, "groups: key 5");
    CHECK(p.groups[2].key == 9 && p.groups[2].first_chunk == 6 && p.groups[2].num_chunks == 2, "groups: key 9");
  }
  check_layout(layout);
  // Negative and large keys, and a group whose tensors are all empty (zero chunks) in the middle.
  check_layout({{9, 0, 9, 0, 1}, {}, {std::numeric_limits<int64_t>::max(), -3, -7, -3, 0}, 2, false});
  check_layout({{9, 0, 9, 0, 1}, {}, {std::numeric_limits<int64_t>::max(), -3, -7, -3, 0}, 2, true});
  // Units with groups: a tensor's units stay together inside its group.
  check_layout({{8, 6, 9, 4}, {4, 3, 3, 1}, {1, 0, 1, 0}, 2, false});
}

// Tensors of more than 2^31 (and 2^32) elements: only numels, nothing is allocated.
void test_large() {
  const int64_t two31 = int64_t{1} << 31;
  {
    // 3 * 2^31 + 5 elements, chunk_size 2^20: 6145 chunks, the last one 5 elements long.
    const int64_t numel = 3 * two31 + 5, chunk_size = int64_t{1} << 20;
    Layout layout{{7, numel}, {}, {}, chunk_size, false};
    const ChunkPlan p = plan(layout);
    CHECK(p.num_chunks() == 1 + 6145, "large: chunk count ", p.num_chunks());
    CHECK(p.chunk_start.back() == 3 * two31 && p.chunk_end.back() == numel, "large: last chunk [", p.chunk_start.back(),
          ", ", p.chunk_end.back(), ")");
    // The chunk that crosses 2^31: chunk 2048 of the tensor starts at exactly 2^31.
    CHECK(p.chunk_start[1 + 2048] == two31 && p.chunk_end[1 + 2048] == two31 + chunk_size, "large: chunk at 2^31");
    check_layout(layout);
  }
  {
    // 4 units of 1,000,000,007 elements (4,000,000,028 in all, above 2^31 and 2^32), chunk_size 2^24.
    const int64_t length = 1000000007, numel = 4 * length, chunk_size = int64_t{1} << 24;
    Layout layout{{numel}, {4}, {}, chunk_size, false};
    const ChunkPlan p = plan(layout);
    CHECK(p.num_segments() == 4, "large units: 4 segments");
    const int64_t per_unit = (length + chunk_size - 1) / chunk_size;
    for (int64_t unit = 0; unit < 4 && p.num_segments() == 4; ++unit) {
      const int64_t first = p.segment_first_chunk[unit];
      CHECK(p.segment_num_chunks[unit] == per_unit, "large units: chunks of unit ", unit);
      CHECK(p.chunk_start[first] == unit * length, "large units: unit ", unit, " starts at ", p.chunk_start[first]);
      CHECK(p.chunk_end[first + per_unit - 1] == (unit + 1) * length, "large units: unit ", unit, " ends at ",
            p.chunk_end[first + per_unit - 1]);
    }
    check_layout(layout);
  }
  {
    // A chunk_size above 2^32 too: 2^34 + 1 elements in chunks of 2^33.
    const int64_t chunk_size = int64_t{1} << 33, numel = (int64_t{1} << 34) + 1;
    Layout layout{{numel, 3}, {}, {1, 0}, chunk_size, true};
    const ChunkPlan p = plan(layout);
    CHECK(p.chunk_start == std::vector<int64_t>({0, 0, chunk_size, 2 * chunk_size}), "huge chunk_size: starts");
    CHECK(p.chunk_end == std::vector<int64_t>({3, chunk_size, 2 * chunk_size, numel}), "huge chunk_size: ends");
    check_layout(layout);
  }
}

void test_invalid_arguments() {
  CHECK_THROWS(plan_chunks({4, 6}, {}, {}, 0, false), std::invalid_argument, "chunk_size 0");
  CHECK_THROWS(plan_chunks({4, 6}, {}, {}, -8, false), std::invalid_argument, "negative chunk_size");
  CHECK_THROWS(plan_chunks({}, {}, {}, 0, false), std::invalid_argument, "chunk_size 0 with no tensors");
  CHECK_THROWS(plan_chunks({4, 6}, {1}, {}, 8, false), std::invalid_argument, "too few units");
  CHECK_THROWS(plan_chunks({4, 6}, {1, 1, 1}, {}, 8, false), std::invalid_argument, "too many units");
  CHECK_THROWS(plan_chunks({4, 6}, {}, {0}, 8, false), std::invalid_argument, "too few group keys");
  CHECK_THROWS(plan_chunks({4, 6}, {}, {0, 1, 2}, 8, false), std::invalid_argument, "too many group keys");
  CHECK_THROWS(plan_chunks({4, -6}, {}, {}, 8, false), std::invalid_argument, "negative numel");
  CHECK_THROWS(plan_chunks({-1}, {}, {}, 8, true), std::invalid_argument, "negative numel, min_one_chunk");
  CHECK_THROWS(plan_chunks({4, -6}, {}, {3, 1}, 8, false), std::invalid_argument, "negative numel, grouped");
  CHECK_THROWS(plan_chunks({10}, {3}, {}, 8, false), std::invalid_argument, "units 3 do not divide 10");
  CHECK_THROWS(plan_chunks({4, 10}, {2, 4}, {}, 8, false), std::invalid_argument, "units 4 do not divide 10");
  CHECK_THROWS(plan_chunks({5}, {10}, {}, 8, false), std::invalid_argument, "more units than elements");
  CHECK_THROWS(plan_chunks({(int64_t{1} << 40) + 1}, {2}, {}, 8, false), std::invalid_argument,
               "units 2 do not divide 2^40 + 1");
}

// -------------------------------------------------------------------------------- random layouts

std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> out;
  for (int64_t d = 1; d * d <= n; ++d)
    if (n % d == 0) {
      out.push_back(d);
      if (d != n / d) out.push_back(n / d);
    }
  return out;
}

Layout random_layout(std::mt19937_64& rng) {
  auto below = [&](int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); };
  static const int64_t chunk_sizes[] = {1, 2, 3, 7, 16, 64, 1000, 4096, 65536};
  Layout layout;
  layout.chunk_size = chunk_sizes[below(9)];
  layout.min_one_chunk = below(2) == 1;
  const int64_t num_tensors = below(8) == 0 ? below(3) : 1 + below(40);
  const bool with_units = below(2) == 1, with_keys = below(3) != 0;
  const int64_t num_keys = 1 + below(4);
  static const int64_t key_values[] = {-5, 0, 3, 42, int64_t{1} << 40, std::numeric_limits<int64_t>::min()};
  std::vector<int64_t> keys;
  for (int64_t k = 0; k < num_keys; ++k) keys.push_back(key_values[below(6)]);
  for (int64_t t = 0; t < num_tensors; ++t) {
    int64_t numel = 0;
    switch (below(6)) {
      case 0: numel = 0; break;
      case 1: numel = 1 + below(10); break;
      case 2: numel = layout.chunk_size * (1 + below(5)); break;  // an exact multiple
      case 3: numel = std::max<int64_t>(0, layout.chunk_size * (1 + below(4)) + below(3) - 1); break;  // around one
      default: numel = below(std::min<int64_t>(10 * layout.chunk_size, 100000)) + 1; break;
    }
    layout.numels.push_back(numel);
    if (with_units) {
      int64_t units = 1;
      if (numel == 0) {
        units = below(4);  // 0 (whole), or several empty units
      } else if (below(4) != 0) {
        // A divisor of numel; at most 200 units (or numel ones, for small tensors) keeps the sweep fast.
        std::vector<int64_t> options = divisors(numel);
        options.erase(std::remove_if(options.begin(), options.end(),
                                     [&](int64_t d) { return d > 200 && !(d == numel && numel <= 2000); }),
                      options.end());
        units = options[below(static_cast<int64_t>(options.size()))];
      } else {
        units = below(2);  // 0 or 1: the whole tensor
      }
      layout.units.push_back(units);
    }
    if (with_keys) layout.group_keys.push_back(keys[below(num_keys)]);
  }
  return layout;
}

void test_random_layouts() {
  int bad = 0;
  int64_t layouts = 0, total_chunks = 0, empty_tensors = 0, grouped = 0;
  for (uint64_t seed : {1u, 2u, 3u, 4u, 5u, 6u, 7u, 8u}) {
    std::mt19937_64 rng(seed);
    for (int i = 0; i < 400 && bad < 5; ++i) {
      const Layout layout = random_layout(rng);
      if (!check_layout(layout)) {
        ++bad;
        std::cerr << "  (random layout seed " << seed << " index " << i << ")\n";
      }
      ++layouts;
      total_chunks += plan(layout).num_chunks();
      empty_tensors += std::count(layout.numels.begin(), layout.numels.end(), 0);
      grouped += !layout.group_keys.empty();
    }
  }
  // The sweep is not vacuous.
  CHECK(layouts == 3200 && total_chunks > 100000 && empty_tensors > 1000 && grouped > 1500, "random sweep: ", layouts,
        " layouts, ", total_chunks, " chunks, ", empty_tensors, " empty tensors, ", grouped, " grouped");
  // Wrong layouts made by perturbing a valid one always throw.
  std::mt19937_64 rng(99);
  int thrown = 0, tried = 0;
  for (int i = 0; i < 300; ++i) {
    Layout layout = random_layout(rng);
    if (layout.numels.empty()) continue;
    const size_t victim = rng() % layout.numels.size();
    switch (i % 4) {
      case 0: layout.numels[victim] = -1 - static_cast<int64_t>(rng() % 1000); break;
      case 1: layout.chunk_size = -static_cast<int64_t>(rng() % 3); break;
      case 2: layout.units.assign(layout.numels.size() + 1, 1); break;
      case 3:
        layout.units.assign(layout.numels.size(), 1);
        layout.numels[victim] = 2 * (1 + static_cast<int64_t>(rng() % 1000)) + 1;  // odd
        layout.units[victim] = 2;
        break;
    }
    ++tried;
    try {
      plan(layout);
    } catch (const std::invalid_argument&) {
      ++thrown;
    }
  }
  CHECK(thrown == tried && tried > 200, "perturbed layouts: ", thrown, " of ", tried, " threw");
}

// A negative unit count has no meaning: refused, like a negative numel.
void test_negative_units() {
  CHECK_THROWS(plan_chunks({6}, {-2}, {}, 4, false), std::invalid_argument, "negative units");
}

}  // namespace

int main() {
  test_simple();
  test_zero_element_tensors();
  test_units();
  test_groups();
  test_large();
  test_invalid_arguments();
  test_random_layouts();
  test_negative_units();
  return check::finish("test_chunk_plan");
}
