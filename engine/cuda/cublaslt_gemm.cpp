#include "engine/cuda/cublaslt_gemm.h"

#include <stdexcept>
#include <string>

namespace ftengine::cuda {
namespace {

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(what) + " failed: cuBLAS status " +
                             std::to_string(static_cast<int>(status)));
  }
}

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return CUDA_R_32F;
    case DType::kFloat16:
      return CUDA_R_16F;
    case DType::kBFloat16:
      return CUDA_R_16BF;
    case DType::kInt32:
      break;
  }
  throw std::invalid_argument("cuBLASLt: unsupported dtype " + dtype_name(dtype));
}

}  // namespace

CublasLtGemm::CublasLtGemm(void* workspace, size_t workspace_bytes)
    : workspace_(workspace), workspace_bytes_(workspace_bytes) {
  check_cublas(cublasLtCreate(&handle_), "cublasLtCreate");
}

CublasLtGemm::~CublasLtGemm() {
  for (auto& entry : plans_) {
    Plan& p = entry.second;
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.d);
    cublasLtMatmulDescDestroy(p.operation);
  }
  cublasLtDestroy(handle_);
}

// Row-major out[M, N] = x[M, K] · W[N, K]ᵀ is, in cuBLAS's column-major terms,
// outᵀ[N, M] = W[K, N]ᵀ · xᵀ[K, M]: A = W transposed (lda K), B = x (ldb K), D ld N.
CublasLtGemm::Plan& CublasLtGemm::plan(const Key& key) {
  auto found = plans_.find(key);
  if (found != plans_.end()) return found->second;
  const auto [m, n, k, input_code, output_code] = key;
  const cudaDataType_t input = cuda_type(static_cast<DType>(input_code));
  const cudaDataType_t output = cuda_type(static_cast<DType>(output_code));
  Plan p;
  check_cublas(cublasLtMatmulDescCreate(&p.operation, CUBLAS_COMPUTE_32F, CUDA_R_32F),
               "cublasLtMatmulDescCreate");
  const cublasOperation_t transpose = CUBLAS_OP_T, keep = CUBLAS_OP_N;
  check_cublas(cublasLtMatmulDescSetAttribute(p.operation, CUBLASLT_MATMUL_DESC_TRANSA,
                                              &transpose, sizeof(transpose)),
               "cublasLtMatmulDescSetAttribute(TRANSA)");
  check_cublas(cublasLtMatmulDescSetAttribute(p.operation, CUBLASLT_MATMUL_DESC_TRANSB, &keep,
                                              sizeof(keep)),
               "cublasLtMatmulDescSetAttribute(TRANSB)");
  check_cublas(cublasLtMatrixLayoutCreate(&p.a, input, k, n, k), "cublasLtMatrixLayoutCreate(A)");
  check_cublas(cublasLtMatrixLayoutCreate(&p.b, input, k, m, k), "cublasLtMatrixLayoutCreate(B)");
  check_cublas(cublasLtMatrixLayoutCreate(&p.d, output, n, m, n), "cublasLtMatrixLayoutCreate(D)");

  cublasLtMatmulPreference_t preference = nullptr;
  check_cublas(cublasLtMatmulPreferenceCreate(&preference), "cublasLtMatmulPreferenceCreate");
  check_cublas(cublasLtMatmulPreferenceSetAttribute(
                   preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_,
                   sizeof(workspace_bytes_)),
               "cublasLtMatmulPreferenceSetAttribute");
  // The heuristic's first choice, not the fastest of its candidates by timing: timing them
  // (tried: 8 candidates for products of <= 64 rows) gained nothing on the H100's decode
  // (docs/PERFORMANCE.md) and would make results depend on which engine timed what.
  cublasLtMatmulHeuristicResult_t result{};
  int found_count = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle_, p.operation, p.a, p.b, p.d, p.d, preference, 1, &result, &found_count);
  cublasLtMatmulPreferenceDestroy(preference);
  if (status == CUBLAS_STATUS_SUCCESS && found_count > 0) {
    p.algorithm = result.algo;
    p.has_algorithm = true;
  }
  return plans_.emplace(key, p).first->second;
}

void CublasLtGemm::linear(const void* x, const void* weight, void* out, int64_t m, int64_t n,
                          int64_t k, DType input, DType output, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  Plan& p = plan({m, n, k, static_cast<int>(input), static_cast<int>(output)});
  const float alpha = 1.f, beta = 0.f;
  check_cublas(cublasLtMatmul(handle_, p.operation, &alpha, weight, p.a, x, p.b, &beta, out, p.d,
                              out, p.d, p.has_algorithm ? &p.algorithm : nullptr, workspace_,
                              workspace_bytes_, stream),
               "cublasLtMatmul");
}

}  // namespace ftengine::cuda
