// The Python module segevol_fast._C. Importing it defines the schema of every op in op_list.h
// (torch.ops.segevol_fast_C.*) and runs the TORCH_LIBRARY_IMPL registrations of the kernels
// linked into it; the pybind11 surface only reports how the module was built, for
// segevol_fast.info() and bug reports. No op name appears here: they all come from op_list.h.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include "op_list.h"

#include <string>

namespace py = pybind11;

#ifndef SEGEVOL_FAST_VERSION
#define SEGEVOL_FAST_VERSION "unknown"
#endif
#ifndef SEGEVOL_FAST_CUDA_ARCHS
#define SEGEVOL_FAST_CUDA_ARCHS ""
#endif

static py::dict build_info() {
  py::dict d;
  d["version"] = SEGEVOL_FAST_VERSION;
#ifdef SEGEVOL_FAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = SEGEVOL_FAST_CUDA_ARCHS;
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["torch_at_build"] = TORCH_VERSION;
  d["compiler"] = std::string(__VERSION__);
  d["cplusplus"] = static_cast<long>(__cplusplus);
  py::list ops;
#define SF_APPEND_NAME(name, schema) ops.append(#name);
  SEGEVOL_FAST_OPS(SF_APPEND_NAME)
#undef SF_APPEND_NAME
  d["ops"] = ops;
  return d;
}

TORCH_LIBRARY(segevol_fast_C, m) {
#define SF_DEFINE_SCHEMA(name, schema) m.def(#name schema);
  SEGEVOL_FAST_OPS(SF_DEFINE_SCHEMA)
#undef SF_DEFINE_SCHEMA
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "segevol_fast native kernels (registered as torch.ops.segevol_fast_C.*)";
  m.def("build_info", &build_info, "How this extension was built: CUDA, OpenMP, compiler, torch.");
}
