// Dispatch of the FastAttention CUDA family: the only code that knows every member.
#include "kernels/cuda/attention/attention.h"

#include <stdexcept>
#include <string>

#include "kernels/cuda/attention/decode_split_kv.h"
#include "kernels/cuda/attention/prefill.h"

namespace ftengine::kernels::cuda {
namespace {

// Streaming multiprocessors of the current device: the split-KV decode sizes its grid by them.
int current_sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    throw std::runtime_error("cannot read the device's multiprocessor count");
  }
  return count;
}

std::string common_reason(const AttentionParams& p) {
  if (!p.q || !p.out || !p.k_cache || !p.v_cache) return "q, out, k_cache and v_cache are needed";
  if (p.batch < 0) return "batch must not be negative";
  if (p.batch > 0 && (!p.block_table || !p.cu_seqlens_q || !p.seqlens_kv)) {
    return "block_table, cu_seqlens_q and seqlens_kv are needed";
  }
  if (p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return "num_heads (" + std::to_string(p.num_heads) + ") must be a positive multiple of " +
           "num_kv_heads (" + std::to_string(p.num_kv_heads) + ")";
  }
  if (p.block_size <= 0) return "block_size must be positive";
  if (p.max_seqlen_q < 0 || p.max_seqlen_kv < 0) return "max_seqlen_q/kv must not be negative";
  return "";
}

PrefillArch prefill_arch(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kPrefillSm90:
      return PrefillArch::kSm90;
    case AttentionKernel::kPrefillSm75:
      return PrefillArch::kSm75;
    case AttentionKernel::kPrefillSm70:
      return PrefillArch::kSm70;
    default:
      return PrefillArch::kSm80;
  }
}

// The first compute capability with the member's instructions: wgmma and TMA (9.0), cp.async and
// bf16 mma (8.0), ldmatrix and mma.m16n8k8 (7.5), mma.m8n8k4 (7.0).
int minimum_capability(PrefillArch arch) {
  switch (arch) {
    case PrefillArch::kSm90:
      return 90;
    case PrefillArch::kSm80:
      return 80;
    case PrefillArch::kSm75:
      return 75;
    case PrefillArch::kSm70:
      return 70;
  }
  return 80;
}

}  // namespace

const char* attention_kernel_name(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kAuto:
      return "auto";
    case AttentionKernel::kPrefillSm90:
      return "prefill_sm90";
    case AttentionKernel::kPrefillSm80:
      return "prefill_sm80";
    case AttentionKernel::kPrefillSm75:
      return "prefill_sm75";
    case AttentionKernel::kPrefillSm70:
      return "prefill_sm70";
    case AttentionKernel::kDecodeSplitKv:
      return "decode_split_kv";
  }
  return "unknown";
}

AttentionKernel parse_attention_kernel(const std::string& name) {
  std::string names;
  for (AttentionKernel kernel :
       {AttentionKernel::kAuto, AttentionKernel::kPrefillSm90, AttentionKernel::kPrefillSm80,
        AttentionKernel::kPrefillSm75, AttentionKernel::kPrefillSm70,
        AttentionKernel::kDecodeSplitKv}) {
    if (name == attention_kernel_name(kernel)) return kernel;
    names += names.empty() ? "" : ", ";
    names += attention_kernel_name(kernel);
  }
  throw std::invalid_argument("unknown attention kernel '" + name + "' (" + names + ")");
}

