// The one door to the BLAS library: MKL where the build found it (FTENGINE_WITH_MKL, see
// CMakeLists.txt), else OpenBLAS from the scipy-openblas32 wheel. Kernels call these wrappers
// instead of naming the library's symbols, so swapping the BLAS touches one file.
#pragma once

#include <cstdint>

#if defined(FTENGINE_WITH_MKL)
#include "mkl_cblas.h"
#else
#include "cblas.h"
#endif

namespace ftengine::kernels::cpu {
namespace blas {
// Both are 32-bit integer (LP64) interfaces with the reference CBLAS enums.
#if defined(FTENGINE_WITH_MKL)
using Int = MKL_INT;
// Whether sgemm copies its operands into packed panels once per call (OpenBLAS) rather than
// reading them in place (MKL's kernels for the attention's shapes): strided operands then cost
// one slow pass per call, not one per use.
constexpr bool packs_operands = false;
constexpr auto cblas_sgemm_entry = cblas_sgemm;
constexpr auto cblas_sgemv_entry = cblas_sgemv;
#else
using Int = blasint;
constexpr bool packs_operands = true;
constexpr auto cblas_sgemm_entry = scipy_cblas_sgemm;
constexpr auto cblas_sgemv_entry = scipy_cblas_sgemv;
#endif
}  // namespace blas

// Row-major C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C.
inline void sgemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
                  const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                  int64_t ldc) {
  blas::cblas_sgemm_entry(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                          transpose_b ? CblasTrans : CblasNoTrans, static_cast<blas::Int>(m),
                          static_cast<blas::Int>(n), static_cast<blas::Int>(k), alpha, a,
                          static_cast<blas::Int>(lda), b, static_cast<blas::Int>(ldb), beta, c,
                          static_cast<blas::Int>(ldc));
}

// Row-major y[M] = alpha * A[M,N] · x[N] + beta * y (A transposed when transpose_a).
inline void sgemv(bool transpose_a, int64_t m, int64_t n, float alpha, const float* a, int64_t lda,
                  const float* x, float beta, float* y) {
  blas::cblas_sgemv_entry(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
                          static_cast<blas::Int>(m), static_cast<blas::Int>(n), alpha, a,
                          static_cast<blas::Int>(lda), x, 1, beta, y, 1);
}

// The BLAS runs single-threaded for the whole process; callers split big products across their
// own OpenMP threads. The wheel's OpenBLAS is built on pthreads: a second thread pool next to
// OpenMP's spins on the cores the other needs, and switching its thread count around each
// parallel region costs milliseconds (measured: decode of a small model on 2 cores went from
// 1270 to 118 tokens/s). MKL is linked with its sequential layer, which has no threads to set.
inline void use_single_threaded_blas() {
#if !defined(FTENGINE_WITH_MKL)
  scipy_openblas_set_num_threads(1);
#endif
}

}  // namespace ftengine::kernels::cpu
