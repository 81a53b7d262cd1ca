// The registration of the CUDA backend: the op schemas (TORCH_LIBRARY(fastopt)), the ops' CUDA
// implementations (host_runtime.cpp) as their CUDA kernels for the dispatcher, and the Python
// module fastopt._C whose import registers them, with the table cache's test hooks.
#include <Python.h>  // only for the module init below: `import fastopt._C` registers the ops

#include <torch/library.h>

#include <exception>

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

FASTOPT_TORCH_LIBRARY_IMPL(FASTOPT_OPS_LIBRARY, FASTOPT_OPS_DISPATCH_KEY, m) {
  m.impl("multi_tensor_norm", &fastopt::multi_tensor_norm);
  m.impl("unscale_and_check_", &fastopt::unscale_and_check_);
  m.impl("scale_", &fastopt::scale_);
  m.impl("clamp_", &fastopt::clamp_);
  m.impl("adaptive_clip_", &fastopt::adaptive_clip_);
  m.impl("adamw_", &fastopt::adamw_);
  m.impl("sgd_", &fastopt::sgd_);
  m.impl("lion_", &fastopt::lion_);
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

static PyMethodDef fastopt_methods[] = {
    {"_table_cache_stats", table_cache_stats, METH_NOARGS, "test hook: (cached, graph_only, graph_tables)"},
    {"_set_arrival_counters", set_arrival_counters, METH_O, "test hook: set every cached table's arrival counters"},
    {nullptr, nullptr, 0, nullptr}};

// `import fastopt._C` loads this library, and with it the registrations above.
static PyModuleDef fastopt_module = {PyModuleDef_HEAD_INIT, FASTOPT_OPS_MODULE,
                                     "fastopt's CUDA kernels, registered as torch.ops.fastopt.*", -1,
                                     fastopt_methods};
PyMODINIT_FUNC FASTOPT_OPS_MODULE_INIT(void) { return PyModule_Create(&fastopt_module); }
