// The one door to the BLAS library (OpenBLAS from the scipy-openblas32 wheel). Kernels call these
// wrappers instead of naming the prefixed symbols, so swapping the BLAS touches one file.
#pragma once

#include <cstdint>

#include "cblas.h"

namespace ftengine::kernels::cpu {

// Row-major C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C.
inline void sgemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
                  const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                  int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                    transpose_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
                    static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
                    static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
                    static_cast<blasint>(ldc));
}

// Sets how many threads OpenBLAS uses, restoring the previous count on scope exit. Kernels that
// run on every core through OpenMP construct one (with 1) before their parallel region and call
// BLAS from each worker: the wheel's OpenBLAS is built on pthreads with no per-thread setting,
// and its own threads would otherwise oversubscribe the cores the OpenMP workers already hold.
class BlasThreadsScope {
 public:
  explicit BlasThreadsScope(int threads) : previous_(scipy_openblas_get_num_threads()) {
    scipy_openblas_set_num_threads(threads);
  }
  ~BlasThreadsScope() { scipy_openblas_set_num_threads(previous_); }
  BlasThreadsScope(const BlasThreadsScope&) = delete;
  BlasThreadsScope& operator=(const BlasThreadsScope&) = delete;

 private:
  int previous_;
};

}  // namespace ftengine::kernels::cpu
