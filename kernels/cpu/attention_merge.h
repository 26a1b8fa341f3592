// Merging attention computed over disjoint parts of each query's keys: the CPU-GPU cooperative
// path (FastAttention §3.4) attends over the KV blocks on the GPU and, on the CPU, over those in
// host memory, then combines the two by their log-sum-exps. Exact: with lse_i the log-sum-exp of
// the scaled scores of part i, softmax over the union weighs part i's normalised output by
// exp(lse_i - lse), lse = log(Σ exp(lse_i)).
#pragma once

#include <cstdint>

namespace ftengine::kernels::cpu {

constexpr int32_t kMaxMergeHeadDim = 512;

// out[r] = Σ_p exp(lse_p[r] - lse[r]) · out_p[r] over the `parts` partials, lse[r] = log Σ_p
// exp(lse_p[r]), for `rows` rows (token × head) of `head_dim` floats. A part with lse = -inf
// saw no key and contributes nothing; a row no part saw gets zeros and -inf, as the kernels
// write it. `out` may alias partial_out[0] (the merge then runs in place). Throws
// std::invalid_argument unless parts >= 1 and 1 <= head_dim <= kMaxMergeHeadDim.
void merge_attention_partials(const float* const* partial_out, const float* const* partial_lse,
                              int parts, int64_t rows, int32_t head_dim, float* out, float* lse);

}  // namespace ftengine::kernels::cpu
