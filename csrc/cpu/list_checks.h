// The functional ops' argument checks (fastopt/ops.py) in one C++ pass, for tensors on any device
// (only metadata is read). fastopt.ops validates every list of every call in Python, about 1 us per
// tensor per list (27 ms for an adamw_ over 5,000 params): most of a call's time with many small
// tensors. `lists_pass` answers one question: would the Python checks accept these lists? True
// only when every check below holds; False sends the call through the Python checks, which raise
// with their precise message or accept what this pass leaves to them (tensor subclasses such as
// DTensor, meta tensors, written tensors that are not contiguous, copy-on-write storage shared
// between arguments). So it may be stricter than Python, never looser, and holds no message of
// its own.
#pragma once

#include <torch/extension.h>

#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../common/prefetch.h"
#include "step_plan.h"

namespace fastopt {
namespace cpu {
namespace list_checks_detail {

// A plain tensor (torch.Tensor or nn.Parameter, not a subclass that dispatches in Python, such as
// DTensor or FakeTensor), dense, with storage (not a functional or lazy wrapper), not meta.
inline const at::Tensor* plain_tensor(PyObject* item) {
  if (!THPVariable_Check(item)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(item);
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->is_python_dispatch() || impl->layout() != at::kStrided || impl->device_type() == at::kMeta ||
      !impl->has_storage())
    return nullptr;
  return &t;
}

using Span = std::pair<uintptr_t, uintptr_t>;  // [first byte, one past the last)

// Where a tensor lies. A written one's address is data_ptr()'s, as Python's check takes it: a
// copy-on-write tensor gets its own copy first, so a kernel that writes there changes no other.
inline Span span_of(const at::Tensor& t, bool written) {
  if (t.numel() == 0) return {0, 0};
  const auto start = reinterpret_cast<uintptr_t>(written ? t.data_ptr() : step_plan_detail::data_of(t));
  return {start, start == 0 ? 0 : start + step_plan_detail::extent_of(t)};
}

}  // namespace list_checks_detail

// `lists`: lists or tuples of tensors, all as long as the first. Per list: `written` (updated in
// place: contiguous, sharing no byte with anything else the call touches), `shaped` (each tensor
// of list 0's shape), `scalars` (each a 0-d float32 or float64 tensor, as AdamW's steps).
// `reads` / `writes`: single tensors the call reads / writes (lr, found_inf, ...), checked for
// overlap only (their other checks are Python's, per scalar). Every tensor is a dense float16,
// bfloat16, float32 or float64 tensor, all lists' on one device.
inline bool lists_pass(const pybind11::list& lists, const std::vector<bool>& written, const std::vector<bool>& shaped,
                       const std::vector<bool>& scalars, const pybind11::list& reads,
                       const pybind11::list& writes) {
  using namespace list_checks_detail;
  const size_t num_lists = size_t(PyList_GET_SIZE(lists.ptr()));
  TORCH_CHECK(num_lists > 0 && written.size() == num_lists && shaped.size() == num_lists &&
                  scalars.size() == num_lists,
              "lists_pass: one written / shaped / scalars flag per list");
  for (size_t l = 0; l < num_lists; ++l) {
    PyObject* list = PyList_GET_ITEM(lists.ptr(), Py_ssize_t(l));
    if (!PyList_Check(list) && !PyTuple_Check(list)) return false;
  }
  const auto list_at = [&](size_t l) { return PyList_GET_ITEM(lists.ptr(), Py_ssize_t(l)); };
  const auto item = [&](PyObject* list, size_t i) {
    return PyList_Check(list) ? PyList_GET_ITEM(list, Py_ssize_t(i)) : PyTuple_GET_ITEM(list, Py_ssize_t(i));
  };
  const size_t n = size_t(PySequence_Fast_GET_SIZE(list_at(0)));
  for (size_t l = 1; l < num_lists; ++l)
    if (size_t(PySequence_Fast_GET_SIZE(list_at(l))) != n) return false;

  std::vector<const at::Tensor*> first(n);
  std::vector<Span> written_spans, read_spans;
  bool ok = true, device_known = false;
  at::Device device(at::kCPU);
  for (size_t l = 0; l < num_lists && ok; ++l) {
    PyObject* list = list_at(l);
    prefetch::pipelined(
        n,
        [&](size_t i) {
          if (!ok) return;
          const at::Tensor* t = plain_tensor(item(list, i));
          if (t == nullptr || !step_plan_detail::is_floating(t->scalar_type())) {
            ok = false;
            return;
          }
          if (!device_known) {
            device = t->device();
            device_known = true;
          } else if (t->device() != device) {
            ok = false;
            return;
          }
          if (l == 0) first[i] = t;
          if (shaped[l] && l > 0 && !step_plan_detail::same_ints(t->sizes(), first[i]->sizes())) {
            ok = false;
            return;
          }
          if (scalars[l] && (t->dim() != 0 || (t->scalar_type() != at::kFloat && t->scalar_type() != at::kDouble))) {
            ok = false;
            return;
          }
          if (written[l] && !t->is_contiguous()) {  // an expanded view may alias itself: Python's check
            ok = false;
            return;
          }
          const Span span = span_of(*t, written[l]);
          if (span.second > span.first) (written[l] ? written_spans : read_spans).push_back(span);
        },
        [&](size_t i) { prefetch::lines(item(list, i), 1); },
        [&](size_t i) {
          PyObject* object = item(list, i);
          if (THPVariable_Check(object)) prefetch::tensor_impl(THPVariable_Unpack(object).unsafeGetTensorImpl());
        });
  }
  if (!ok) return false;
  for (const auto& [singles, is_written] : {std::pair{&reads, false}, std::pair{&writes, true}}) {
    for (const pybind11::handle object : *singles) {
      const at::Tensor* t = plain_tensor(object.ptr());
      if (t == nullptr || (is_written && !t->is_contiguous())) return false;
      const Span span = span_of(*t, is_written);
      if (span.second > span.first) (is_written ? written_spans : read_spans).push_back(span);
    }
  }
  // Written spans pairwise disjoint; no read span reaches into one.
  std::sort(written_spans.begin(), written_spans.end());
  for (size_t k = 1; k < written_spans.size(); ++k)
    if (written_spans[k].first < written_spans[k - 1].second) return false;
  for (const Span& read : read_spans) {
    // The last written span starting before the read one ends is the only one that can meet it.
    auto after = std::lower_bound(written_spans.begin(), written_spans.end(), Span{read.second, 0});
    if (after != written_spans.begin() && std::prev(after)->second > read.first) return false;
  }
  return true;
}

}  // namespace cpu
}  // namespace fastopt
