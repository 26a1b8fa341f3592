// The one place that knows every member of the FastAttention CUDA family. One function answers
// "can this run?" and the same choice runs it, so tests, fallbacks and dispatch never disagree.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "kernels/cuda/attention/attention_params.h"

namespace ftengine::kernels::cuda {

enum class AttentionKernel : int {
  kAuto,           // the best member for these params on this device
  kPrefillSm90,    // wgmma + TMA + mbarriers, warp-specialised (Hopper only: sm_90a)
  kPrefillSm80,    // mma.sync m16n8k16 + ldmatrix + cp.async (Ampere, Ada, Hopper)
  kPrefillSm75,    // mma.sync m16n8k8 + ldmatrix, fp16 only (Turing; runs on later GPUs too)
  kPrefillSm70,    // mma.sync m8n8k4, fp16 only (Volta; runs on later GPUs too)
  kDecodeSplitKv,  // one query token per sequence, KV split across CTAs, merged by LSE
};

const char* attention_kernel_name(AttentionKernel kernel);

// The member named `name` ("auto", "prefill_sm80", ...); throws std::invalid_argument listing
// the names otherwise.
AttentionKernel parse_attention_kernel(const std::string& name);

// The member kAuto resolves to for these params on a device of this compute capability
// (major * 10 + minor).
AttentionKernel choose_attention_kernel(const AttentionParams& params, int compute_capability);

// Empty when `kernel` can run these params on this device; otherwise why not.
std::string attention_unsupported_reason(const AttentionParams& params, AttentionKernel kernel,
                                         int compute_capability);

// Device scratch the chosen member needs (split-KV partial outputs); 0 for most.
size_t attention_workspace_bytes(const AttentionParams& params, AttentionKernel kernel,
                                 int compute_capability);

// Runs the member on `stream`. Throws std::invalid_argument with the reason when it cannot run
// these params, std::runtime_error when the launch fails. `workspace` holds at least
// attention_workspace_bytes() bytes.
void run_attention(const AttentionParams& params, AttentionKernel kernel, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream);

}  // namespace ftengine::kernels::cuda
