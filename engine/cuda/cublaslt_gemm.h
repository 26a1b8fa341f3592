// Matrix products through cuBLASLt: out[M, N] = x[M, K] · weight[N, K]ᵀ, half-precision inputs,
// float32 accumulation, half-precision or float32 output (logits). Plans (descriptors and the
// heuristic's algorithm) are cached per shape, so a decode step does no cuBLASLt setup.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "engine/dtype.h"

namespace ftengine::cuda {

class CublasLtGemm {
 public:
  explicit CublasLtGemm(void* workspace, size_t workspace_bytes);
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  void linear(const void* x, const void* weight, void* out, int64_t m, int64_t n, int64_t k,
              DType input, DType output, cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t operation = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algorithm{};
    bool has_algorithm = false;
  };
  using Key = std::tuple<int64_t, int64_t, int64_t, int, int>;
  Plan& plan(const Key& key);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_;
  size_t workspace_bytes_;
  std::map<Key, Plan> plans_;
};

}  // namespace ftengine::cuda
