// The _C extension module: thin bindings. C++ validates and computes; the public API, its
// defaults and docstrings live in the Python package.
#include <pybind11/pybind11.h>

void bind_engine(pybind11::module_& m);
void bind_kernels(pybind11::module_& m);
void bind_ops(pybind11::module_& m);
#ifdef FTENGINE_WITH_CUDA
void bind_cuda(pybind11::module_& m);
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "ftengine native core (use the ftengine package, not this module)";
  bind_engine(m);
  bind_kernels(m);
  bind_ops(m);
#ifdef FTENGINE_WITH_CUDA
  m.attr("has_cuda") = true;
  bind_cuda(m);
#else
  m.attr("has_cuda") = false;
#endif
}
