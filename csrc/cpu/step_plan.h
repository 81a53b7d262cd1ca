// The host side of fastopt.optim's step plan (fastopt/optim/optimizer.py, _StepPlan): the per-step
// check, over every param in one C++ loop, for tensors on any device (only metadata is read).
//
// A plan holds the tensor lists a full step validated. A later step may reuse them when nothing but
// the grads changed; GradWatch::refresh says whether that is so and reads the new grads, after
// checking each one as the ops would (dense, floating, its param's shape and device, clear of
// everything the step writes). What voids the plan here: a group's params list edited, a param's
// data replaced (dtype, device, shape, strides, storage), a param gaining or losing its grad. (A
// state tensor replaced is seen by the Python side: its state dicts count their changes.) The same
// visit records what the cpu backend's planned ops read of each grad (TensorSpan: address, size,
// dtype), so that the norm and the update never touch a grad's TensorImpl again (NormPlan,
// UpdatePlan in module.cpp); other backends get the grads in the plan's Python lists (fill_lists),
// since making a Python object per grad is most of the cost of a step over many small tensors.
#pragma once

#include <torch/extension.h>

#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../common/prefetch.h"

namespace fastopt {
namespace cpu {

// What a pass reads of one tensor: gathered in one visit of each tensor, so that the pass itself
// never touches a TensorImpl again (with thousands of small tensors, those visits are cache misses,
// the cost of a call).
struct TensorSpan {
  void* data;  // null when empty
  int64_t numel;
  at::ScalarType type;
  int64_t element_size;
};

namespace step_plan_detail {

using at::Tensor;

// Bytes from a tensor's first element to one past its last (0 when empty).
inline uintptr_t extent_of(const Tensor& t) {
  if (t.numel() == 0) return 0;
  if (t.is_contiguous()) return t.nbytes();
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return uintptr_t(last + 1) * t.element_size();
}

// A tensor's first byte, or null when it has no storage to point into or no element: what
// Tensor::const_data_ptr() gives, read inline from the TensorImpl (const_data_ptr's checks and
// has_storage() are calls into libc10, a third of a refresh's time per param).
inline const void* data_of(const Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::Storage& storage = impl->unsafe_storage();
  if (!storage || impl->numel() == 0) return nullptr;
  const char* base = static_cast<const char*>(storage.data());
  return base == nullptr ? nullptr : base + impl->storage_offset() * int64_t(impl->itemsize());
}

// a == b for sizes and strides, inline (ArrayRef::equals calls memcmp for a handful of ints).
inline bool same_ints(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// A param's grad, read from its autograd meta (Tensor::grad() adds an is_leaf() check through the
// dispatcher, for a warning that concerns non-leaf tensors only).
inline const Tensor& grad_of(const Tensor& param) {
  return param.unsafeGetTensorImpl()->grad();
}

inline bool is_floating(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kBFloat16 || type == at::kHalf;
}

// What a param was when the plan was built: a change (p.data = ..., model.to(...), a square
// matrix transposed in place) voids the plan. Sizes and strides inline: no pointer to chase.
struct ParamRecord {
  const void* data;
  at::ScalarType dtype;
  at::Device device;
  c10::SmallVector<int64_t, 4> sizes, strides;

  explicit ParamRecord(const Tensor& p)
      : data(data_of(p)),
        dtype(p.scalar_type()),
        device(p.device()),
        sizes(p.sizes().begin(), p.sizes().end()),
        strides(p.strides().begin(), p.strides().end()) {}

  bool matches(const Tensor& p) const {
    return p.scalar_type() == dtype && p.device() == device && same_ints(p.sizes(), sizes) &&
           same_ints(p.strides(), strides) && data_of(p) == data;
  }
};

}  // namespace step_plan_detail

}  // namespace cpu

// The step plan's fetch chains (csrc/common/prefetch.h has the machinery): a param's storage and
// autograd meta, and its grad's TensorImpl.
namespace prefetch {

// A param's autograd meta (null without one), with the line of its grad field fetched.
inline const torch::autograd::AutogradMeta* autograd_meta(const c10::TensorImpl* impl) {
  const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl == nullptr ? nullptr : impl->autograd_meta());
  if (meta != nullptr) object<sizeof(meta->grad_)>(&meta->grad_);
  return meta;
}

// The TensorImpl of the grad an autograd meta holds (its line fetched already), or null.
inline const c10::TensorImpl* grad_impl(const torch::autograd::AutogradMeta* meta) {
  return meta == nullptr ? nullptr : meta->grad_.unsafeGetTensorImpl();
}

}  // namespace prefetch

namespace cpu {

// `data`: the tensor's first byte, data_of(t), when the caller has read it already.
inline TensorSpan span_of(const at::Tensor& t, const void* data) {
  return {const_cast<void*>(data), t.numel(), t.scalar_type(), int64_t(t.element_size())};
}

inline TensorSpan span_of(const at::Tensor& t) { return span_of(t, step_plan_detail::data_of(t)); }

// Hidden, as pybind11's own types are: it holds pybind11 objects.
class __attribute__((visibility("hidden"))) GradWatch {
 public:
  using Tensor = at::Tensor;

