#include "kernels/cpu/attention_merge.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace ftengine::kernels::cpu {

void merge_attention_partials(const float* const* partial_out, const float* const* partial_lse,
                              int parts, int64_t rows, int32_t head_dim, float* out, float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (parts < 1 || rows < 0 || head_dim < 1 || head_dim > kMaxMergeHeadDim) {
    throw std::invalid_argument("merge_attention_partials: need parts >= 1 and head_dim in [1, " +
                                std::to_string(kMaxMergeHeadDim) + "]");
  }
#pragma omp parallel for schedule(static) if (rows * head_dim > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    float max_lse = kNegInf;
    for (int p = 0; p < parts; ++p) max_lse = std::fmax(max_lse, partial_lse[p][r]);
    float* row = out + r * head_dim;
    if (max_lse == kNegInf) {
      for (int32_t d = 0; d < head_dim; ++d) row[d] = 0.f;
      lse[r] = kNegInf;
      continue;
    }
    // Weights relative to the largest part, so no exponent overflows. Computed before any
    // write: `out` may be the first partial's own buffer.
    float total = 0.f;
    for (int p = 0; p < parts; ++p) total += std::exp(partial_lse[p][r] - max_lse);
    float accumulated[kMaxMergeHeadDim];
    for (int32_t d = 0; d < head_dim; ++d) accumulated[d] = 0.f;
    for (int p = 0; p < parts; ++p) {
      const float weight = std::exp(partial_lse[p][r] - max_lse) / total;
      if (weight == 0.f) continue;
      const float* part = partial_out[p] + r * head_dim;
      for (int32_t d = 0; d < head_dim; ++d) accumulated[d] += weight * part[d];
    }
    for (int32_t d = 0; d < head_dim; ++d) row[d] = accumulated[d];
    lse[r] = max_lse + std::log(total);
  }
}

}  // namespace ftengine::kernels::cpu
