#include "engine/nccl/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "engine/cuda/cuda_check.h"

namespace ftengine {

namespace {

using cuda::check_cuda;

void check_nccl(ncclResult_t result, const char* what) {
  if (result != ncclSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + ncclGetErrorString(result));
  }
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return ncclFloat32;
    case DType::kFloat16:
      return ncclFloat16;
    case DType::kBFloat16:
      return ncclBfloat16;
    case DType::kInt32:
      return ncclInt32;
  }
  throw std::invalid_argument("NCCL: unknown dtype");
}

size_t nccl_count(int64_t count) {
  if (count < 0) {
    throw std::invalid_argument("collective of " + std::to_string(count) + " elements");
  }
  return static_cast<size_t>(count);
}

// The collectives run on a stream of their own, so a tile's sum overlaps the next tile's matrix
// product on the backend's stream (FastAttention's tiling-AllReduce). Events order the two
// streams without the host waiting: a collective starts after everything queued on the compute
// stream so far (the product that wrote its tile), and wait_all makes the compute stream wait
// for every collective started. Every collective goes to that one stream, in the order all
// ranks issue them: NCCL pairs collectives across ranks by order, and two running at once on
// different streams could each wait for a peer busy in the other.
class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const ncclUniqueId& id, int rank, int size, int device,
                   std::shared_ptr<Communicator> host)
      : rank_(rank), size_(size), device_(device), host_(std::move(host)) {
    activate();
    try {
      check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
      check_cuda(cudaEventCreateWithFlags(&computed_, cudaEventDisableTiming), "cudaEventCreate");
      check_cuda(cudaEventCreateWithFlags(&summed_, cudaEventDisableTiming), "cudaEventCreate");
      check_nccl(ncclCommInitRank(&comm_, size, id, rank), "ncclCommInitRank");
    } catch (...) {
      release();
      throw;
    }
  }

  ~NcclCommunicator() override { release(); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  bool serves(Device device) const override { return device == Device::kCuda; }
  void use_stream(void* stream) override { compute_ = static_cast<cudaStream_t>(stream); }

  void allreduce_sum(void* data, int64_t count, DType dtype) override {
    start_allreduce_sum(data, count, dtype);
    wait_all();
  }

  void start_allreduce_sum(void* data, int64_t count, DType dtype) override {
    follow_compute();
    check_nccl(
        ncclAllReduce(data, data, nccl_count(count), nccl_type(dtype), ncclSum, comm_, stream_),
        "ncclAllReduce");
    pending_ = true;
  }

  // NCCL's kernels advance by themselves.
  void progress() override {}

  void wait_all() override {
    if (!pending_) return;
    pending_ = false;
    check_cuda(cudaEventRecord(summed_, stream_), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(compute_, summed_, 0), "cudaStreamWaitEvent");
  }

  void allgather(const void* data, int64_t count, DType dtype, void* out) override {
    follow_compute();
    check_nccl(ncclAllGather(data, out, nccl_count(count), nccl_type(dtype), comm_, stream_),
               "ncclAllGather");
    pending_ = true;
    wait_all();
  }

  void allreduce_sum_host(float* values, int64_t count) override {
    host_->allreduce_sum_host(values, count);
  }

 private:
  // The current device is per host thread: NCCL and the events need this communicator's.
  void activate() const { check_cuda(cudaSetDevice(device_), "cudaSetDevice"); }

  // The collectives' stream waits for the work queued on the compute stream so far.
  void follow_compute() {
    activate();
    check_cuda(cudaEventRecord(computed_, compute_), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(stream_, computed_, 0), "cudaStreamWaitEvent");
  }

  // Destructors never throw. A communicator whose peer failed may have collectives that never
  // finish: it is aborted, where a plain destroy would wait for them.
  void release() {
    if (comm_) {
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      if (state == ncclSuccess) {
        cudaStreamSynchronize(stream_);
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    if (summed_) cudaEventDestroy(summed_);
    if (computed_) cudaEventDestroy(computed_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank_;
  int size_;
  int device_;
  std::shared_ptr<Communicator> host_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;   // the collectives'
  cudaStream_t compute_ = nullptr;  // the backend's (the legacy default stream until set)
  cudaEvent_t computed_ = nullptr;  // recorded on compute_ before each collective
  cudaEvent_t summed_ = nullptr;    // recorded on stream_ by wait_all
  bool pending_ = false;            // a collective started since the last wait_all
};

}  // namespace

std::string make_nccl_unique_id() {
  ncclUniqueId id;
  check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  return std::string(id.internal, sizeof(id.internal));
}

std::shared_ptr<Communicator> make_nccl_communicator(const std::string& unique_id, int rank,
                                                     int size, int device,
                                                     std::shared_ptr<Communicator> host) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    throw std::invalid_argument("an NCCL unique id has " + std::to_string(sizeof(id.internal)) +
                                " bytes, got " + std::to_string(unique_id.size()));
  }
  if (size < 1 || rank < 0 || rank >= size) {
    throw std::invalid_argument("rank " + std::to_string(rank) + " of " + std::to_string(size));
  }
  if (!host || host->rank() != rank || host->size() != size) {
    throw std::invalid_argument("the host communicator must span the same ranks as NCCL");
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  return std::make_shared<NcclCommunicator>(id, rank, size, device, std::move(host));
}

}  // namespace ftengine