  // group_params: each param group's "params" list (the list objects). slots: for every param of
  // every group in that order, -1 when it had no grad (the plan leaves it out), else k, the plan's
  // entry for it, whose grad goes to grad_lists[k][positions[k]] (entries of one list of the plan
  // are consecutive). written: what the step writes in place (params and states), which no grad
  // may overlap. The plan's grads are the params' grads of now.
  GradWatch(const pybind11::list& group_params, std::vector<int64_t> slots, const pybind11::list& grad_lists,
            std::vector<int64_t> positions, const std::vector<Tensor>& written)
      : id_(next_id()), slots_(std::move(slots)), positions_(std::move(positions)) {
    using step_plan_detail::data_of;
    for (const pybind11::handle& list : group_params) {
      lists_.push_back(pybind11::reinterpret_borrow<pybind11::list>(list));
      std::vector<pybind11::object> members;
      for (const pybind11::handle& member : list) members.push_back(pybind11::reinterpret_borrow<pybind11::object>(member));
      members_.push_back(std::move(members));
    }
    for (const auto& members : members_)
      for (const pybind11::object& member : members) {
        TORCH_CHECK(THPVariable_Check(member.ptr()), "GradWatch: every param must be a tensor");
        params_.push_back(THPVariable_Unpack(member.ptr()));
        records_.emplace_back(params_.back());
      }
    TORCH_CHECK(slots_.size() == params_.size(), "GradWatch: one slot per param");
    for (const pybind11::handle& list : grad_lists) grad_lists_.push_back(pybind11::reinterpret_borrow<pybind11::list>(list));
    TORCH_CHECK(grad_lists_.size() == positions_.size(), "GradWatch: one position per grad list entry");
    const size_t entries = positions_.size();
    entry_param_.assign(entries, params_.size());
    spans_.assign(entries, TensorSpan{nullptr, 0, at::kFloat, 0});
    contiguous_.assign(entries, 1);
    seen_data_.assign(entries, nullptr);
    for (size_t j = 0; j < params_.size(); ++j) {
      const int64_t k = slots_[j];
      TORCH_CHECK(k < int64_t(entries), "GradWatch: a slot past the grad lists");
      if (k < 0) continue;
      TORCH_CHECK(entry_param_[k] == params_.size(), "GradWatch: two params in one entry");
      entry_param_[k] = j;
      const Tensor& grad = step_plan_detail::grad_of(params_[j]);
      if (!grad.defined()) continue;
      read_grad(grad, step_plan_detail::data_of(grad), k);
      seen_data_[k] = step_plan_detail::data_of(grad);
    }
    for (size_t k = 0; k < entries; ++k) TORCH_CHECK(entry_param_[k] < params_.size(), "GradWatch: an entry without a param");
    fresh_ = true;  // the plan's grads are the params' grads of now, and its lists hold them
    lists_filled_ = true;
    for (const Tensor& t : written) {
      const uintptr_t bytes = step_plan_detail::extent_of(t);
      if (bytes == 0 || data_of(t) == nullptr) continue;
      const auto start = reinterpret_cast<uintptr_t>(data_of(t));
      written_.emplace_back(start, start + bytes);
    }
    std::sort(written_.begin(), written_.end());
  }

