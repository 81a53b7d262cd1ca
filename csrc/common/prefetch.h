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

inline void fetch(const void* p, bool for_write) {
  if (for_write)
    __builtin_prefetch(p, 1);
  else
    __builtin_prefetch(p, 0);
}

inline void lines(const void* p, int count, bool for_write = false) {
  const char* c = static_cast<const char*>(p);
  for (int i = 0; i < count; ++i) fetch(c + 64 * i, for_write);
}

// The lines that hold bytes [Begin, End) of an object at p, and only those. Heap objects are
// 16-byte aligned, not line aligned: the same field lies in an object's first or second line, and
// a range straddles two lines or not, depending on the address. A fixed number of fetches (a line
// fetched twice is transferred once) and no branch on the address: a count that varied with it
// cost a mispredicted branch per object. Each line fetched but not read costs as much as one read
// (about 12 ns from memory on the 2-core test machine, where thousands of tensors' metadata miss).
template <size_t Begin, size_t End>
inline void bytes(const void* p, bool for_write = false) {
  static_assert(Begin < End, "an empty range");
  const char* c = static_cast<const char*>(p);
  for (size_t offset = Begin; offset < End; offset += 64) fetch(c + offset, for_write);
  fetch(c + End - 1, for_write);
}

// The lines of an object of Size bytes at p.
template <size_t Size>
inline void object(const void* p, bool for_write = false) {
  bytes<0, Size>(p, for_write);
}

// Where a TensorImpl keeps what the host code reads, as torch 2.x lays it out
// (c10/core/TensorImpl.h): after the intrusive_ptr_target header, storage_, autograd_meta_,
// extra_meta_, version_counter_, pyobj_slot_ and sizes_and_strides_; then the tail:
// storage_offset_, numel_, data_type_, device_opt_, the flag bits and key_set_ (32 bytes). Where
// the sizes disagree (another layout), whole objects are fetched: a fetch is a hint, so a wrong
// offset would cost time, never a wrong read.
namespace tensor_layout {
constexpr size_t kStorage = sizeof(c10::intrusive_ptr_target);
constexpr size_t kSizes = kStorage + 4 * sizeof(void*) + sizeof(c10::impl::PyObjectSlot);
constexpr size_t kTail = kSizes + sizeof(c10::impl::SizesAndStrides);
constexpr bool kKnown = kTail + 32 == sizeof(c10::TensorImpl);
// A StorageImpl's data_ptr_ (pointer, context, deleter), size_bytes_ and the seven flags that
// data_ptr() checks follow the header (c10/core/StorageImpl.h; not checked against its size: as
// above, another layout would cost time only).
constexpr size_t kStorageData = sizeof(c10::intrusive_ptr_target);
constexpr size_t kStorageFlagsEnd = kStorageData + sizeof(c10::DataPtr) + sizeof(c10::SymInt) + 7;
}  // namespace tensor_layout

// A TensorImpl: every field a check reads (storage, sizes, strides, dtype, device, flags).
inline void tensor_impl(const c10::TensorImpl* impl) {
  if (impl != nullptr) object<sizeof(c10::TensorImpl)>(impl);
}

// A TensorImpl's fields but its sizes and strides, for checks that read a tensor's numel, dtype,
// device, flags and data pointer: the storage pointer and the tail, two or three lines of four.
inline void tensor_impl_but_sizes(const c10::TensorImpl* impl) {
  using namespace tensor_layout;
  if (impl == nullptr) return;
  if constexpr (kKnown) {
    bytes<kStorage, kStorage + sizeof(void*)>(impl);
    bytes<kTail, sizeof(c10::TensorImpl)>(impl);
  } else {
    tensor_impl(impl);
  }
}

// A tensor's storage object, for data_ptr() (its TensorImpl fetched already): the pointer and
// the access flags it checks.
inline void storage(const c10::TensorImpl* impl) {
  using namespace tensor_layout;
  if (const c10::StorageImpl* target = impl->unsafe_storage().unsafeGetStorageImpl())
    bytes<kStorageData, kStorageFlagsEnd>(target);
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
  constexpr size_t kCount = sizeof(c10::intrusive_ptr_target);
  if (const void* counter = counter_of(v)) bytes<kCount, kCount + sizeof(uint32_t)>(counter, /*for_write=*/true);
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

// body(i) for the tensors impl_of(i), i in [0, n), their TensorImpls fetched ahead but the sizes
// and strides (which no body reads), and with `storages` their storages too (for data_ptr()).
template <typename ImplOf, typename Body>
void over_tensors(size_t n, const ImplOf& impl_of, bool storages, const Body& body) {
  const auto impl = [&](size_t i) { tensor_impl_but_sizes(impl_of(i)); };
  if (storages) {
    pipelined(n, body, impl, [&](size_t i) { storage(impl_of(i)); });
  } else {
    pipelined(n, body, impl);
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

// Bumps the version of each TensorImpl but the null ones (none an inference tensor's, which has no
// counter): the field that points to its counter, then the counter, fetched ahead.
template <typename Impls>  // a vector of TensorImpl*, with any allocator
inline void bump_versions_of(const Impls& impls) {
  pipelined(
      impls.size(),
      [&](size_t i) {
        if (impls[i] != nullptr) impls[i]->bump_version();
      },
      [&](size_t i) {
        if (impls[i] != nullptr) lines(&impls[i]->version_counter(), 1);
      },
      [&](size_t i) {
        if (impls[i] != nullptr) version(impls[i]->version_counter());
      });
}

}  // namespace prefetch
}  // namespace fastopt
