// The registration of the CUDA backend: the op schemas (TORCH_LIBRARY(fastopt)), the ops' CUDA
// implementations (host_runtime.cpp) as their CUDA kernels for the dispatcher, and the Python
// module fastopt._C whose import registers them, with each op's eager entry (the same host code,
// the Python lists read in place), UpdatePlan and NormPlan (the step plan's updates and norm,
// pybind11 classes: no torch op, so no boxed lists) and the table cache's test hooks.
#include <Python.h>  // for the module init below: `import fastopt._C` registers the ops

#include <ATen/record_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "host_runtime.h"

#define FASTOPT_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define FASTOPT_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

// Schemas: lists that an op writes carry (x!) annotations; nothing written is returned. A
// "float or device scalar" argument is a float plus an optional tensor that wins when given.
FASTOPT_TORCH_LIBRARY(FASTOPT_OPS_LIBRARY, m) {
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type, bool per_tensor, Tensor(a!)? found_inf) -> (Tensor, Tensor)");
  m.def(
      "unscale_and_check_(Tensor(a!)[] tensors, float inv_scale, Tensor? inv_scale_tensor, Tensor(b!) found_inf, "
      "float? norm_type=None, bool per_tensor=False) -> (Tensor, Tensor)");
  m.def("scale_(Tensor(a!)[] tensors, float coef, Tensor? coef_tensor) -> ()");
  m.def("clamp_(Tensor(a!)[] tensors, float clip_value) -> ()");
  m.def("adaptive_clip_(Tensor[] params, Tensor(a!)[] grads, float clip_factor, float eps, float norm_type, bool unitwise) -> ()");
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, "
      "float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool maximize, "
      "Tensor(e!)[] max_exp_avg_sqs, float grad_scale, Tensor? grad_scale_tensor, Tensor? found_inf, "
      "float clip_coef, Tensor? clip_coef_tensor, bool decoupled_weight_decay=True) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, Tensor? lr_tensor, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, "
      "float grad_scale, Tensor? grad_scale_tensor, Tensor? found_inf, float clip_coef, Tensor? clip_coef_tensor) -> ()");
  m.def(
      "lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float weight_decay, bool maximize, float grad_scale, Tensor? grad_scale_tensor, Tensor? found_inf, "
      "float clip_coef, Tensor? clip_coef_tensor) -> ()");
}

namespace {

// An op with its lists as the dispatcher gives them (at::TensorList: views of the boxed lists, not
// copies) or as fastopt::TensorRefs (the eager entries below, reading Python lists in place):
// `Lists` says which. Each list argument becomes a TensorRefs (an eager entry's is one); the rest
// pass through.
template <typename Lists>
struct Entries {
  static const fastopt::TensorRefs& refs(const fastopt::TensorRefs& list) { return list; }
  static fastopt::TensorRefs refs(at::TensorList list) { return fastopt::TensorRefs(list); }