  // -1: the plan is void (rebuild it); 0: the grads are checked and where the last refresh's were
  // (flat grads, or zero_grad(set_to_none=False)); 1: checked, some at new addresses. Raises
  // (changing nothing) on a bad grad.
  int refresh() {
    for (size_t g = 0; g < lists_.size(); ++g) {
      const std::vector<pybind11::object>& members = members_[g];
      PyObject* list = lists_[g].ptr();
      if (PyList_GET_SIZE(list) != Py_ssize_t(members.size())) return -1;
      for (size_t i = 0; i < members.size(); ++i)
        if (PyList_GET_ITEM(list, i) != members[i].ptr()) return -1;
    }
    // One pass over the params (each visit reads the param, its autograd meta and its grad: the
    // cache misses are the cost). A refusal part way leaves the spans half renewed and stale
    // (no planned op reads them before the next refresh); the lists and tensors are untouched.
    fresh_ = false;
    bool changed = false, retyped = false, completed = false;
    int verdict = 1;
    // The first grad the ops would refuse: raised after the pass, only if the plan still holds (a
    // param whose data was replaced voids it, and the full step's checks then judge the grads: a
    // grad may since occupy memory the old data freed, which the plan's written spans still hold).
    size_t refused = params_.size();
    size_t cursor = 0;  // where the last overlap check ended in written_
    // A refresh that ends early (a bad grad raises) may have renewed some spans and seen
    // addresses: the layout is then taken as changed, so that nothing keeps one worked out before.
    struct LayoutGuard {
      uint64_t& layout;
      const bool& completed;
      ~LayoutGuard() {
        if (!completed) ++layout;
      }
    } guard{layout_, completed};
    const auto impl = [this](size_t j) { return params_[j].unsafeGetTensorImpl(); };
    // Each param's autograd meta, found by the fetch chain's second stage (one out-of-line
    // TensorImpl::autograd_meta() call per param) and read by the later stages and the body.
    constexpr size_t kRing = 8 * prefetch::kAhead;  // more than the chain's length: an entry outlives its reads
    std::array<const torch::autograd::AutogradMeta*, kRing> metas;
    const Tensor undefined;
    prefetch::pipelined(
        params_.size(),
        [&](size_t j) {
          if (verdict < 0) return;
          const Tensor& param = params_[j];
          const int64_t k = slots_[j];
          if (!records_[j].matches(param)) {
            verdict = -1;
            return;
          }
          const torch::autograd::AutogradMeta* meta = metas[j % kRing];
          const Tensor& grad = meta == nullptr ? undefined : meta->grad_;
          if (grad.defined() != (k >= 0)) {
            verdict = -1;
            return;
          }
          if (k < 0) return;
          const void* data = step_plan_detail::data_of(grad);
          // A grad where a checked one was (flat grads) cannot overlap what it did not overlap then.
          if (refused < params_.size() || !grad_accepted(grad, data, j, /*overlap=*/data != seen_data_[k], cursor)) {
            refused = std::min(refused, j);
            return;
          }
          changed |= data != seen_data_[k];
          seen_data_[k] = data;
          const at::ScalarType last_type = spans_[k].type;
          const uint8_t was_contiguous = contiguous_[k];
          read_grad(grad, data, k);
          retyped |= spans_[k].type != last_type || contiguous_[k] != was_contiguous;
        },
        [&](size_t j) { prefetch::tensor_impl(impl(j)); },
        [&](size_t j) {
          prefetch::storage(impl(j));
          metas[j % kRing] = prefetch::autograd_meta(impl(j));
        },
        [&](size_t j) { prefetch::tensor_impl(prefetch::grad_impl(metas[j % kRing])); },
        [&](size_t j) {
          if (const c10::TensorImpl* grad = prefetch::grad_impl(metas[j % kRing])) prefetch::storage(grad);
        });
    if (verdict < 0) return -1;
    if (refused < params_.size()) {
      const Tensor& grad = step_plan_detail::grad_of(params_[refused]);
      refuse(grad, params_[refused], "grads[" + std::to_string(positions_[slots_[refused]]) + "]");
    }
    completed = true;
    fresh_ = true;
    if (changed || retyped) ++layout_;
    return changed ? 1 : 0;
  }

