#include "engine/allocator.h"

#include <cstdlib>
#include <new>

namespace ftengine {

void* CpuAllocator::allocate(size_t bytes) {
  if (bytes == 0) return nullptr;
  size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* pointer = std::aligned_alloc(kAlignment, rounded);
  if (pointer == nullptr) throw std::bad_alloc();
  return pointer;
}

void CpuAllocator::deallocate(void* pointer, size_t /*bytes*/) { std::free(pointer); }

Allocator& cpu_allocator() {
  static CpuAllocator allocator;
  return allocator;
}

}  // namespace ftengine
