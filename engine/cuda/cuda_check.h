// Every CUDA runtime call is checked: a failure becomes an exception naming the call, never a
// silently wrong result. Runtime only, so code outside the backend (the NCCL communicator) can
// use it without cuBLAS.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ftengine::cuda {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
  }
}

}  // namespace ftengine::cuda
