// CPU attention over a 16-bit paged KV cache: the host tier of CPU-GPU cooperative attention
// (FastAttention §3.4). A GPU engine keeps its cache in bfloat16 or float16; the blocks its
// memory cannot hold live in pinned host memory in the same format, and the CPU attends over
// them while the GPU attends over the rest (engine/cuda/cooperative_attention.h merges them).
//
// Its queries are few (decode steps, short chunks), so the work is one read of K and V, and
// the plan differs from the float32 member's (kernels/cpu/attention.h, matrix products over
// float32 copies): each sequence's keys are split across the threads, each split reads the
// K/V rows of several adjacent heads at once (sequential memory, which the prefetchers
// follow), widens them to float32 in L2-sized chunks next to an online softmax over those
// heads' queries, and the splits are merged by log-sum-exp.
#pragma once

#include <cstdint>
#include <string>

namespace ftengine::kernels::cpu {

enum class Kv16Type { kBFloat16, kFloat16 };

// Query heads one KV head may serve (a work item holds one token's whole query group).
constexpr int32_t kKv16MaxQueryGroup = 32;

struct Kv16AttentionParams {
  // Queries and output packed [token][head][dim], float32; lse[token * num_heads + head]
  // (natural log; -inf and a zero row for a query that sees no key).
  const float* q = nullptr;
  float* out = nullptr;
  float* lse = nullptr;

  // Paged cache k_cache[block][slot][kv_head][dim] of 16-bit floats, same layout for v_cache.
  const uint16_t* k_cache = nullptr;
  const uint16_t* v_cache = nullptr;
  Kv16Type kv_type = Kv16Type::kBFloat16;
  int64_t kv_block_stride = 0;
  int64_t kv_token_stride = 0;
  int64_t kv_head_stride = 0;  // must be head_dim: a token's heads are adjacent
  int32_t block_size = 0;
  const int32_t* block_table = nullptr;  // [batch][block_table_stride]
  int32_t block_table_stride = 0;

  // As kernels/cpu/attention.h: sequence seq owns query tokens [cu_seqlens_q[seq],
  // cu_seqlens_q[seq + 1]), the last positions of its seqlens_kv[seq] cached tokens.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* seqlens_kv = nullptr;
  int32_t batch = 0;

  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  float softmax_scale = 0.f;
  bool causal = true;
  int num_threads = 0;  // 0: the OpenMP default
};

// Empty when the kernel can run these params; otherwise why not.
std::string kv16_attention_unsupported_reason(const Kv16AttentionParams& params);

// Runs the kernel; throws std::invalid_argument with the reason otherwise.
void kv16_attention(const Kv16AttentionParams& params);

}  // namespace ftengine::kernels::cpu
