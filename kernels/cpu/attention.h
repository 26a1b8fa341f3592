// CPU member of the FastAttention family: exact attention over a paged KV cache, for prefill
// (fresh or chunked, against an existing cache) and decode in one entry point.
//
// Two-level tiling (FastAttention, arXiv 2410.16663, adapted to a CPU): the outer level walks KV
// in blocks sized for the BLAS matrix products (Q·Kᵀ and P·V are sgemm calls); the inner level
// runs the online softmax over sub-blocks of a score row that fit the SIMD registers.
// Tiling-mask: each (query tile, KV block) pair is classified full / empty / partial from
// positions alone; only partial tiles get a mask, generated from indices. No S×S mask exists.
#pragma once

#include <cstdint>
#include <string>

namespace ftengine::kernels::cpu {

struct AttentionParams {
  // Queries of every sequence, packed token-major: q[token][head][dim], float32.
  const float* q = nullptr;
  int64_t q_token_stride = 0;  // elements between consecutive tokens
  int64_t q_head_stride = 0;   // elements between consecutive heads of one token

  // Output with the layout of q: out[token][head][dim].
  float* out = nullptr;
  int64_t out_token_stride = 0;
  int64_t out_head_stride = 0;

  // Natural-log log-sum-exp of the scaled scores, lse[token * num_heads + head]; may be null.
  // A query that sees no key gets -inf and a zero output row.
  float* lse = nullptr;

  // Paged KV cache: k_cache[block][slot][kv_head][dim], same layout for v_cache.
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  int64_t kv_block_stride = 0;  // elements between consecutive blocks
  int64_t kv_token_stride = 0;  // elements between consecutive slots of a block
  int64_t kv_head_stride = 0;   // elements between consecutive KV heads
  int32_t block_size = 0;       // slots per block

  // block_table[seq * block_table_stride + i] is the cache block holding tokens
  // [i * block_size, (i + 1) * block_size) of sequence seq.
  const int32_t* block_table = nullptr;
  int32_t block_table_stride = 0;

  // Sequence seq owns query tokens [cu_seqlens_q[seq], cu_seqlens_q[seq + 1]) and has
  // seqlens_kv[seq] tokens in the cache, this step's included: its queries are the last
  // q_len positions, so query i sits at position seqlens_kv[seq] - q_len + i (causal only:
  // without a mask every query sees every cached token and q_len may exceed seqlens_kv).
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1]
  const int32_t* seqlens_kv = nullptr;    // [batch]
  int32_t batch = 0;

  int32_t num_heads = 0;     // query heads; a multiple of num_kv_heads (GQA / MQA)
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  float softmax_scale = 0.f;  // usually 1/sqrt(head_dim)
  bool causal = true;         // a query sees keys at positions <= its own
  int num_threads = 0;        // OpenMP threads; 0 uses the OpenMP default
};

// Empty when the kernel can run these params; otherwise why not (the dispatch and the tests
// ask the same question, so they never disagree).
std::string attention_unsupported_reason(const AttentionParams& params);

// Runs the kernel; throws std::invalid_argument with attention_unsupported_reason() otherwise.
void attention(const AttentionParams& params);

}  // namespace ftengine::kernels::cpu
