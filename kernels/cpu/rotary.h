// Rotary position embedding fused with the write of K and V into the paged cache: one pass over
// the fused QKV projection rotates q into its own buffer and k straight into its cache slot.
#pragma once

#include <cstdint>

namespace ftengine::kernels::cpu {

struct RotaryCacheWriteParams {
  // Fused projection qkv[token] = [q heads | k heads | v heads], each head head_dim wide.
  const float* qkv = nullptr;
  int64_t qkv_token_stride = 0;

  float* q_out = nullptr;  // [tokens][num_heads][head_dim], rotated queries

  // Paged cache k_cache[block][slot][kv_head][dim]; token t goes to flat slot
  // slot_mapping[t] = block * block_size + offset.
  float* k_cache = nullptr;
  float* v_cache = nullptr;
  int64_t kv_block_stride = 0;
  int64_t kv_token_stride = 0;
  int64_t kv_head_stride = 0;
  int32_t block_size = 0;
  const int32_t* slot_mapping = nullptr;

  const int32_t* positions = nullptr;  // [tokens]
  const float* inv_freq = nullptr;     // [rotary_dim / 2], scaling already applied
  int32_t rotary_dim = 0;              // leading dims of each head that rotate (= head_dim)
  // HF checkpoints rotate the two halves of a head (rotate_half); Meta's original checkpoints
  // rotate interleaved pairs (x[2i], x[2i+1]).
  bool interleaved = false;

  int64_t tokens = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
};

void rotary_cache_write(const RotaryCacheWriteParams& params);

}  // namespace ftengine::kernels::cpu
