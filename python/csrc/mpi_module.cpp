// The _mpi extension module: the MPI Communicator, built only where CMake finds MPI, so that
// importing ftengine never needs an MPI library. Its objects are _C.Communicator instances.
#include <pybind11/pybind11.h>

#include "engine/mpi/mpi_communicator.h"

namespace py = pybind11;

PYBIND11_MODULE(_mpi, m) {
  m.doc() = "ftengine MPI communicator (use ftengine.distributed)";
  py::module_::import("ftengine._C");  // registers the Communicator base type
  m.def("make_communicator", &ftengine::make_mpi_communicator, py::arg("mpi_comm_handle"),
        "a Communicator over the MPI_Comm of an mpi4py communicator");
}
