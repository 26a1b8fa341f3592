// The sm80 member's "can it run?" and "run it": one switch over (element type, head_dim) onto the
// instances that prefill_sm80_generate_instances.py writes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/attention/prefill_sm80.h"
#include "kernels/cuda/attention/prefill_sm80_traits.h"

namespace ftengine::kernels::cuda {

// Defined in prefill_sm80_launch.h and instantiated once per (element, head_dim) in the
// prefill_sm80_hdim*_*.cu files; only the declaration is seen here, so no kernel compiles twice.
template <typename Element, int kHeadDim>
void run_prefill_sm80_instance(const AttentionParams& params, cudaStream_t stream);

namespace {

// Every instance tiles KV alike; the cache block size must hold whole tiles.
constexpr int kKvTileTokens = PrefillSm80Traits<__half, 128>::kBlockN;
constexpr int kQueryTileRows = PrefillSm80Traits<__half, 128>::kBlockM;
static_assert(PrefillSm80Traits<__nv_bfloat16, 64>::kBlockN == kKvTileTokens);

bool aligned_16_bytes(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

}  // namespace

std::string prefill_sm80_unsupported_reason(const AttentionParams& p) {
  if (p.dtype != ElementType::kFloat16 && p.dtype != ElementType::kBFloat16) {
    return "prefill_sm80 supports float16 and bfloat16 only";
  }
  if (p.head_dim != 64 && p.head_dim != 128) {
    return "prefill_sm80 supports head_dim 64 and 128, not " + std::to_string(p.head_dim);
  }
  if (p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return "num_heads must be a positive multiple of num_kv_heads";
  }
  if (p.block_size <= 0 || p.block_size % kKvTileTokens != 0) {
    return "prefill_sm80 needs block_size to be a multiple of " + std::to_string(kKvTileTokens) +
           " (its KV tile), not " + std::to_string(p.block_size);
  }
  if (!(p.softmax_scale > 0.f) || !std::isfinite(p.softmax_scale)) {
    // The running max is kept on unscaled scores, which is right only for a positive scale.
    return "prefill_sm80 needs a positive, finite softmax_scale";
  }
  // Rows move in 16-byte cp.async / vector chunks.
  if (!aligned_16_bytes(p.q) || !aligned_16_bytes(p.out) || !aligned_16_bytes(p.k_cache) ||
      !aligned_16_bytes(p.v_cache)) {
    return "prefill_sm80 needs q, out, k_cache and v_cache aligned to 16 bytes";
  }
  for (const int64_t stride :
       {p.q_token_stride, p.q_head_stride, p.out_token_stride, p.out_head_stride, p.kv_block_stride,
        p.kv_token_stride, p.kv_head_stride}) {
    if (stride % 8 != 0) return "prefill_sm80 needs every stride to be a multiple of 8 elements";
  }
  // A tile's rows are addressed with 32-bit offsets inside its cache block.
  if (static_cast<int64_t>(p.block_size) * p.kv_token_stride > INT32_MAX) {
    return "prefill_sm80 needs block_size * kv_token_stride < 2^31";
  }
  // Grid x is the query tile (< 2^31), y the KV head and z the sequence (<= 65535 each).
  const int64_t query_tiles =
      (static_cast<int64_t>(p.max_seqlen_q) * (p.num_heads / p.num_kv_heads) + kQueryTileRows - 1) /
      kQueryTileRows;
  if (p.batch > 65535 || p.num_kv_heads > 65535 || query_tiles > INT32_MAX) {
    return "prefill_sm80 grid too large (batch and num_kv_heads must be <= 65535)";
  }
  return "";
}

void run_prefill_sm80(const AttentionParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.max_seqlen_q == 0) return;
  const bool bf16 = params.dtype == ElementType::kBFloat16;
  switch (params.head_dim) {
    case 64:
      return bf16 ? run_prefill_sm80_instance<__nv_bfloat16, 64>(params, stream)
                  : run_prefill_sm80_instance<__half, 64>(params, stream);
    case 128:
      return bf16 ? run_prefill_sm80_instance<__nv_bfloat16, 128>(params, stream)
                  : run_prefill_sm80_instance<__half, 128>(params, stream);
  }
  throw std::invalid_argument(prefill_sm80_unsupported_reason(params));
}

}  // namespace ftengine::kernels::cuda
