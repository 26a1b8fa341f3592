// Row-wise CUDA kernels of the decoder: norms (with the residual add fused), activations,
// gathers, the rotary embedding fused into the KV-cache write, conversions. Device pointers in,
// results out; every launcher takes a stream and checks the launch.
//
// Activations are float16 or bfloat16; every reduction (norm statistics, rotary angles)
// accumulates in float32. Norm weights and biases stay float32 (DESIGN.md, Precision).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ftengine::kernels::cuda {

enum class DataType : int { kFloat32, kFloat16, kBFloat16 };

// dst[i] = src[i] converted (any pair of the three types).
void convert(const void* src, DataType src_type, void* dst, DataType dst_type, int64_t count,
             cudaStream_t stream);

// out[r] = table[ids[r] - first_id] when that row is one of the table's table_rows, else zeros
// (a vocabulary-parallel shard). ids live on the device.
void embedding(const void* table, int64_t table_rows, int64_t first_id, const int32_t* ids,
               int64_t rows, int64_t cols, DataType type, void* out, cudaStream_t stream);

// If residual is non-null, x += residual first (in place). Then out = rmsnorm(x) * weight.
void add_rmsnorm(void* x, const void* residual, const float* weight, int64_t rows, int64_t cols,
                 float eps, DataType type, void* out, cudaStream_t stream);

// out = (x - mean) / sqrt(var + eps) * weight + bias.
void layernorm(const void* x, const float* weight, const float* bias, int64_t rows, int64_t cols,
               float eps, DataType type, void* out, cudaStream_t stream);

// x = gelu(x), exact erf form.
void gelu_inplace(void* x, int64_t count, DataType type, cudaStream_t stream);

// out[r] = silu(gate_up[r][:cols]) * gate_up[r][cols:].
void silu_mul(const void* gate_up, int64_t rows, int64_t cols, DataType type, void* out,
              cudaStream_t stream);

// x[i] += y[i].
void add_inplace(void* x, const void* y, int64_t count, DataType type, cudaStream_t stream);

// x[r] += bias (float32) for every row.
void add_bias(void* x, const float* bias, int64_t rows, int64_t cols, DataType type,
              cudaStream_t stream);

// dst[r][column + c] = src[r][c], dst rows dst_cols wide.
void copy_columns(const void* src, int64_t rows, int64_t src_cols, void* dst, int64_t dst_cols,
                  int64_t column, DataType type, cudaStream_t stream);

// out[i] = x[rows[i]]; rows on the device.
void gather_rows(const void* x, const int32_t* rows, int64_t count, int64_t cols, DataType type,
                 void* out, cudaStream_t stream);

// Folds a second attention partial into the first, by log-sum-exp (the tiers of CPU-GPU
// cooperative attention): for part row r, token t = tokens ? tokens[r] : first_token + r,
//   out[t] = (e^lse[t]·out[t] + e^part_lse[r]·part_out[r]) / (e^lse[t] + e^part_lse[r])
// per head, and lse[t] becomes the log of the denominator. out is [tokens][heads][head_dim] of
// `type`; part_out is [rows][heads][head_dim] of part_type; lse and part_lse are float32
// [.][heads] (-inf: that part saw no key). Device pointers.
void merge_attention_part(void* out, float* lse, DataType type, const void* part_out,
                          const float* part_lse, DataType part_type, const int32_t* tokens,
                          int64_t first_token, int64_t rows, int32_t heads, int32_t head_dim,
                          cudaStream_t stream);

struct RotaryCacheWriteParams {
  DataType type = DataType::kBFloat16;  // of qkv, q_out and the cache
  const void* qkv = nullptr;   // [tokens][(num_heads + 2 num_kv_heads) head_dim]
  int64_t qkv_token_stride = 0;
  int64_t tokens = 0;
  const int32_t* positions = nullptr;     // [tokens], device
  const int32_t* slot_mapping = nullptr;  // [tokens], device; slot = block * block_size + offset
  const float* inv_freq = nullptr;        // [rotary_dim / 2], device
  int32_t rotary_dim = 0;
  bool interleaved = false;  // Meta-checkpoint pairs instead of HF's rotate_half
  int32_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  void* q_out = nullptr;  // [tokens][num_heads][head_dim]
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int64_t kv_block_stride = 0, kv_token_stride = 0, kv_head_stride = 0;
  int32_t block_size = 0;
  // The host tier of the cache (pinned, mapped host memory the kernel writes over the bus):
  // blocks from host_first_block on live there, at block - host_first_block. Null: no tier.
  void* k_cache_host = nullptr;
  void* v_cache_host = nullptr;
  int32_t host_first_block = 0;
};

// Rotates q into q_out and k into its cache slot, copies v into its slot.
void rotary_cache_write(const RotaryCacheWriteParams& params, cudaStream_t stream);

}  // namespace ftengine::kernels::cuda
