// Tensor lists from Python, read in place, for the pybind11 entry points of both extensions.
//
// pybind11's own conversion of a list to std::vector<at::Tensor> copies every tensor, and in torch
// 2.13 a copy of a tensor that has a Python object (every tensor a user holds) takes a reference
// on that object, under a GIL check, when the C++ count goes from one to two, and gives it back
// on release (c10/util/intrusive_ptr.h, incref_pyobject): 240 ns per tensor for the conversion and
// its release on the 2-core test machine, 6 ms for the five lists of an adamw_ over 5,000 params,
// more than the rest of the call. A TensorRefs borrows the tensors from the list's items
// instead (24 ns per tensor): valid while the list holds them, which is the call's duration (no
// Python code runs in an op).
#pragma once

#include <torch/extension.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstddef>
#include <vector>

#include "prefetch.h"

namespace fastopt {

class TensorRefs {
 public:
  TensorRefs() = default;
  // The tensors of `tensors` (a std::vector too), which must outlive this.
  explicit TensorRefs(c10::ArrayRef<at::Tensor> tensors) {
    reserve(tensors.size());
    for (const at::Tensor& t : tensors) push_back(&t);
  }

  void push_back(const at::Tensor* t) {
    items_.push_back(t);
    impls_.push_back(t->unsafeGetTensorImpl());
  }
  void reserve(size_t n) {
    items_.reserve(n);
    impls_.reserve(n);
  }
  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  const at::Tensor& operator[](size_t i) const { return *items_[i]; }
  const at::Tensor& front() const { return *items_.front(); }
  // The TensorImpl of tensor i (UndefinedTensorImpl's singleton for an undefined tensor), read when
  // the tensor was: a loop that checks only metadata never goes back to the tensor, which for a
  // tensor held by Python lies in its Python object, a cache line of its own.
  c10::TensorImpl* impl(size_t i) const { return impls_[i]; }

  struct iterator {
    const at::Tensor* const* at;
    const at::Tensor& operator*() const { return **at; }
    iterator& operator++() {
      ++at;
      return *this;
    }
    bool operator!=(const iterator& other) const { return at != other.at; }
  };
  iterator begin() const { return {items_.data()}; }
  iterator end() const { return {items_.data() + items_.size()}; }

  // A Python list or tuple of tensors (false, nothing kept, for anything else).
  bool borrow(PyObject* sequence) {
    const bool is_list = PyList_Check(sequence);
    if (!is_list && !PyTuple_Check(sequence)) return false;
    const Py_ssize_t n = is_list ? PyList_GET_SIZE(sequence) : PyTuple_GET_SIZE(sequence);
    items_.clear();
    impls_.clear();
    reserve(size_t(n));
    PyObject** items = PySequence_Fast_ITEMS(sequence);
    // The objects are scattered: each one's type and tensor (THPVariable's cdata, after the
    // header) fetched far enough ahead to overlap the misses of many.
    constexpr Py_ssize_t kAhead = 32;
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (i + kAhead < n) prefetch::bytes<offsetof(PyObject, ob_type), sizeof(PyObject) + sizeof(c10::MaybeOwned<at::Tensor>)>(items[i + kAhead]);
      PyObject* item = items[i];
      if (!THPVariable_Check(item)) {
        items_.clear();
        impls_.clear();
        return false;
      }
      push_back(&THPVariable_Unpack(item));
    }
    return true;
  }

 private:
  std::vector<const at::Tensor*> items_;
  std::vector<c10::TensorImpl*> impls_;
};

}  // namespace fastopt

namespace pybind11 {
namespace detail {

// `const fastopt::TensorRefs&` arguments take a Python list or tuple of tensors (the call's
// argument tuple keeps it alive while the function runs).
template <>
struct type_caster<fastopt::TensorRefs> {
  PYBIND11_TYPE_CASTER(fastopt::TensorRefs, const_name("list[torch.Tensor]"));

  bool load(handle source, bool) { return value.borrow(source.ptr()); }

  static handle cast(const fastopt::TensorRefs&, return_value_policy, handle) {
    pybind11_fail("fastopt::TensorRefs is an argument type only");
  }
};

}  // namespace detail
}  // namespace pybind11
