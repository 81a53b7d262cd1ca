// Registers the C++ passes over tensor metadata: GradWatch (step_plan.h), the per-step check of
// fastopt.optim's step plan, grads_are, scan_lists, all_contiguous, and lists_pass (list_checks.h),
// the functional ops' argument checks.
#include "list_checks.h"
#include "step_plan.h"

namespace fastopt {
namespace cpu {

void register_step_plan(pybind11::module& module) {
  pybind11::class_<GradWatch>(module, "GradWatch",
                              "The per-step check of fastopt.optim's step plan: refresh() -> -1 (void), 0 (grads "
                              "checked, at the last step's addresses), 1 (checked, some moved)")
      .def(pybind11::init<const pybind11::list&, std::vector<int64_t>, const pybind11::list&, std::vector<int64_t>,
                          const std::vector<at::Tensor>&>(),
           pybind11::arg("group_params"), pybind11::arg("slots"), pybind11::arg("grad_lists"),
           pybind11::arg("positions"), pybind11::arg("written"))
      .def("refresh", &GradWatch::refresh)
      .def("fill_lists", &GradWatch::fill_lists, "the grads into the plan's lists")
      .def("grad_column", &GradWatch::grad_column, pybind11::arg("first"), pybind11::arg("count"),
           pybind11::arg("addresses"), "entries' grad addresses into `addresses`; their dtype codes (bytes), or None")
      .def("grads", &GradWatch::grads, pybind11::arg("first"), pybind11::arg("count"), "entries' grads, a list")
      .def("layout", &GradWatch::layout, "changes when a grad moves or changes dtype or contiguity")
      .def("release", &GradWatch::release, "let go of the grads (after a step)");
  module.def("grads_are", &grads_are, pybind11::arg("params"), pybind11::arg("views"),
             "whether params[i].grad is views[i] for every i");
  module.def("scan_lists", &scan_lists, pybind11::arg("lists"), pybind11::arg("addresses"),
             "tensors' addresses into `addresses` [lists, n]; (dtype codes, the first list's numels) as bytes, "
             "and whether every tensor is contiguous");
  module.def("all_contiguous", &all_contiguous, pybind11::arg("tensors"), "whether every tensor is contiguous");
  module.def("lists_pass", &lists_pass, pybind11::arg("lists"), pybind11::arg("written"), pybind11::arg("shaped"),
             pybind11::arg("scalars"), pybind11::arg("reads"), pybind11::arg("writes"),
             "whether fastopt.ops' checks accept these lists (False: run them, they say why or accept)");
}

}  // namespace cpu
}  // namespace fastopt