  // Entries [first, first + count) as the last refresh read them, for a backend that keeps an
  // address column of its own (triton, cuda) and no Python object per grad: their addresses
  // written into `addresses` (int64, CPU, contiguous, count elements); returned, their dtypes (one
  // c10::ScalarType code per byte), or None when one of them is not contiguous.
  pybind11::object grad_column(int64_t first, int64_t count, Tensor& addresses) const {
    check_fresh();
    check_range(first, count, "grad_column");
    TORCH_CHECK(addresses.device().is_cpu() && addresses.scalar_type() == at::kLong && addresses.is_contiguous() &&
                    addresses.numel() == count,
                "GradWatch.grad_column: addresses must be a contiguous CPU int64 tensor of ", count, " elements");
    int64_t* out = addresses.data_ptr<int64_t>();
    std::string types(size_t(count), '\0');
    for (int64_t i = 0; i < count; ++i) {
      const size_t k = size_t(first + i);
      if (!contiguous_[k]) return pybind11::none();
      out[i] = int64_t(reinterpret_cast<uintptr_t>(spans_[k].data));
      types[size_t(i)] = char(spans_[k].type);
    }
    return pybind11::bytes(types);
  }

  // The grads of entries [first, first + count), as a list (for a backend's first look at them).
  pybind11::list grads(int64_t first, int64_t count) const {
    check_fresh();
    check_range(first, count, "grads");
    pybind11::list out(count);
    for (int64_t i = 0; i < count; ++i) {
      PyObject* wrapped = THPVariable_Wrap(grad(size_t(first + i)));
      if (wrapped == nullptr) throw pybind11::error_already_set();
      PyList_SET_ITEM(out.ptr(), i, wrapped);  // steals the reference
    }
    return out;
  }

  // The grads into the plan's Python lists, for ops that take lists.
  void fill_lists() {
    check_fresh();
    for (size_t k = 0; k < entry_param_.size(); ++k) {
      PyObject* wrapped = THPVariable_Wrap(grad(k));
      if (wrapped == nullptr) throw pybind11::error_already_set();
      PyList_SetItem(grad_lists_[k].ptr(), positions_[k], wrapped);  // steals the reference
    }
    lists_filled_ = true;
  }

  // After a step: the spans go stale (a planned op refuses them until the next refresh), and the
  // lists, if filled, let go of the grads (None), so that zero_grad(set_to_none=True) frees their
  // memory until the next backward, as without a plan. The watch itself holds no grad.
  void release() {
    fresh_ = false;
    if (!lists_filled_) return;
    for (size_t k = 0; k < positions_.size(); ++k) {
      Py_INCREF(Py_None);
      PyList_SetItem(grad_lists_[k].ptr(), positions_[k], Py_None);
    }
    lists_filled_ = false;
  }

  size_t num_entries() const { return entry_param_.size(); }
  // Which watch this is (never reused): a planned op that has checked its params against this
  // watch's once may rely on its refreshes from then on.
  uint64_t id() const { return id_; }
  // Changes whenever a refresh finds a grad at a new address, of a new dtype or contiguity: the
  // same value means every grad is where and what it was (flat grads, or
  // zero_grad(set_to_none=False)), so a layout worked out from the spans still holds.
  uint64_t layout() const { return layout_; }
  const Tensor& param(size_t k) const { return params_[entry_param_[k]]; }
  // Entry k's grad as the last refresh read it: its span (address, size, dtype) and whether it is
  // contiguous; the tensor itself is the param's grad (valid until the step ends).
  const TensorSpan& span(size_t k) const { return spans_[k]; }
  bool contiguous(size_t k) const { return contiguous_[k] != 0; }
  const Tensor& grad(size_t k) const { return step_plan_detail::grad_of(params_[entry_param_[k]]); }