AttentionKernel choose_attention_kernel(const AttentionParams& params, int compute_capability) {
  // One query per sequence reads each K/V byte once per query group: a bandwidth problem the
  // split-KV kernel solves; anything longer is a matrix problem for the prefill member.
  if (params.max_seqlen_q <= 1 &&
      decode_split_kv_unsupported_reason(params).empty()) {
    return AttentionKernel::kDecodeSplitKv;
  }
  // Each GPU generation gets the member of its own instructions (those of later GPUs are not
  // there; those of earlier ones run, slower). Hopper's wgmma is sm_90a only: later GPUs take
  // the sm80 member, as does Hopper where the Hopper member cannot run these params, and for
  // short contexts: measured on the H200 (docs/PERFORMANCE.md), the Hopper member leads from 1K
  // keys at head_dim 128 and from 2K at 64; below, its fixed cost per CTA (three warpgroups,
  // barrier set-up, one CTA an SM) loses to the sm80 member's two CTAs an SM.
  const int hopper_from_keys = params.head_dim == 64 ? 2048 : 1024;
  if (compute_capability == 90 && params.max_seqlen_kv >= hopper_from_keys &&
      prefill_unsupported_reason(params, PrefillArch::kSm90).empty()) {
    return AttentionKernel::kPrefillSm90;
  }
  if (compute_capability >= 80) return AttentionKernel::kPrefillSm80;
  if (compute_capability >= 75) return AttentionKernel::kPrefillSm75;
  return AttentionKernel::kPrefillSm70;
}

std::string attention_unsupported_reason(const AttentionParams& params, AttentionKernel kernel,
                                         int compute_capability) {
  const std::string common = common_reason(params);
  if (!common.empty()) return common;
  if (kernel == AttentionKernel::kAuto) kernel = choose_attention_kernel(params, compute_capability);
  switch (kernel) {
    case AttentionKernel::kPrefillSm90:
    case AttentionKernel::kPrefillSm80:
    case AttentionKernel::kPrefillSm75:
    case AttentionKernel::kPrefillSm70: {
      const PrefillArch arch = prefill_arch(kernel);
      const int needed = minimum_capability(arch);
      if (arch == PrefillArch::kSm90 && compute_capability != 90) {
        return std::string(prefill_member_name(arch)) +
               " needs compute capability 9.0 exactly (sm_90a code; this device: " +
               std::to_string(compute_capability) + ")";
      }
      if (compute_capability < needed) {
        return std::string(prefill_member_name(arch)) + " needs compute capability " +
               std::to_string(needed / 10) + "." + std::to_string(needed % 10) +
               " or newer (this device: " + std::to_string(compute_capability) + ")";
      }
      return prefill_unsupported_reason(params, arch);
    }
    case AttentionKernel::kDecodeSplitKv:
      return decode_split_kv_unsupported_reason(params);
    case AttentionKernel::kAuto:
      break;
  }
  return "unknown attention kernel";
}

size_t attention_workspace_bytes(const AttentionParams& params, AttentionKernel kernel,
                                 int compute_capability) {
  if (kernel == AttentionKernel::kAuto) kernel = choose_attention_kernel(params, compute_capability);
  if (kernel == AttentionKernel::kDecodeSplitKv) {
    return decode_split_kv_workspace_bytes(params, current_sm_count());
  }
  return 0;
}

void run_attention(const AttentionParams& params, AttentionKernel kernel, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream) {
  int device = 0, major = 0, minor = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  const int capability = major * 10 + minor;
  if (kernel == AttentionKernel::kAuto) kernel = choose_attention_kernel(params, capability);
  const std::string reason = attention_unsupported_reason(params, kernel, capability);
  if (!reason.empty()) {
    throw std::invalid_argument(std::string(attention_kernel_name(kernel)) + ": " + reason);
  }
  if (params.batch == 0 || params.max_seqlen_q == 0) return;
  switch (kernel) {
    case AttentionKernel::kPrefillSm90:
    case AttentionKernel::kPrefillSm80:
    case AttentionKernel::kPrefillSm75:
    case AttentionKernel::kPrefillSm70:
      run_prefill(params, prefill_arch(kernel), stream);
      break;
    case AttentionKernel::kDecodeSplitKv: {
      const int sms = current_sm_count();
      if (workspace_bytes < decode_split_kv_workspace_bytes(params, sms)) {
        throw std::invalid_argument("decode_split_kv: workspace too small");
      }
      run_decode_split_kv(params, sms, workspace, stream);
      break;
    }
    case AttentionKernel::kAuto:
      break;
  }
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string(attention_kernel_name(kernel)) +
                             " launch failed: " + cudaGetErrorString(error));
  }
}

}  // namespace ftengine::kernels::cuda
