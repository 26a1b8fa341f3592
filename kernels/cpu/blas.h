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

// Row-major y[M] = alpha * A[M,N] · x[N] + beta * y (A transposed when transpose_a).
inline void sgemv(bool transpose_a, int64_t m, int64_t n, float alpha, const float* a, int64_t lda,
                  const float* x, float beta, float* y) {
  scipy_cblas_sgemv(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                    static_cast<blasint>(m), static_cast<blasint>(n), alpha, a,
                    static_cast<blasint>(lda), x, 1, beta, y, 1);
}

// OpenBLAS runs single-threaded for the whole process; callers split big products across
// their own OpenMP threads. The wheel's OpenBLAS is built on pthreads: a second thread pool
// next to OpenMP's spins on the cores the other needs, and switching its thread count around
// each parallel region costs milliseconds (measured: decode of a small model on 2 cores went
// from 1270 to 118 tokens/s).
inline void use_single_threaded_blas() { scipy_openblas_set_num_threads(1); }

}  // namespace ftengine::kernels::cpu
