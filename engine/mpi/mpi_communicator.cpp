#include "engine/mpi/mpi_communicator.h"

#include <mpi.h>

#include <condition_variable>
#include <deque>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace ftengine {

namespace {

void check(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char message[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, message, &length);
  throw std::runtime_error(std::string(what) + " failed: " + std::string(message, length));
}

int mpi_count(int64_t count) {
  if (count < 0 || count > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("collective of " + std::to_string(count) +
                                " elements exceeds MPI's int count");
  }
  return static_cast<int>(count);
}

// Overlapped sums run on a thread of their own, as blocking MPI_Allreduce calls on a duplicate
// of the communicator. Open MPI advances a non-blocking collective only inside MPI calls, so an
// MPI_Iallreduce started before a tile's matrix product mostly waits for the final MPI_Wait:
// measured on 2 ranks, tiling then hid nothing. A thread that sits in the collective keeps it
// moving while the caller computes. It needs MPI_THREAD_MULTIPLE (mpi4py's default); below that
// level the non-blocking calls are used.
// MPI sums host float32 (the CPU backend's activations); half-precision sums are NCCL's.
void require_float32(DType dtype) {
  if (dtype != DType::kFloat32) {
    throw std::invalid_argument("the MPI communicator sums float32 host tensors, not " +
                                dtype_name(dtype));
  }
}

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    int level = MPI_THREAD_SINGLE;
    check(MPI_Query_thread(&level), "MPI_Query_thread");
    if (level == MPI_THREAD_MULTIPLE) {
      check(MPI_Comm_dup(comm_, &overlap_comm_), "MPI_Comm_dup");
      worker_ = std::thread([this] { run_overlapped(); });
    }
  }

  ~MpiCommunicator() override {
    if (worker_.joinable()) {
      {
        std::lock_guard<std::mutex> guard(mutex_);
        stopping_ = true;
      }
      wake_worker_.notify_one();
      worker_.join();
      MPI_Comm_free(&overlap_comm_);
    }
    // A pending request must not outlive the buffers it writes to.
    if (!pending_.empty()) {
      MPI_Waitall(static_cast<int>(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE);
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  bool serves(Device device) const override { return device == Device::kCpu; }

  void allreduce_sum(void* data, int64_t count, DType dtype) override {
    require_float32(dtype);
    allreduce_sum_host(static_cast<float*>(data), count);
  }

  void allreduce_sum_host(float* values, int64_t count) override {
    check(MPI_Allreduce(MPI_IN_PLACE, values, mpi_count(count), MPI_FLOAT, MPI_SUM, comm_),
          "MPI_Allreduce");
  }

  void start_allreduce_sum(void* untyped, int64_t count, DType dtype) override {
    require_float32(dtype);
    float* data = static_cast<float*>(untyped);
    const int items = mpi_count(count);
    if (worker_.joinable()) {
      {
        std::lock_guard<std::mutex> guard(mutex_);
        queue_.push_back({data, items});
      }
      wake_worker_.notify_one();
      return;
    }
    MPI_Request request;
    check(MPI_Iallreduce(MPI_IN_PLACE, data, items, MPI_FLOAT, MPI_SUM, comm_, &request),
          "MPI_Iallreduce");
    pending_.push_back(request);
  }

  void progress() override {
    if (pending_.empty()) return;
    int done = 0;
    check(MPI_Testall(static_cast<int>(pending_.size()), pending_.data(), &done,
                      MPI_STATUSES_IGNORE),
          "MPI_Testall");
    if (done) pending_.clear();
  }

  void wait_all() override {
    if (worker_.joinable()) {
      std::unique_lock<std::mutex> lock(mutex_);
      drained_.wait(lock, [this] { return queue_.empty() && !busy_; });
      if (!error_.empty()) {
        const std::string error = std::move(error_);
        error_.clear();
        throw std::runtime_error(error);
      }
      return;
    }
    if (pending_.empty()) return;
    check(MPI_Waitall(static_cast<int>(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE),
          "MPI_Waitall");
    pending_.clear();
  }

  void allgather(const void* data, int64_t count, DType dtype, void* out) override {
    require_float32(dtype);
    check(MPI_Allgather(data, mpi_count(count), MPI_FLOAT, out, mpi_count(count), MPI_FLOAT,
                        comm_),
          "MPI_Allgather");
  }

 private:
  struct Sum {
    float* data;
    int count;
  };

  void run_overlapped() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_worker_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping with nothing left
      const Sum sum = queue_.front();
      queue_.pop_front();
      busy_ = true;
      lock.unlock();
      const int code =
          MPI_Allreduce(MPI_IN_PLACE, sum.data, sum.count, MPI_FLOAT, MPI_SUM, overlap_comm_);
      lock.lock();
      busy_ = false;
      if (code != MPI_SUCCESS && error_.empty()) error_ = "overlapped MPI_Allreduce failed";
      if (queue_.empty()) drained_.notify_all();
    }
  }

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<MPI_Request> pending_;  // non-blocking fallback

  MPI_Comm overlap_comm_ = MPI_COMM_NULL;
  std::thread worker_;
  std::mutex mutex_;
  std::condition_variable wake_worker_, drained_;
  std::deque<Sum> queue_;
  bool busy_ = false;
  bool stopping_ = false;
  std::string error_;
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator(uintptr_t handle) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw std::runtime_error("MPI is not initialised: import mpi4py.MPI first");
  return std::make_shared<MpiCommunicator>(reinterpret_cast<MPI_Comm>(handle));
}

}  // namespace ftengine
