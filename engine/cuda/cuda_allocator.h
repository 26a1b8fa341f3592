// A caching device allocator: freed blocks go to per-size free lists and are handed out again
// without cudaMalloc / cudaFree, which synchronise the device and cost tens of microseconds.
// Every user of the memory runs on the backend's one stream, so a block freed on the host is
// safe to reuse by the next kernel on that stream (stream order does the rest).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "engine/allocator.h"

namespace ftengine::cuda {

class CachingDeviceAllocator final : public Allocator {
 public:
  explicit CachingDeviceAllocator(int device) : device_(device) {}
  ~CachingDeviceAllocator() override;
  Device device() const override { return Device::kCuda; }
  void* allocate(size_t bytes) override;
  void deallocate(void* pointer, size_t bytes) override;
  // Returns every cached block to the driver.
  void release_cached();
  size_t cached_bytes() const;
  // How many blocks were ever freed: a recorded CUDA graph holds raw addresses, which stay its
  // own only while no block was freed (and possibly handed to someone else) since recording.
  uint64_t free_count() const;

 private:
  static size_t rounded(size_t bytes);
  int device_;
  mutable std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_blocks_;  // by rounded size
  size_t cached_bytes_ = 0;
  uint64_t free_count_ = 0;
};

// Pinned host memory mapped into the GPU's address space (one address on both sides under
// unified addressing): the KV cache's host tier, which kernels write over the bus and the CPU
// reads in place, and copies to the GPU at full bus speed.
class PinnedHostAllocator final : public Allocator {
 public:
  Device device() const override { return Device::kCpu; }
  void* allocate(size_t bytes) override;
  void deallocate(void* pointer, size_t bytes) override;
};

}  // namespace ftengine::cuda
