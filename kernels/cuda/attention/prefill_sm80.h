// The sm80 member of the FastAttention CUDA family: prefill (fresh or chunked over the paged
// cache), causal or not, GQA, variable lengths, fp16 / bf16, head_dim 64 and 128.
// mma.sync m16n8k16 + ldmatrix + cp.async: runs on Ampere, Ada and Hopper.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/attention/attention_params.h"

namespace ftengine::kernels::cuda {

// Empty when this member can run the params (on a device of compute capability >= 80).
std::string prefill_sm80_unsupported_reason(const AttentionParams& params);

// Launches on `stream`; the caller has checked prefill_sm80_unsupported_reason().
void run_prefill_sm80(const AttentionParams& params, cudaStream_t stream);

}  // namespace ftengine::kernels::cuda
