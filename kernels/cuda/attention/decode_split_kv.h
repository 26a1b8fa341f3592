// Split-KV decode (flash-decoding style) over the paged cache: one query token per sequence; the
// query heads that share a KV head are packed into one CTA so each K/V byte is read once; long
// contexts are split across CTAs and the partial outputs merged by log-sum-exp.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "kernels/cuda/attention/attention_params.h"

namespace ftengine::kernels::cuda {

// Empty when this member can run the params (every sequence has q_len <= 1).
std::string decode_split_kv_unsupported_reason(const AttentionParams& params);

// How many KV splits per (sequence, KV head) the launch uses. Depends only on host-side values
// (batch, num_kv_heads, max_seqlen_kv, the SM count), so a captured graph keeps it; splits past a
// sequence's real length write an empty partial (lse = -inf) that the merge ignores.
int decode_num_splits(const AttentionParams& params, int num_sms);

// Device scratch for the partial outputs and their log-sum-exps.
size_t decode_split_kv_workspace_bytes(const AttentionParams& params, int num_sms);

// Launches on `stream`; the caller has checked decode_split_kv_unsupported_reason().
void run_decode_split_kv(const AttentionParams& params, int num_sms, void* workspace,
                         cudaStream_t stream);

}  // namespace ftengine::kernels::cuda