  static std::tuple<at::Tensor, at::Tensor> multi_tensor_norm(const Lists& tensors, double norm_type, bool per_tensor,
                                                              const std::optional<at::Tensor>& found_inf) {
    return fastopt::multi_tensor_norm(refs(tensors), norm_type, per_tensor, found_inf);
  }
  static std::tuple<at::Tensor, at::Tensor> unscale_and_check_(const Lists& tensors, double inv_scale,
                                                               const std::optional<at::Tensor>& inv_scale_tensor,
                                                               const at::Tensor& found_inf,
                                                               std::optional<double> norm_type, bool per_tensor) {
    return fastopt::unscale_and_check_(refs(tensors), inv_scale, inv_scale_tensor, found_inf, norm_type, per_tensor);
  }
  static void scale_(const Lists& tensors, double coef, const std::optional<at::Tensor>& coef_tensor) {
    fastopt::scale_(refs(tensors), coef, coef_tensor);
  }
  static void clamp_(const Lists& tensors, double clip_value) { fastopt::clamp_(refs(tensors), clip_value); }
  static void adaptive_clip_(const Lists& params, const Lists& grads, double clip_factor, double eps, double norm_type,
                             bool unitwise) {
    fastopt::adaptive_clip_(refs(params), refs(grads), clip_factor, eps, norm_type, unitwise);
  }
  static void adamw_(const Lists& params, const Lists& grads, const Lists& exp_avgs, const Lists& exp_avg_sqs,
                     const Lists& steps, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                     double beta2, double eps, double weight_decay, bool maximize, const Lists& max_exp_avg_sqs,
                     double grad_scale, const std::optional<at::Tensor>& grad_scale_tensor,
                     const std::optional<at::Tensor>& found_inf, double clip_coef,
                     const std::optional<at::Tensor>& clip_coef_tensor, bool decoupled_weight_decay) {
    fastopt::adamw_(refs(params), refs(grads), refs(exp_avgs), refs(exp_avg_sqs), refs(steps), lr, lr_tensor, beta1,
                    beta2, eps, weight_decay, maximize, refs(max_exp_avg_sqs), grad_scale, grad_scale_tensor,
                    found_inf, clip_coef, clip_coef_tensor, decoupled_weight_decay);
  }
  static void sgd_(const Lists& params, const Lists& grads, const Lists& momentum_buffers, double lr,
                   const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening, double weight_decay,
                   bool nesterov, bool maximize, bool first_step, double grad_scale,
                   const std::optional<at::Tensor>& grad_scale_tensor, const std::optional<at::Tensor>& found_inf,
                   double clip_coef, const std::optional<at::Tensor>& clip_coef_tensor) {
    fastopt::sgd_(refs(params), refs(grads), refs(momentum_buffers), lr, lr_tensor, momentum, dampening, weight_decay,
                  nesterov, maximize, first_step, grad_scale, grad_scale_tensor, found_inf, clip_coef,
                  clip_coef_tensor);
  }
  static void lion_(const Lists& params, const Lists& grads, const Lists& exp_avgs, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double weight_decay,
                    bool maximize, double grad_scale, const std::optional<at::Tensor>& grad_scale_tensor,
                    const std::optional<at::Tensor>& found_inf, double clip_coef,
                    const std::optional<at::Tensor>& clip_coef_tensor) {
    fastopt::lion_(refs(params), refs(grads), refs(exp_avgs), lr, lr_tensor, beta1, beta2, weight_decay, maximize,
                   grad_scale, grad_scale_tensor, found_inf, clip_coef, clip_coef_tensor);
  }
};

using DispatchedEntries = Entries<at::TensorList>;

}  // namespace

FASTOPT_TORCH_LIBRARY_IMPL(FASTOPT_OPS_LIBRARY, FASTOPT_OPS_DISPATCH_KEY, m) {
  m.impl("multi_tensor_norm", &DispatchedEntries::multi_tensor_norm);
  m.impl("unscale_and_check_", &DispatchedEntries::unscale_and_check_);
  m.impl("scale_", &DispatchedEntries::scale_);
  m.impl("clamp_", &DispatchedEntries::clamp_);
  m.impl("adaptive_clip_", &DispatchedEntries::adaptive_clip_);
  m.impl("adamw_", &DispatchedEntries::adamw_);
  m.impl("sgd_", &DispatchedEntries::sgd_);
  m.impl("lion_", &DispatchedEntries::lion_);
}

