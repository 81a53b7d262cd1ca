// fastopt._C_emulated: csrc/cuda/registration.cpp and host_runtime.cpp, unchanged, built for CPU
// tensors on the host emulation of the device (see README.md). The same schemas, table building,
// caching, address refresh and arrival counters, registered as torch.ops.fastopt_emulated.* for
// the CPU dispatch key; the CUDA runtime calls are served by runtime.cpp, c10's CUDA helpers by
// include/c10/cuda/.
#define FASTOPT_OPS_LIBRARY fastopt_emulated
#define FASTOPT_OPS_DISPATCH_KEY CPU
#define FASTOPT_OPS_DEVICE_TYPE at::kCPU
#define FASTOPT_OPS_PINNED false  // no pinned memory without an accelerator: plain host memory
#define FASTOPT_OPS_MODULE "fastopt._C_emulated"
#define FASTOPT_OPS_MODULE_INIT fastopt_emulated_ops_module

// Both in this one translation unit; registration.cpp first, as it includes Python.h first.
#include "cuda/registration.cpp"
#include "cuda/host_runtime.cpp"

#include "runtime.h"

// Test hooks of the emulation itself, beside registration.cpp's: kernel launches so far, and a
// switch that makes every launch return without running its grid (the ops' host work alone, for
// timing it).
static PyObject* emulated_launch_count(PyObject*, PyObject*) {
  return PyLong_FromUnsignedLongLong(fastopt_emu::launch_count());
}
static PyObject* skip_grids(PyObject*, PyObject* skipped) {
  const int value = PyObject_IsTrue(skipped);
  if (value < 0) return nullptr;
  fastopt_emu::set_grids_skipped(value != 0);
  Py_RETURN_NONE;
}
static PyMethodDef emulation_methods[] = {
    {"_launch_count", emulated_launch_count, METH_NOARGS, "kernel launches on the emulated device so far"},
    {"_skip_grids", skip_grids, METH_O, "bench hook: launches return at once, their grids not run"},
    {nullptr, nullptr, 0, nullptr}};

PyMODINIT_FUNC PyInit__C_emulated(void) {
  PyObject* module = fastopt_emulated_ops_module();
  if (module != nullptr && PyModule_AddFunctions(module, emulation_methods) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
