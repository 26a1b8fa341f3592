#include "engine/cuda/cuda_allocator.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "engine/cuda/cuda_check.h"

namespace ftengine::cuda {

CachingDeviceAllocator::~CachingDeviceAllocator() {
  // Destructors never throw: a failing cudaFree at exit has nothing left to protect.
  for (auto& bucket : free_blocks_) {
    for (void* pointer : bucket.second) cudaFree(pointer);
  }
}

// Small blocks round to 512 bytes, large ones to 2 MiB, so activations of nearby sizes share
// cached blocks without wasting much.
size_t CachingDeviceAllocator::rounded(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = size_t{2} << 20;
  if (bytes == 0) bytes = 1;
  const size_t unit = bytes < kLarge ? kSmall : kLarge;
  return (bytes + unit - 1) / unit * unit;
}

void* CachingDeviceAllocator::allocate(size_t bytes) {
  const size_t size = rounded(bytes);
  {
    std::lock_guard<std::mutex> guard(mutex_);
    auto bucket = free_blocks_.find(size);
    if (bucket != free_blocks_.end() && !bucket->second.empty()) {
      void* pointer = bucket->second.back();
      bucket->second.pop_back();
      cached_bytes_ -= size;
      return pointer;
    }
  }
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  void* pointer = nullptr;
  cudaError_t status = cudaMalloc(&pointer, size);
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the sticky-free error before retrying
    release_cached();
    status = cudaMalloc(&pointer, size);
  }
  if (status != cudaSuccess && status != cudaErrorMemoryAllocation) {
    // Not a lack of memory: most often an earlier kernel's fault, reported by the next call.
    throw std::runtime_error(std::string("CUDA error while allocating memory: ") +
                             cudaGetErrorString(status));
  }
  if (status != cudaSuccess) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    throw std::runtime_error("CUDA out of memory: asked for " + std::to_string(size >> 20) +
                             " MiB with " + std::to_string(free_bytes >> 20) + " MiB free of " +
                             std::to_string(total_bytes >> 20) +
                             " MiB; use a smaller kv_cache_tokens or max_batch_tokens");
  }
  return pointer;
}

void CachingDeviceAllocator::deallocate(void* pointer, size_t bytes) {
  if (!pointer) return;
  std::lock_guard<std::mutex> guard(mutex_);
  const size_t size = rounded(bytes);
  free_blocks_[size].push_back(pointer);
  cached_bytes_ += size;
  ++free_count_;
}

void CachingDeviceAllocator::release_cached() {
  std::lock_guard<std::mutex> guard(mutex_);
  // Frees must not race kernels still using a block: wait for the device first.
  cudaDeviceSynchronize();
  for (auto& bucket : free_blocks_) {
    for (void* pointer : bucket.second) cudaFree(pointer);
  }
  free_blocks_.clear();
  cached_bytes_ = 0;
}

size_t CachingDeviceAllocator::cached_bytes() const {
  std::lock_guard<std::mutex> guard(mutex_);
  return cached_bytes_;
}

}  // namespace ftengine::cuda

namespace ftengine::cuda {

uint64_t CachingDeviceAllocator::free_count() const {
  std::lock_guard<std::mutex> guard(mutex_);
  return free_count_;
}

void* PinnedHostAllocator::allocate(size_t bytes) {
  void* pointer = nullptr;
  const cudaError_t status =
      cudaHostAlloc(&pointer, bytes > 0 ? bytes : 1, cudaHostAllocMapped | cudaHostAllocPortable);
  if (status != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("could not pin " + std::to_string(bytes >> 20) +
                             " MiB of host memory for the KV cache's host tier (" +
                             cudaGetErrorString(status) +
                             "); use a smaller kv_cache_tokens or a larger gpu_kv_budget");
  }
  void* device_pointer = nullptr;
  check_cuda(cudaHostGetDevicePointer(&device_pointer, pointer, 0), "cudaHostGetDevicePointer");
  if (device_pointer != pointer) {
    cudaFreeHost(pointer);
    throw std::runtime_error("the KV cache's host tier needs unified addressing (a 64-bit "
                             "process on a GPU that maps host memory at the same address)");
  }
  return pointer;
}

void PinnedHostAllocator::deallocate(void* pointer, size_t /*bytes*/) { cudaFreeHost(pointer); }

}  // namespace ftengine::cuda
