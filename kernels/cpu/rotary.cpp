#include "kernels/cpu/rotary.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace ftengine::kernels::cpu {

namespace {

void rotate_head(const float* in, const float* cos, const float* sin, int32_t rotary_dim,
                 int32_t head_dim, bool interleaved, float* out) {
  const int32_t half = rotary_dim / 2;
  if (interleaved) {
    for (int32_t i = 0; i < half; ++i) {
      const float even = in[2 * i], odd = in[2 * i + 1];
      out[2 * i] = even * cos[i] - odd * sin[i];
      out[2 * i + 1] = odd * cos[i] + even * sin[i];
    }
  } else {
#pragma omp simd
    for (int32_t i = 0; i < half; ++i) {
      const float first = in[i], second = in[i + half];
      out[i] = first * cos[i] - second * sin[i];
      out[i + half] = second * cos[i] + first * sin[i];
    }
  }
  for (int32_t i = rotary_dim; i < head_dim; ++i) out[i] = in[i];
}

}  // namespace

void rotary_cache_write(const RotaryCacheWriteParams& p) {
  const int32_t half = p.rotary_dim / 2;
  // cos and sin of one token per thread, allocated before the parallel region.
  const int threads = omp_get_max_threads();
  std::vector<float> tables(static_cast<size_t>(2 * half) * threads);
  // One decode token's heads are too little work to wake the thread team for.
#pragma omp parallel if (p.tokens > 1)
  {
    float* cos = tables.data() + static_cast<size_t>(2 * half) * omp_get_thread_num();
    float* sin = cos + half;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < p.tokens; ++t) {
      // float32 angles, as HF computes them, so long positions round the same way.
      const float position = static_cast<float>(p.positions[t]);
      for (int32_t i = 0; i < half; ++i) {
        const float angle = position * p.inv_freq[i];
        cos[i] = std::cos(angle);
        sin[i] = std::sin(angle);
      }
      const float* row = p.qkv + t * p.qkv_token_stride;
      for (int32_t h = 0; h < p.num_heads; ++h) {
        rotate_head(row + h * p.head_dim, cos, sin, p.rotary_dim, p.head_dim,
                    p.interleaved, p.q_out + (t * p.num_heads + h) * p.head_dim);
      }
      const int64_t slot = p.slot_mapping[t];
      const int64_t slot_offset =
          (slot / p.block_size) * p.kv_block_stride + (slot % p.block_size) * p.kv_token_stride;
      const float* k_row = row + static_cast<int64_t>(p.num_heads) * p.head_dim;
      const float* v_row = k_row + static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
      for (int32_t h = 0; h < p.num_kv_heads; ++h) {
        rotate_head(k_row + h * p.head_dim, cos, sin, p.rotary_dim, p.head_dim,
                    p.interleaved, p.k_cache + slot_offset + h * p.kv_head_stride);
        std::memcpy(p.v_cache + slot_offset + h * p.kv_head_stride, v_row + h * p.head_dim,
                    p.head_dim * sizeof(float));
      }
    }
  }
}

}  // namespace ftengine::kernels::cpu
