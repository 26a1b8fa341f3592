// The MPI Communicator, for CPU tensors. It wraps a communicator the Python side created with
// mpi4py, so MPI is initialised (and finalised) once, by mpi4py.
#pragma once

#include <cstdint>
#include <memory>

#include "engine/communicator.h"

namespace ftengine {

// `handle` is the MPI_Comm of an mpi4py communicator (mpi4py.MPI._handleof(comm)).
std::shared_ptr<Communicator> make_mpi_communicator(uintptr_t handle);

}  // namespace ftengine
