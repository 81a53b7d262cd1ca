// Fetching ahead what a loop over thousands of tensors will touch, for the host code of both
// backends (the CPU extension's step plan, the CUDA host runtime's planned updates). Each
// tensor's metadata (its TensorImpl, storage, autograd meta, version counter) is a heap object of
// its own, and a loop that reads them one after the other waits for one cache miss at a time
// (about 1 us per param on a cold cache, half a step over 1,000 small tensors): loads issued a few
// iterations early overlap.
#pragma once

#include <c10/core/TensorImpl.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <unordered_set>
#include <vector>

namespace fastopt {
namespace prefetch {

constexpr size_t kAhead = 8;  // iterations between the stages of a fetch chain

inline void lines(const void* p, int count, bool for_write = false) {
  const char* c = static_cast<const char*>(p);
  for (int i = 0; i < count; ++i) {
    if (for_write)
      __builtin_prefetch(c + 64 * i, 1);
    else
      __builtin_prefetch(c + 64 * i, 0);
  }
}

// The lines that can hold bytes [0, Size) of an object at p. Heap objects are 16-byte aligned,
// not line aligned: a field at offset 16..63 lies in an object's second line for up to three
// quarters of them, which a fetch of the object's first line alone leaves to miss. A fixed
// count, the most the object can span, since a count that varied with the address would
// cost a mispredicted branch per object.
template <size_t Size>
inline void object(const void* p, bool for_write = false) {
  constexpr int kLines = int((Size + 48 + 63) / 64);
  lines(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63)), kLines, for_write);
}

// A TensorImpl: every field a check reads (storage, sizes, strides, dtype, device, flags).
inline void tensor_impl(const c10::TensorImpl* impl) {
  if (impl != nullptr) object<sizeof(c10::TensorImpl)>(impl);
}

// A tensor's storage object, for data_ptr() (its TensorImpl fetched already): the pointer and
// the access flags it checks lie in the object's first 64 bytes.
inline void storage(const c10::TensorImpl* impl) {
  if (const c10::StorageImpl* target = impl->unsafe_storage().unsafeGetStorageImpl()) object<64>(target);
}

// The counter object a VariableVersion shares (views share their base's), or null (inference).
inline const void* counter_of(const c10::VariableVersion& v) {
  static_assert(sizeof(c10::VariableVersion) == sizeof(void*), "VariableVersion is one intrusive_ptr");
  const void* counter;
  std::memcpy(&counter, &v, sizeof counter);
  return counter;
}

// A version counter, for the atomic increment of a bump (a locked instruction: on a miss it
// stalls the loop until the line arrives).
inline void version(const c10::VariableVersion& v) {
  // Its count follows the intrusive_ptr_target header (a vtable pointer and two 32-bit counts).
  if (const void* counter = counter_of(v)) object<sizeof(c10::intrusive_ptr_target) + sizeof(uint32_t)>(counter, /*for_write=*/true);
}

// Runs body(i) for i in [0, n), with stage s of a fetch chain (stages[s](i)) run for
// i + (stages - s) * kAhead before it: stage 0 first and farthest ahead, each later stage reading
// what the one before fetched. Every stage runs once for every i, in order, before body(i) (the
// first items' stages run in a prologue), so a stage may also leave what it read for the body.
template <typename Body, typename... Stages>
void pipelined(size_t n, const Body& body, const Stages&... stages) {
  constexpr ptrdiff_t lead = ptrdiff_t(sizeof...(Stages) * kAhead);
  for (ptrdiff_t i = -lead; i < ptrdiff_t(n); ++i) {
    ptrdiff_t ahead = lead;
    const auto run = [&](const auto& stage) {
      const ptrdiff_t item = i + ahead;
      if (item >= 0 && item < ptrdiff_t(n)) stage(size_t(item));
      ahead -= ptrdiff_t(kAhead);
    };
    (run(stages), ...);  // in order: stage 0 farthest ahead
    if (i >= 0) body(size_t(i));
  }
}

// body(i) for the tensors impl_of(i), i in [0, n), their TensorImpls fetched ahead, and with
// `storages` their storages too (for data_ptr()).
template <typename ImplOf, typename Body>
void over_tensors(size_t n, const ImplOf& impl_of, bool storages, const Body& body) {
  if (storages) {
    pipelined(n, body, [&](size_t i) { tensor_impl(impl_of(i)); }, [&](size_t i) { storage(impl_of(i)); });
  } else {
    pipelined(n, body, [&](size_t i) { tensor_impl(impl_of(i)); });
  }
}

// The version counters of tensors a pass writes, each once: views of one buffer (flat states)
// share their base's counter, which one bump per pass marks as written as well as one per view
// (autograd compares versions for equality), so a flat buffer costs one bump, not one per view.
// Inference tensors, which have none, are left out.
inline std::vector<c10::VariableVersion> distinct_versions(const std::vector<c10::TensorImpl*>& written) {
  std::vector<c10::VariableVersion> versions;
  std::unordered_set<const void*> seen;  // made once per plan: the steps only bump
  for (c10::TensorImpl* impl : written) {
    if (impl->is_inference()) continue;
    const c10::VariableVersion& v = impl->version_counter();
    const void* counter = counter_of(v);
    if (counter != nullptr && seen.insert(counter).second) versions.push_back(v);
  }
  return versions;
}

// Bumps each version counter (the in-place writes autograd must see), fetching ahead.
inline void bump_versions(std::vector<c10::VariableVersion>& versions) {
  pipelined(
      versions.size(), [&](size_t i) { versions[i].bump(); }, [&](size_t i) { version(versions[i]); });
}

}  // namespace prefetch
}  // namespace fastopt
