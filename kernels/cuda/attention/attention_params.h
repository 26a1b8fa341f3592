// The FastAttention CUDA family's one params struct, filled once by the caller (the CUDA backend,
// or the op-test bindings) and read by every member: sm80 prefill, split-KV decode, and the
// Hopper / Turing / Volta members that slot in behind the same dispatch.
//
// Pointers are device pointers. Strides are in elements, not bytes. The layouts match the CPU
// member (kernels/cpu/attention.h) so a cache block means the same thing on every backend.
#pragma once

#include <cstdint>

namespace ftengine::kernels::cuda {

enum class ElementType : int { kFloat16, kBFloat16 };

struct AttentionParams {
  ElementType dtype = ElementType::kBFloat16;  // of q, out, k_cache and v_cache

  // Queries of every sequence, packed token-major: q[token][head][dim].
  const void* q = nullptr;
  int64_t q_token_stride = 0;  // elements between consecutive tokens
  int64_t q_head_stride = 0;   // elements between consecutive heads of one token

  // Output with the layout of q: out[token][head][dim]; never aliases q.
  void* out = nullptr;
  int64_t out_token_stride = 0;
  int64_t out_head_stride = 0;

  // Natural-log log-sum-exp of the scaled scores, float32, lse[token * num_heads + head]; may be
  // null. A query that sees no key gets -inf and a zero output row.
  float* lse = nullptr;

  // Paged KV cache: k_cache[block][slot][kv_head][dim], same layout for v_cache. The last
  // dimension is contiguous.
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  int64_t kv_block_stride = 0;  // elements between consecutive blocks
  int64_t kv_token_stride = 0;  // elements between consecutive slots of a block
  int64_t kv_head_stride = 0;   // elements between consecutive KV heads
  int32_t block_size = 0;       // slots per block
  // Blocks in each cache: the extent of the Hopper member's TMA tensor maps (TMA checks its
  // boxes against it). 0 when the caller does not know; that member then refuses.
  int32_t kv_num_blocks = 0;

  // block_table[seq * block_table_stride + i] is the cache block holding tokens
  // [i * block_size, (i + 1) * block_size) of sequence seq.
  const int32_t* block_table = nullptr;
  int32_t block_table_stride = 0;

  // Sequence seq owns query tokens [cu_seqlens_q[seq], cu_seqlens_q[seq + 1]) and has
  // seqlens_kv[seq] tokens in the cache, this step's included: its queries are the last q_len
  // positions, so query i sits at position seqlens_kv[seq] - q_len + i. Both arrays live on the
  // device; the kernels read them there, so a captured CUDA graph replays with new lengths.
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1]
  const int32_t* seqlens_kv = nullptr;    // [batch]
  int32_t batch = 0;
  // Host-side upper bounds that size the grid (a CUDA graph captures them with its capacity):
  // every sequence's q_len <= max_seqlen_q and seqlens_kv <= max_seqlen_kv. Work past a
  // sequence's real lengths exits early.
  int32_t max_seqlen_q = 0;
  int32_t max_seqlen_kv = 0;

  int32_t num_heads = 0;  // query heads; a multiple of num_kv_heads (GQA / MQA)
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  float softmax_scale = 0.f;  // usually 1/sqrt(head_dim)
  bool causal = true;         // a query sees keys at positions <= its own
};

}  // namespace ftengine::kernels::cuda
