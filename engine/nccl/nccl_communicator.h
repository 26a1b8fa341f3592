// The NCCL Communicator, for CUDA tensors: one GPU per rank. It is built into its own extension
// module (_nccl) with the NCCL library, so neither the core nor the MPI module needs NCCL.
// Ranks meet through an id rank 0 makes and every rank receives over MPI (ftengine.distributed
// broadcasts it with mpi4py); the votes on host values go over that MPI communicator too.
#pragma once

#include <memory>
#include <string>

#include "engine/communicator.h"

namespace ftengine {

// A fresh rendezvous id (the bytes of an ncclUniqueId): made on rank 0, sent to every rank.
std::string make_nccl_unique_id();

// Joins the `size` ranks that hold `unique_id` as `rank`, computing on GPU `device`; every rank
// must call it (it returns once all have joined). `host` sums the host values of votes
// (allreduce_sum_host): the MPI communicator of the same ranks, or the single rank's.
std::shared_ptr<Communicator> make_nccl_communicator(const std::string& unique_id, int rank,
                                                     int size, int device,
                                                     std::shared_ptr<Communicator> host);

}  // namespace ftengine
