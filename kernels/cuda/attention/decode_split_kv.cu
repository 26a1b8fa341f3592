// Host side of the split-KV decode member: what it supports, how many splits, its workspace, and
// the launch (kernels and per-instance dispatch in decode_split_kv_kernel.cuh).
#include "kernels/cuda/attention/decode_split_kv.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/attention/decode_split_kv_launch.cuh"

namespace ftengine::kernels::cuda {
namespace {

using decode_detail::kMaxGroup;
using decode_detail::kMaxHeadDim;
using decode_detail::kMaxSplits;

// A split shorter than this spends more on its prologue (the first loads' latency, the query,
// the partial row) than on streaming: 2 chunks of 64 tokens.
constexpr int kMinTokensPerSplit = 128;

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

}  // namespace

std::string decode_split_kv_unsupported_reason(const AttentionParams& p) {
  if (p.dtype != ElementType::kFloat16 && p.dtype != ElementType::kBFloat16) {
    return "decode_split_kv supports float16 and bfloat16 only";
  }
  if (p.batch < 0) return "batch must be >= 0, got " + std::to_string(p.batch);
  if (p.batch > 65535) return "decode_split_kv supports batch <= 65535 (grid z)";
  if (p.max_seqlen_q < 0 || p.max_seqlen_kv < 0) {
    return "max_seqlen_q and max_seqlen_kv must be >= 0";
  }
  if (p.max_seqlen_q > 1) {
    return "decode_split_kv runs one query token per sequence (max_seqlen_q <= 1), got "
           "max_seqlen_q " +
           std::to_string(p.max_seqlen_q);
  }
  if (p.num_heads <= 0 || p.num_kv_heads <= 0) {
    return "num_heads and num_kv_heads must be positive, got " + std::to_string(p.num_heads) +
           " and " + std::to_string(p.num_kv_heads);
  }
  if (p.num_kv_heads > 65535) return "decode_split_kv supports num_kv_heads <= 65535 (grid y)";
  if (p.num_heads % p.num_kv_heads != 0) {
    return "num_heads (" + std::to_string(p.num_heads) + ") must be a multiple of num_kv_heads (" +
           std::to_string(p.num_kv_heads) + ")";
  }
  if (p.num_heads / p.num_kv_heads > kMaxGroup) {
    return "decode_split_kv packs at most " + std::to_string(kMaxGroup) +
           " query heads per KV head, got " + std::to_string(p.num_heads / p.num_kv_heads);
  }
  if (p.head_dim <= 0 || p.head_dim % 8 != 0 || p.head_dim > kMaxHeadDim) {
    return "decode_split_kv needs head_dim a multiple of 8 in [8, " + std::to_string(kMaxHeadDim) +
           "], got " + std::to_string(p.head_dim);
  }
  if (p.block_size <= 0) return "block_size must be positive, got " + std::to_string(p.block_size);
  if (p.block_table_stride < 0) return "block_table_stride must be >= 0";
  if (!std::isfinite(p.softmax_scale)) return "softmax_scale must be finite";
  if (p.batch == 0 || p.max_seqlen_q == 0) return "";
  if (p.q == nullptr || p.out == nullptr || p.k_cache == nullptr || p.v_cache == nullptr ||
      p.block_table == nullptr || p.cu_seqlens_q == nullptr || p.seqlens_kv == nullptr) {
    return "q, out, k_cache, v_cache, block_table, cu_seqlens_q and seqlens_kv must be set";
  }
  // Every row is moved in 16-byte vectors.
  if (!aligned16(p.q) || !aligned16(p.out) || !aligned16(p.k_cache) || !aligned16(p.v_cache)) {
    return "decode_split_kv needs q, out, k_cache and v_cache aligned to 16 bytes";
  }
  const int64_t strides[] = {p.q_token_stride,   p.q_head_stride,   p.out_token_stride,
                             p.out_head_stride,  p.kv_block_stride, p.kv_token_stride,
                             p.kv_head_stride};
  for (const int64_t stride : strides) {
    if (stride < 0 || stride % 8 != 0) {
      return "decode_split_kv needs every q, out and KV stride to be a non-negative multiple of "
             "8 elements (16 bytes)";
    }
  }
  return "";
}

// At most one CTA per SM. Measured on the H100 (132 SMs; bf16, head_dim 128, 32 query heads, 8 or
// 32 KV heads, tensor-core kernel, every split count swept): one CTA per SM streamed the most at
// every point, e.g. 2.89 TB/s for one 131072-token sequence with 32 KV heads (4 splits), 2.85 with
// 4 CTAs per SM and 2.65 with a ragged 2.9 per SM; with 8 KV heads 2.71 (16 splits) against 2.46
// at 4 per SM. A second resident CTA adds no bandwidth (each SM streams its share of DRAM either
// way), a ragged last wave idles SMs, and every split adds a partial row to merge. So: as many
// splits as keep batch * num_kv_heads * splits <= num_sms, none once the batch alone fills them.
int decode_num_splits(const AttentionParams& p, int num_sms) {
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.num_kv_heads;
  if (ctas <= 0 || p.max_seqlen_kv <= 0) return 1;
  const int64_t max_splits = std::min<int64_t>(
      kMaxSplits, (static_cast<int64_t>(p.max_seqlen_kv) + kMinTokensPerSplit - 1) /
                      kMinTokensPerSplit);
  const int64_t fill = std::max<int64_t>(1, std::max(num_sms, 1) / ctas);
  return static_cast<int>(std::max<int64_t>(1, std::min(fill, max_splits)));
}

size_t decode_split_kv_workspace_bytes(const AttentionParams& params, int num_sms) {
  return decode_detail::decode_workspace_bytes(params, decode_num_splits(params, num_sms));
}

void run_decode_split_kv(const AttentionParams& params, int num_sms, void* workspace,
                         cudaStream_t stream) {
  decode_detail::run_decode_with_splits(params, decode_num_splits(params, num_sms), workspace,
                                        stream);
}

namespace decode_detail {

size_t decode_workspace_bytes(const AttentionParams& p, int num_splits) {
  if (num_splits <= 1 || p.batch <= 0 || p.max_seqlen_q <= 0) return 0;
  const size_t rows = static_cast<size_t>(p.batch) * p.num_heads * num_splits;
  const size_t out_bytes = rows * p.head_dim * sizeof(float);  // a multiple of 32 bytes
  return out_bytes + rows * sizeof(float);
}

DecodeArgs make_decode_args(const AttentionParams& params, int num_splits, void* workspace) {
  if (num_splits < 1 || num_splits > kMaxSplits) {
    throw std::invalid_argument("decode_split_kv: num_splits must be in [1, " +
                                std::to_string(kMaxSplits) + "], got " +
                                std::to_string(num_splits));
  }
  DecodeArgs args;
  args.params = params;
  args.num_splits = num_splits;
  args.scale_log2 = params.softmax_scale * kLog2e;
  args.block_size = FastDivmod(static_cast<uint32_t>(params.block_size));
  args.blocks_hold_sub_chunks = params.block_size % kMmaSubChunk == 0;
  if (num_splits > 1) {
    if (workspace == nullptr) {
      throw std::invalid_argument("decode_split_kv: " + std::to_string(num_splits) +
                                  " splits need a workspace");
    }
    const size_t rows = static_cast<size_t>(params.batch) * params.num_heads * num_splits;
    args.partial_out = static_cast<float*>(workspace);
    args.partial_lse = args.partial_out + rows * params.head_dim;
  }
  return args;
}

void run_decode_with_splits(const AttentionParams& params, int num_splits, void* workspace,
                            cudaStream_t stream, bool allow_tensor_cores) {
  if (params.batch == 0 || params.max_seqlen_q == 0) return;
  const DecodeArgs args = make_decode_args(params, num_splits, workspace);
  if (params.dtype == ElementType::kFloat16) {
    launch_decode_for_dtype<__half>(args, allow_tensor_cores, stream);
  } else {
    launch_decode_for_dtype<__nv_bfloat16>(args, allow_tensor_cores, stream);
  }
}

}  // namespace decode_detail
}  // namespace ftengine::kernels::cuda