  // The spans are this step's: refreshed (or made) since the last release.
  void check_fresh() const {
    TORCH_CHECK(fresh_, "GradWatch: the grads were not read for this step (refresh() first)");
  }

 private:
  // The checks of fastopt.ops.check_replacement (refuse() raises with its messages).
  // `data`: the grad's first byte (data_of); `cursor`: see overlaps_written.
  bool grad_accepted(const Tensor& grad, const void* data, size_t j, bool overlap, size_t& cursor) const {
    const Tensor& param = params_[j];
    return grad.layout() == at::kStrided && step_plan_detail::is_floating(grad.scalar_type()) &&
           step_plan_detail::same_ints(grad.sizes(), param.sizes()) && grad.device() == param.device() &&
           !(overlap && overlaps_written(grad, data, cursor));
  }

  [[noreturn]] void refuse(const Tensor& grad, const Tensor& param, const std::string& name) const {
    if (grad.is_sparse()) throw std::runtime_error("fastopt's optimizers do not support sparse gradients");
    if (grad.layout() != at::kStrided)
      throw pybind11::type_error(name + " is a " + describe(grad, "layout") +
                                 " tensor; fastopt ops take dense (strided) tensors");
    if (!step_plan_detail::is_floating(grad.scalar_type()))
      throw pybind11::type_error(name + " has dtype " + describe(grad, "dtype") +
                                 "; fastopt ops take float16, bfloat16, float32 or float64 tensors");
    if (!grad.sizes().equals(param.sizes()))
      throw pybind11::value_error(name + " has shape " + describe(grad, "shape") + " but its param has shape " +
                                  describe(param, "shape"));
    if (grad.device() != param.device())
      throw pybind11::value_error(name + " is on " + describe(grad, "device") + " but its param is on " +
                                  describe(param, "device"));
    throw pybind11::value_error(name + " shares memory with a param or state that this call updates in place");
  }

  void check_range(int64_t first, int64_t count, const char* method) const {
    TORCH_CHECK(first >= 0 && count >= 0 && size_t(first + count) <= entry_param_.size(), "GradWatch.", method,
                ": entries [", first, ", ", first + count, ") past the watch's ", entry_param_.size());
  }

  static uint64_t next_id() {
    static std::atomic<uint64_t> last{0};
    return ++last;
  }

  void read_grad(const Tensor& grad, const void* data, size_t k) {
    spans_[k] = span_of(grad, data);
    contiguous_[k] = grad.is_contiguous();
  }

  // Whether the grad at `data` reaches into a written span. The spans are disjoint (the full step
  // checked them) and sorted: only the last one starting before the grad's end can reach into it.
  // That one is searched for from `cursor`, where the last search ended, widening the range
  // each step: the grads of one backward usually lie in address order, near the states of
  // their neighbours, where a binary search over every span (15,000 at 5,000 params) took a
  // dozen cache misses per grad.
  bool overlaps_written(const Tensor& grad, const void* data, size_t& cursor) const {
    const uintptr_t bytes = step_plan_detail::extent_of(grad);
    if (bytes == 0 || written_.empty() || data == nullptr) return false;
    const auto start = reinterpret_cast<uintptr_t>(data), end = start + bytes;
    const size_t n = written_.size(), hint = std::min(cursor, n);
    const auto before_end = [end](const std::pair<uintptr_t, uintptr_t>& span) { return span.first < end; };
    const auto starts_before_end = [&](size_t i) { return before_end(written_[i]); };
    // The first span starting at or after `end` is in [low, high], found by doubling a bound
    // from the hint (a span before it starts before `end`, one at it does not).
    size_t low, high, bound = 1;
    if (hint < n && starts_before_end(hint)) {
      while (hint + bound < n && starts_before_end(hint + bound)) bound *= 2;
      low = hint + bound / 2 + 1;
      high = std::min(hint + bound, n);
    } else {
      while (bound <= hint && !starts_before_end(hint - bound)) bound *= 2;
      low = bound <= hint ? hint - bound + 1 : 0;
      high = hint - bound / 2;
    }
    const auto after = std::partition_point(written_.begin() + low, written_.begin() + high, before_end);
    cursor = size_t(after - written_.begin());
    return after != written_.begin() && std::prev(after)->second > start;
  }

