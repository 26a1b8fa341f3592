#include "engine/mpi/mpi_communicator.h"

#include <mpi.h>

#include <limits>
#include <stdexcept>
#include <string>
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

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  ~MpiCommunicator() override {
    // A pending request must not outlive the buffers it writes to.
    if (!pending_.empty()) {
      MPI_Waitall(static_cast<int>(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE);
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void allreduce_sum(float* data, int64_t count) override {
    check(MPI_Allreduce(MPI_IN_PLACE, data, mpi_count(count), MPI_FLOAT, MPI_SUM, comm_),
          "MPI_Allreduce");
  }

  void start_allreduce_sum(float* data, int64_t count) override {
    MPI_Request request;
    check(MPI_Iallreduce(MPI_IN_PLACE, data, mpi_count(count), MPI_FLOAT, MPI_SUM, comm_,
                         &request),
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
    if (pending_.empty()) return;
    check(MPI_Waitall(static_cast<int>(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE),
          "MPI_Waitall");
    pending_.clear();
  }

  void allgather(const float* data, int64_t count, float* out) override {
    check(MPI_Allgather(data, mpi_count(count), MPI_FLOAT, out, mpi_count(count), MPI_FLOAT,
                        comm_),
          "MPI_Allgather");
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::vector<MPI_Request> pending_;
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator(uintptr_t handle) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw std::runtime_error("MPI is not initialised: import mpi4py.MPI first");
  return std::make_shared<MpiCommunicator>(reinterpret_cast<MPI_Comm>(handle));
}

}  // namespace ftengine
