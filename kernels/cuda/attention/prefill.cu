// The prefill members' "can it run?" and "run it": one switch over (member, element type,
// head_dim) onto the instances that prefill_generate_instances.py writes.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/attention/prefill.h"
#include "kernels/cuda/attention/prefill_sm70_traits.h"
#include "kernels/cuda/attention/prefill_sm75_traits.h"
#include "kernels/cuda/attention/prefill_sm80_traits.h"
#include "kernels/cuda/attention/prefill_sm90_traits.h"

namespace ftengine::kernels::cuda {

// Defined in prefill_launch.h and instantiated once per traits in the prefill_sm*_hdim*_*.cu
// files; only the declaration is seen here, so no kernel compiles twice.
template <typename Traits>
void run_prefill_instance(const AttentionParams& params, cudaStream_t stream);

namespace {

// Every member tiles queries alike; the KV tile (and so the cache block size rule) varies.
constexpr int kQueryTileRows = PrefillSm80Traits<__half, 128>::kBlockM;
static_assert(PrefillSm75Traits<128>::kBlockM == kQueryTileRows &&
              PrefillSm70Traits<128>::kBlockM == kQueryTileRows &&
              PrefillSm90Traits<__half, 128>::kBlockM == kQueryTileRows);

// The cache block size must be a multiple of this: the KV tile, or the Hopper member's TMA box.
int kv_tile_tokens(PrefillArch arch, int head_dim) {
  switch (arch) {
    case PrefillArch::kSm90:
      return PrefillSm90Traits<__half, 128>::kTmaSlots;
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
    case PrefillArch::kSm90:
      return "prefill_sm90";
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
  if (arch == PrefillArch::kSm90) {
#ifndef FTENGINE_SM90A_KERNELS
    return name + " is not in this build (FTENGINE_CUDA_ARCHITECTURES has no 90a)";
#endif
    if (p.kv_num_blocks <= 0) return name + " needs kv_num_blocks (the extent of its TMA maps)";
    // What cuTensorMapEncodeTiled asks of the cache's strides beyond the multiples of 16 bytes
    // checked below: positive and under 2^40 bytes. Refused here, dispatch falls back to sm80
    // instead of failing at launch.
    for (const int64_t stride : {p.kv_head_stride, p.kv_token_stride, p.kv_block_stride}) {
      if (stride <= 0 || stride >= (int64_t{1} << 39)) {
        return name + " needs positive KV cache strides under 2^40 bytes (its TMA maps)";
      }
    }
  }
  if (arch == PrefillArch::kSm80 || arch == PrefillArch::kSm90) {
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
           " (its KV tile or copy box), not " + std::to_string(p.block_size);
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
      case PrefillArch::kSm90:
        if (bf16) {
          return hdim64 ? run_prefill_instance<PrefillSm90Traits<__nv_bfloat16, 64>>(params, stream)
                        : run_prefill_instance<PrefillSm90Traits<__nv_bfloat16, 128>>(params, stream);
        }
        return hdim64 ? run_prefill_instance<PrefillSm90Traits<__half, 64>>(params, stream)
                      : run_prefill_instance<PrefillSm90Traits<__half, 128>>(params, stream);
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

CUtensorMap make_prefill_sm90_kv_map(const AttentionParams& params, const void* cache,
                                     int box_slots) {
  // The driver's encoder, looked up once through the runtime: no link against libcuda.
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* function = nullptr;
#if CUDART_VERSION >= 12050
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &function, 12000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      function = nullptr;
    }
#else  // CUDA 12.0-12.4 (the Volta builds) have only the unversioned lookup
    if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &function, cudaEnableDefault) !=
        cudaSuccess) {
      function = nullptr;
    }
#endif
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(function);
  }();
  if (encode == nullptr) {
    throw std::runtime_error("prefill_sm90: the driver has no cuTensorMapEncodeTiled");
  }
  const bool bf16 = params.dtype == ElementType::kBFloat16;
  constexpr int64_t kElementBytes = 2;
  // Innermost first: dim, kv_head, slot, block.
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(params.head_dim),
                              static_cast<cuuint64_t>(params.num_kv_heads),
                              static_cast<cuuint64_t>(params.block_size),
                              static_cast<cuuint64_t>(params.kv_num_blocks)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(params.kv_head_stride * kElementBytes),
                                 static_cast<cuuint64_t>(params.kv_token_stride * kElementBytes),
                                 static_cast<cuuint64_t>(params.kv_block_stride * kElementBytes)};
  const cuuint32_t box[4] = {PrefillSm90Traits<__half, 128>::kPanelColumns, 1,
                             static_cast<cuuint32_t>(box_slots), 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult result =
      encode(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
             const_cast<void*>(cache), dims, strides, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS) {
    throw std::invalid_argument("prefill_sm90: cuTensorMapEncodeTiled refused the KV cache (error " +
                                std::to_string(static_cast<int>(result)) + ")");
  }
  return map;
}

}  // namespace ftengine::kernels::cuda
