// The Communicator interface: the collectives tensor parallelism needs, over whatever library
// the deployment has. Single rank always exists; MPI (CPU tensors) is built when MPI is found
// and NCCL (CUDA tensors, bootstrapped through MPI) when CUDA and NCCL are, each in its own
// extension module so the core never requires either installation. HCCL (Ascend) plugs in here
// too.
#pragma once

#include <cstdint>
#include <memory>

#include "engine/allocator.h"
#include "engine/dtype.h"

namespace ftengine {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Whether the tensor collectives work on memory of `device`: host memory for MPI, one GPU's
  // memory for NCCL; the single rank's identities serve either.
  virtual bool serves(Device device) const = 0;
  // The CUDA stream (a cudaStream_t) the backend computes on, set once before any collective.
  // A device communicator starts each collective after the work queued there so far, and work
  // queued there after the collective has returned (allreduce_sum, allgather) or been waited
  // for (wait_all) sees its result, without the host waiting. Host communicators ignore it.
  virtual void use_stream(void* /*stream*/) {}

  // Collectives over tensors' memory: `count` elements of `dtype` at `data`, in the memory this
  // communicator serves (host memory for MPI, which sums float32; device memory of any float
  // type for NCCL). An implementation refuses a dtype it cannot sum rather than guess.
  //
  // In-place sum over every rank; returns when done (on a device: in stream order, see
  // use_stream).
  virtual void allreduce_sum(void* data, int64_t count, DType dtype) = 0;
  // Starts an in-place sum and returns at once; `data` must stay untouched until wait_all().
  // progress() lets pending sums advance while the caller computes (MPI implementations move
  // non-blocking collectives only inside MPI calls).
  virtual void start_allreduce_sum(void* data, int64_t count, DType dtype) = 0;
  virtual void progress() = 0;
  virtual void wait_all() = 0;
  // out[rank * count + i] = data[i] of `rank`, for every rank.
  virtual void allgather(const void* data, int64_t count, DType dtype, void* out) = 0;

  // Sum of host values every rank needs to decide alike (a vote), whatever memory the tensor
  // collectives use.
  virtual void allreduce_sum_host(float* values, int64_t count) = 0;
};

std::shared_ptr<Communicator> make_single_rank_communicator();

}  // namespace ftengine
