// Launcher of the sm80 prefill body. Included only by the instance files
// (prefill_sm80_hdim*_*.cu, written by prefill_sm80_generate_instances.py), each of which
// instantiates run_prefill_sm80_instance for one (element type, head_dim); the causal flag is a
// template parameter of the kernel, chosen here.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels/cuda/attention/attention_params.h"
#include "kernels/cuda/attention/prefill_sm80_kernel.h"
#include "kernels/cuda/attention/prefill_sm80_static_switch.h"
#include "kernels/cuda/attention/prefill_sm80_traits.h"

namespace ftengine::kernels::cuda {

inline void check_prefill_sm80_launch(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("prefill_sm80: ") + what + ": " +
                             cudaGetErrorString(error));
  }
}

template <typename Traits, bool kCausal>
void launch_prefill_sm80(const AttentionParams& params, cudaStream_t stream) {
  const auto kernel = &prefill_sm80_kernel<Traits, kCausal>;
  // Above 48 KB a kernel must opt in to dynamic shared memory; cheap enough to repeat per call,
  // and it keeps the attribute right on whichever device is current.
  check_prefill_sm80_launch(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           Traits::kSharedBytes),
      "cudaFuncSetAttribute");
  // x: query tile of (token, head) rows, counted down in the kernel; y: KV head; z: sequence.
  // Sized from host-side bounds only, so a captured graph replays with new lengths.
  const int64_t rows =
      static_cast<int64_t>(params.max_seqlen_q) * (params.num_heads / params.num_kv_heads);
  const dim3 grid(static_cast<unsigned>((rows + Traits::kBlockM - 1) / Traits::kBlockM),
                  params.num_kv_heads, params.batch);
  kernel<<<grid, Traits::kNumThreads, Traits::kSharedBytes, stream>>>(params);
  check_prefill_sm80_launch(cudaGetLastError(), "kernel launch");
}

template <typename Element, int kHeadDim>
void run_prefill_sm80_instance(const AttentionParams& params, cudaStream_t stream) {
  PREFILL_SM80_BOOL_SWITCH(params.causal, kCausal, [&] {
    launch_prefill_sm80<PrefillSm80Traits<Element, kHeadDim>, kCausal>(params, stream);
  });
}

}  // namespace ftengine::kernels::cuda
