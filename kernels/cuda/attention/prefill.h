// The prefill members of the FastAttention CUDA family: prefill (fresh or chunked over the paged
// cache), causal or not, GQA, variable lengths, head_dim 64 and 128, one body per fragment shape.
//   sm90: wgmma + TMA + mbarriers, warp-specialised, fp16 / bf16 (Hopper, sm_90a builds).
//   sm80: mma.sync m16n8k16 + ldmatrix + cp.async, fp16 / bf16 (Ampere, Ada, Hopper).
//   sm75: mma.sync m16n8k8 + ldmatrix, register round-trip copies, fp16 (Turing).
//   sm70: mma.sync m8n8k4, ld.shared fragments, register round-trip copies, fp16 (Volta).
// The tensor cores of Turing and Volta have no bf16: the sm75 and sm70 members take fp16 only,
// and a model runs on those GPUs in float16 (docs/GPU.md).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/attention/attention_params.h"

namespace ftengine::kernels::cuda {

enum class PrefillArch : int { kSm90, kSm80, kSm75, kSm70 };

const char* prefill_member_name(PrefillArch arch);  // "prefill_sm80", ...

// Empty when this member can run the params (on a device whose compute capability it supports;
// the caller checks that).
std::string prefill_unsupported_reason(const AttentionParams& params, PrefillArch arch);

// Launches on `stream`; the caller has checked prefill_unsupported_reason().
void run_prefill(const AttentionParams& params, PrefillArch arch, cudaStream_t stream);

}  // namespace ftengine::kernels::cuda
