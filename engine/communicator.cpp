#include "engine/communicator.h"

#include <cstring>

namespace ftengine {

namespace {

// One process: every collective is the identity.
class SingleRankCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  bool serves(Device) const override { return true; }
  void allreduce_sum(void*, int64_t, DType) override {}
  void start_allreduce_sum(void*, int64_t, DType) override {}
  void progress() override {}
  void wait_all() override {}
  void allgather(const void* data, int64_t count, DType dtype, void* out) override {
    // Host memory only: the models call allgather with several ranks alone.
    std::memcpy(out, data, static_cast<size_t>(count) * dtype_size(dtype));
  }
  void allreduce_sum_host(float*, int64_t) override {}
};

}  // namespace

std::shared_ptr<Communicator> make_single_rank_communicator() {
  return std::make_shared<SingleRankCommunicator>();
}

}  // namespace ftengine