// Test hooks, not API: fastopt._C._table_cache_stats() -> (cached tables, tables kept only for
// live graphs, tables read by live graphs); fastopt._C._set_arrival_counters(value) sets every
// cached table's arrival counters (on the current stream), as an aborted launch could leave them.
static PyObject* table_cache_stats(PyObject*, PyObject*) {
  try {
    const fastopt::CacheStats stats = fastopt::table_cache_stats();
    return Py_BuildValue("(LLL)", static_cast<long long>(stats.cached), static_cast<long long>(stats.graph_only),
                         static_cast<long long>(stats.graph_tables));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

static PyObject* set_arrival_counters(PyObject*, PyObject* value) {
  const long counter = PyLong_AsLong(value);
  if (counter == -1 && PyErr_Occurred()) return nullptr;
  try {
    fastopt::set_arrival_counters(static_cast<int>(counter));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

namespace {

namespace py = pybind11;

// c10 errors as the ops raise them through torch.ops: NotImplementedError for a dtype combination
// without a kernel build (the backend falls back on it), TypeError for a tensor subclass that
// dispatches to Python (which an eager entry leaves to torch.ops: host_runtime.cpp's
// check_lists), RuntimeError otherwise; the message without the C++ backtrace.
template <typename F>
auto raising_python_errors(F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const c10::NotImplementedError& e) {
    PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  }
  throw py::error_already_set();
}

// fastopt._C.<op>: each op without the dispatcher, for eager calls on plain tensors
// (fastopt/backends/cuda.py): its lists are read in place (TensorRefs), where torch.ops converts
// every tensor of every list to an IValue and back (13 ms of the 19 ms of host work of an adamw_
// over 5,000 params, on the 2-core test machine). Traced calls, dispatch modes and tensor
// subclasses go through torch.ops, which they must see. The profiler sees the op's name.
template <typename R, typename... Args>
void bind_eager(py::module_ module, const char* name, R (*op)(Args...)) {
  const std::string record = std::string("fastopt::") + name;
  module.def(name, [record, op](Args... args) -> R {
    RECORD_FUNCTION(record.c_str(), std::vector<c10::IValue>());
    return raising_python_errors([&]() -> R { return op(std::forward<Args>(args)...); });
  });
}

void bind_eager_ops(py::module_ module) {
  using Eager = Entries<fastopt::TensorRefs>;
  bind_eager(module, "multi_tensor_norm", &Eager::multi_tensor_norm);
  bind_eager(module, "unscale_and_check_", &Eager::unscale_and_check_);
  bind_eager(module, "scale_", &Eager::scale_);
  bind_eager(module, "clamp_", &Eager::clamp_);
  bind_eager(module, "adaptive_clip_", &Eager::adaptive_clip_);
  bind_eager(module, "adamw_", &Eager::adamw_);
  bind_eager(module, "sgd_", &Eager::sgd_);
  bind_eager(module, "lion_", &Eager::lion_);
}

// The tensors of a Python list of grads, read in place (TensorRefs); the first item that is not a
// tensor named in the error.
fastopt::TensorRefs borrowed_grads(const py::list& grads) {
  fastopt::TensorRefs tensors;
  if (tensors.borrow(grads.ptr())) return tensors;
  Py_ssize_t i = 0;
  while (THPVariable_Check(PyList_GET_ITEM(grads.ptr(), i))) ++i;
  throw py::type_error("fastopt: grads[" + std::to_string(i) + "] must be a tensor, got " +
                       Py_TYPE(PyList_GET_ITEM(grads.ptr(), i))->tp_name);
}

// fastopt._C.UpdatePlan(op, params, grads, states) (op: 0 AdamW, 1 SGD, 2 Lion; states as
// host_runtime.h's UpdatePlan takes them) and its step(grads, scalars...) -> 0 done, 1 plan again,
// 2 run the op (host_runtime.h's PlanStatus).
void bind_update_plan(py::module_ module) {
  py::class_<fastopt::UpdatePlan>(module, "UpdatePlan")
      .def(py::init([](int64_t op, const fastopt::TensorList& params, const py::list& grads,
                       const std::vector<fastopt::TensorList>& states) {
             fastopt::TensorList grad_list;
             for (const at::Tensor& g : borrowed_grads(grads)) grad_list.push_back(g);
             return raising_python_errors([&] {
               TORCH_CHECK(op >= 0 && op <= 2, "fastopt: UpdatePlan: op must be 0 (AdamW), 1 (SGD) or 2 (Lion), got ",
                           op);
               return std::make_unique<fastopt::UpdatePlan>(static_cast<fastopt::PlannedOp>(op), params, grad_list,
                                                            states);
             });
           }),
           py::arg("op"), py::arg("params"), py::arg("grads"), py::arg("states"))
      .def(
          "step",
          [](fastopt::UpdatePlan& plan, const py::object& grads, double lr, std::optional<at::Tensor> lr_tensor,
             double grad_scale, std::optional<at::Tensor> grad_scale_tensor, double clip_coef,
             std::optional<at::Tensor> clip_coef_tensor, std::optional<at::Tensor> found_inf, bool maximize,
             double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
             double momentum, double dampening, bool nesterov, bool first_step) -> int64_t {
            fastopt::PlannedScalars scalars;
            scalars.lr = lr, scalars.lr_tensor = std::move(lr_tensor);
            scalars.grad_scale = grad_scale, scalars.grad_scale_tensor = std::move(grad_scale_tensor);
            scalars.clip_coef = clip_coef, scalars.clip_coef_tensor = std::move(clip_coef_tensor);
            scalars.found_inf = std::move(found_inf), scalars.maximize = maximize;
            scalars.beta1 = beta1, scalars.beta2 = beta2, scalars.eps = eps, scalars.weight_decay = weight_decay;
            scalars.decoupled_weight_decay = decoupled_weight_decay;
            scalars.momentum = momentum, scalars.dampening = dampening, scalars.nesterov = nesterov;
            scalars.first_step = first_step;
            if (THPVariable_Check(grads.ptr())) {  // the grads' addresses, checked by the caller
              const at::Tensor& addresses = THPVariable_Unpack(grads.ptr());
              return raising_python_errors([&] { return static_cast<int64_t>(plan.step_addresses(addresses, scalars)); });
            }
            const fastopt::TensorRefs listed = borrowed_grads(py::cast<py::list>(grads));
            return raising_python_errors([&] { return static_cast<int64_t>(plan.step(listed, scalars)); });
          },
          "one step with these grads (a list), or with the grads at these addresses (an int64 CPU tensor, grads "
          "checked by the caller): 0 done, 1 nothing done (plan again), 2 nothing done (run the op), 3 nothing "
          "done (no table for this stream: step with the grads as a list)");
}

// fastopt._C.NormPlan(grads) and its norm(addresses, norm_type, per_tensor, found_inf) -> (total,
// norms), or None: run the op (host_runtime.h's NormPlan).
void bind_norm_plan(py::module_ module) {
  py::class_<fastopt::NormPlan>(module, "NormPlan")
      .def(py::init([](const py::list& grads) {
             fastopt::TensorList grad_list;
             for (const at::Tensor& g : borrowed_grads(grads)) grad_list.push_back(g);
             return raising_python_errors([&] { return std::make_unique<fastopt::NormPlan>(grad_list); });
           }),
           py::arg("grads"))
      .def(
          "norm",
          [](fastopt::NormPlan& plan, const at::Tensor& addresses, double norm_type, bool per_tensor,
             std::optional<at::Tensor> found_inf) -> py::object {
            auto result = raising_python_errors([&] { return plan.norm(addresses, norm_type, per_tensor, found_inf); });
            if (!result) return py::none();
            return py::make_tuple(std::get<0>(*result), std::get<1>(*result));
          },
          py::arg("addresses"), py::arg("norm_type"), py::arg("per_tensor"), py::arg("found_inf"),
          "(total, per-tensor norms) of the grads at these addresses, or None: run the op");
}

}  // namespace

static PyMethodDef fastopt_methods[] = {
    {"_table_cache_stats", table_cache_stats, METH_NOARGS, "test hook: (cached, graph_only, graph_tables)"},
    {"_set_arrival_counters", set_arrival_counters, METH_O, "test hook: set every cached table's arrival counters"},
    {nullptr, nullptr, 0, nullptr}};

// `import fastopt._C` loads this library, and with it the registrations above.
static PyModuleDef fastopt_module = {PyModuleDef_HEAD_INIT, FASTOPT_OPS_MODULE,
                                     "fastopt's CUDA kernels, registered as torch.ops.fastopt.*", -1,
                                     fastopt_methods};
PyMODINIT_FUNC FASTOPT_OPS_MODULE_INIT(void) {
  PyObject* module = PyModule_Create(&fastopt_module);
  if (module == nullptr) return nullptr;
  try {
    bind_update_plan(py::reinterpret_borrow<py::module_>(module));
    bind_norm_plan(py::reinterpret_borrow<py::module_>(module));
    bind_eager_ops(py::reinterpret_borrow<py::module_>(module));
  } catch (py::error_already_set& e) {
    e.restore();
    Py_DECREF(module);
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
