// The _nccl extension module: the NCCL Communicator, built only where CMake finds CUDA and NCCL,
// so that importing ftengine never needs NCCL. Its objects are _C.Communicator instances.
#include <pybind11/pybind11.h>

#include "engine/nccl/nccl_communicator.h"

namespace py = pybind11;

PYBIND11_MODULE(_nccl, m) {
  m.doc() = "ftengine NCCL communicator (use ftengine.distributed)";
  py::module_::import("ftengine._C");  // registers the Communicator base type
  m.def(
      "unique_id", [] { return py::bytes(ftengine::make_nccl_unique_id()); },
      "a fresh rendezvous id: made on rank 0, given to every rank's make_communicator");
  // Releases the GIL: it returns only once every rank has joined.
  m.def("make_communicator", &ftengine::make_nccl_communicator, py::arg("unique_id"),
        py::arg("rank"), py::arg("size"), py::arg("device"), py::arg("host"),
        py::call_guard<py::gil_scoped_release>(),
        "a Communicator over NCCL on GPU `device` for this rank; `host` (an MPI communicator "
        "of the same ranks, or the single rank's) sums host values");
}
