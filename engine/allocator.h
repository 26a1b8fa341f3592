// Allocators hand out raw device memory; tensors own it through a shared buffer. The CPU one
// aligns to 64 bytes so SIMD loads and BLAS panels never straddle cache lines.
#pragma once

#include <cstddef>
#include <memory>

namespace ftengine {

enum class Device : int { kCpu, kCuda };

class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual Device device() const = 0;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* pointer, size_t bytes) = 0;
};

class CpuAllocator final : public Allocator {
 public:
  static constexpr size_t kAlignment = 64;
  Device device() const override { return Device::kCpu; }
  void* allocate(size_t bytes) override;
  void deallocate(void* pointer, size_t bytes) override;
};

// The process-wide CPU allocator: stateless, so sharing it hides no state.
Allocator& cpu_allocator();

}  // namespace ftengine