  // How Python prints a tensor attribute (torch.int64, (3,), cuda:0): for error messages only.
  static std::string describe(const Tensor& t, const char* attribute) {
    pybind11::object value = pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(t)).attr(attribute);
    if (std::string(attribute) == "shape")
      value = pybind11::reinterpret_steal<pybind11::object>(PySequence_Tuple(value.ptr()));
    return pybind11::str(value);
  }

  uint64_t id_;
  std::vector<pybind11::list> lists_;
  std::vector<std::vector<pybind11::object>> members_;
  std::vector<Tensor> params_;
  std::vector<step_plan_detail::ParamRecord> records_;
  std::vector<int64_t> slots_;
  std::vector<pybind11::list> grad_lists_;
  std::vector<int64_t> positions_;
  std::vector<size_t> entry_param_;  // entry k's param
  std::vector<TensorSpan> spans_;  // entry k's grad as the last refresh read it
  std::vector<uint8_t> contiguous_;
  std::vector<const void*> seen_data_;  // where each grad was at the last refresh
  std::vector<std::pair<uintptr_t, uintptr_t>> written_;  // [start, end) of what the step writes, sorted
  uint64_t layout_ = 1;  // see layout()
  bool fresh_ = false;  // spans_ read for this step
  bool lists_filled_ = false;
};

// Whether every params[i].grad is the tensor views[i] (the same TensorImpl): flat grads' check in
// zero_grad, one C++ loop whose cache misses overlap (a Python loop over 5,000 params took 0.4 ms).
inline bool grads_are(const pybind11::list& params, const pybind11::list& views) {
  const size_t n = size_t(PyList_GET_SIZE(params.ptr()));
  TORCH_CHECK(size_t(PyList_GET_SIZE(views.ptr())) == n, "grads_are: one view per param");
  const auto param = [&](size_t i) { return PyList_GET_ITEM(params.ptr(), Py_ssize_t(i)); };
  const auto impl = [&](size_t i) -> const c10::TensorImpl* {
    return THPVariable_Check(param(i)) ? THPVariable_Unpack(param(i)).unsafeGetTensorImpl() : nullptr;
  };
  bool same = true;
  prefetch::pipelined(
      n,
      [&](size_t i) {
        PyObject* view = PyList_GET_ITEM(views.ptr(), Py_ssize_t(i));
        TORCH_CHECK(THPVariable_Check(param(i)) && THPVariable_Check(view), "grads_are: params and views must be tensors");
        same = same && step_plan_detail::grad_of(THPVariable_Unpack(param(i))).unsafeGetTensorImpl() ==
                           THPVariable_Unpack(view).unsafeGetTensorImpl();
      },
      [&](size_t i) { prefetch::lines(param(i), 1); },
      [&](size_t i) { prefetch::tensor_impl(impl(i)); },
      [&](size_t i) { prefetch::autograd_meta(impl(i)); });
  return same;
}

// One C++ pass over tensor lists for a backend that keeps address tables of its own (the triton
// backend's table cache), where a Python pass costs ~100 ns per tensor per attribute: each tensor's
// data_ptr() into `addresses` ([lists, n] int64, CPU, contiguous; 0 for an empty tensor);
// returned, the dtype codes (bytes, lists x n, c10::ScalarType), the first list's sizes (n native
// int64, as bytes) and whether every tensor is contiguous. Only metadata is read, on any device.
inline pybind11::tuple scan_lists(const pybind11::list& lists, at::Tensor& addresses) {
  const size_t num_lists = size_t(PyList_GET_SIZE(lists.ptr()));
  TORCH_CHECK(num_lists > 0 && PyList_Check(PyList_GET_ITEM(lists.ptr(), 0)), "scan_lists: a list of lists of tensors");
  const size_t n = size_t(PyList_GET_SIZE(PyList_GET_ITEM(lists.ptr(), 0)));
  TORCH_CHECK(addresses.device().is_cpu() && addresses.scalar_type() == at::kLong && addresses.is_contiguous() &&
                  addresses.dim() == 2 && size_t(addresses.size(0)) == num_lists && size_t(addresses.size(1)) == n,
              "scan_lists: addresses must be a contiguous CPU int64 tensor of shape [", num_lists, ", ", n, "]");
  int64_t* out = addresses.data_ptr<int64_t>();
  std::string types(num_lists * n, '\0');
  std::vector<int64_t> numels(n);
  bool contiguous = true;
  for (size_t l = 0; l < num_lists; ++l) {
    PyObject* list = PyList_GET_ITEM(lists.ptr(), Py_ssize_t(l));
    TORCH_CHECK(PyList_Check(list) && size_t(PyList_GET_SIZE(list)) == n, "scan_lists: lists of ", n, " tensors");
    const auto item = [&](size_t i) { return PyList_GET_ITEM(list, Py_ssize_t(i)); };
    prefetch::pipelined(
        n,
        [&](size_t i) {
          TORCH_CHECK(THPVariable_Check(item(i)), "scan_lists: every item must be a tensor");
          const at::Tensor& t = THPVariable_Unpack(item(i));
          // data_ptr(), as Python's Tensor.data_ptr(): a kernel may write there, so a copy-on-write
          // tensor gets its own copy first (const_data_ptr() would point into the shared one).
          out[l * n + i] = int64_t(reinterpret_cast<uintptr_t>(t.data_ptr()));
          types[l * n + i] = char(t.scalar_type());
          contiguous = contiguous && t.is_contiguous();
          if (l == 0) numels[i] = t.numel();
        },
        [&](size_t i) { prefetch::lines(item(i), 1); },
        [&](size_t i) {
          if (THPVariable_Check(item(i)))
            prefetch::tensor_impl_but_sizes(THPVariable_Unpack(item(i)).unsafeGetTensorImpl());
        },
        [&](size_t i) {
          if (THPVariable_Check(item(i))) prefetch::storage(THPVariable_Unpack(item(i)).unsafeGetTensorImpl());
        });
  }
  return pybind11::make_tuple(pybind11::bytes(types),
                              pybind11::bytes(reinterpret_cast<const char*>(numels.data()), n * sizeof(int64_t)),
                              contiguous);
}

// Whether every tensor of a list is contiguous (one C++ pass; see scan_lists).
inline bool all_contiguous(const pybind11::list& tensors) {
  const size_t n = size_t(PyList_GET_SIZE(tensors.ptr()));
  const auto item = [&](size_t i) { return PyList_GET_ITEM(tensors.ptr(), Py_ssize_t(i)); };
  bool contiguous = true;
  prefetch::pipelined(
      n,
      [&](size_t i) {
        TORCH_CHECK(THPVariable_Check(item(i)), "all_contiguous: every item must be a tensor");
        contiguous = contiguous && THPVariable_Unpack(item(i)).is_contiguous();
      },
      [&](size_t i) { prefetch::lines(item(i), 1); },
      [&](size_t i) {
        if (THPVariable_Check(item(i))) prefetch::tensor_impl(THPVariable_Unpack(item(i)).unsafeGetTensorImpl());
      });
  return contiguous;
}

// Adds GradWatch, grads_are, scan_lists, all_contiguous and lists_pass (list_checks.h) to the
// extension module (step_plan.cpp).
void register_step_plan(pybind11::module& module);

}  // namespace cpu
}  // namespace fastopt
