// The prefill members' "can it run?" and "run it": one switch over (member, element type,
// head_dim) onto the instances that prefill_generate_instances.py writes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/attention/prefill.h"
#include "kernels/cuda/attention/prefill_sm70_traits.h"
#include "kernels/cuda/attention/prefill_sm75_traits.h"
#include "kernels/cuda/attention/prefill_sm80_traits.h"

namespace ftengine::kernels::cuda {

// Defined in prefill_launch.h and instantiated once per traits in the prefill_sm*_hdim*_*.cu
// files; only the declaration is seen here, so no kernel compiles twice.
template <typename Traits>
void run_prefill_instance(const AttentionParams& params, cudaStream_t stream);

namespace {

// Every member tiles queries alike; the KV tile (and so the cache block size rule) varies.
constexpr int kQueryTileRows = PrefillSm80Traits<__half, 128>::kBlockM;
static_assert(PrefillSm75Traits<128>::kBlockM == kQueryTileRows &&
              PrefillSm70Traits<128>::kBlockM == kQueryTileRows);

int kv_tile_tokens(PrefillArch arch, int head_dim) {
  switch (arch) {
    case PrefillArch::kSm80:
      return PrefillSm80Traits<__half, 128>::kBlockN;
    case PrefillArch::kSm75:
      return head_dim == 128 ? PrefillSm75Traits<128>::kBlockN : PrefillSm75Traits<64>::kBlockN;
    case PrefillArch::kSm70:
      return PrefillSm70Traits<128>::kBlockN;
  }
  return 0;
}

bool aligned_16_bytes(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

}  // namespace

const char* prefill_member_name(PrefillArch arch) {
  switch (arch) {
    case PrefillArch::kSm80:
      return "prefill_sm80";
    case PrefillArch::kSm75:
      return "prefill_sm75";
    case PrefillArch::kSm70:
      return "prefill_sm70";
  }
  return "prefill";
}

std::string prefill_unsupported_reason(const AttentionParams& p, PrefillArch arch) {
  const std::string name = prefill_member_name(arch);
  if (arch == PrefillArch::kSm80) {
    if (p.dtype != ElementType::kFloat16 && p.dtype != ElementType::kBFloat16) {
      return name + " supports float16 and bfloat16 only";
    }
  } else if (p.dtype != ElementType::kFloat16) {
    // Turing and Volta tensor cores multiply fp16 only; a bf16 model runs there in float16.
    return name + " supports float16 only (Turing and Volta tensor cores have no bfloat16)";
  }
  if (p.head_dim != 64 && p.head_dim != 128) {
    return name + " supports head_dim 64 and 128, not " + std::to_string(p.head_dim);
  }
  if (p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return "num_heads must be a positive multiple of num_kv_heads";
  }
  const int kv_tile = kv_tile_tokens(arch, p.head_dim);
  if (p.block_size <= 0 || p.block_size % kv_tile != 0) {
    return name + " needs block_size to be a multiple of " + std::to_string(kv_tile) +
           " (its KV tile), not " + std::to_string(p.block_size);
  }
  if (!(p.softmax_scale > 0.f) || !std::isfinite(p.softmax_scale)) {
    // The running max is kept on unscaled scores, which is right only for a positive scale.
    return name + " needs a positive, finite softmax_scale";
  }
  // Rows move in 16-byte copies / vector chunks.
  if (!aligned_16_bytes(p.q) || !aligned_16_bytes(p.out) || !aligned_16_bytes(p.k_cache) ||
      !aligned_16_bytes(p.v_cache)) {
    return name + " needs q, out, k_cache and v_cache aligned to 16 bytes";
  }
  for (const int64_t stride :
       {p.q_token_stride, p.q_head_stride, p.out_token_stride, p.out_head_stride, p.kv_block_stride,
        p.kv_token_stride, p.kv_head_stride}) {
    if (stride % 8 != 0) return name + " needs every stride to be a multiple of 8 elements";
  }
  // A tile's rows are addressed with 32-bit offsets inside its cache block.
  if (static_cast<int64_t>(p.block_size) * p.kv_token_stride > INT32_MAX) {
    return name + " needs block_size * kv_token_stride < 2^31";
  }
  // Grid x is the query tile (< 2^31), y the KV head and z the sequence (<= 65535 each).
  const int64_t query_tiles =
      (static_cast<int64_t>(p.max_seqlen_q) * (p.num_heads / p.num_kv_heads) + kQueryTileRows - 1) /
      kQueryTileRows;
  if (p.batch > 65535 || p.num_kv_heads > 65535 || query_tiles > INT32_MAX) {
    return name + " grid too large (batch and num_kv_heads must be <= 65535)";
  }
  return "";
}

void run_prefill(const AttentionParams& params, PrefillArch arch, cudaStream_t stream) {
  if (params.batch == 0 || params.max_seqlen_q == 0) return;
  const bool bf16 = params.dtype == ElementType::kBFloat16;
  const bool hdim64 = params.head_dim == 64;
  if (params.head_dim == 64 || params.head_dim == 128) {
    switch (arch) {
      case PrefillArch::kSm80:
        if (bf16) {
          return hdim64 ? run_prefill_instance<PrefillSm80Traits<__nv_bfloat16, 64>>(params, stream)
                        : run_prefill_instance<PrefillSm80Traits<__nv_bfloat16, 128>>(params, stream);
        }
        return hdim64 ? run_prefill_instance<PrefillSm80Traits<__half, 64>>(params, stream)
                      : run_prefill_instance<PrefillSm80Traits<__half, 128>>(params, stream);
      case PrefillArch::kSm75:
        if (bf16) break;
        return hdim64 ? run_prefill_instance<PrefillSm75Traits<64>>(params, stream)
                      : run_prefill_instance<PrefillSm75Traits<128>>(params, stream);
      case PrefillArch::kSm70:
        if (bf16) break;
        return hdim64 ? run_prefill_instance<PrefillSm70Traits<64>>(params, stream)
                      : run_prefill_instance<PrefillSm70Traits<128>>(params, stream);
    }
  }
  throw std::invalid_argument(prefill_unsupported_reason(params, arch));
}

}  // namespace ftengine::kernels::cuda
