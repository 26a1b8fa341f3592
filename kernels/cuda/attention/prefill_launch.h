// Launcher of the FastAttention prefill members (sm90, sm80, sm75, sm70). Included only by the instance
// files (prefill_sm*_hdim*_*.cu, written by prefill_generate_instances.py), each of which
// instantiates run_prefill_instance for one member's traits; the causal flag is a template
// parameter of the kernel, chosen here.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda/attention/attention_params.h"
#include "kernels/cuda/attention/prefill_sm70_kernel.h"
#include "kernels/cuda/attention/prefill_sm70_traits.h"
#include "kernels/cuda/attention/prefill_sm75_traits.h"
#include "kernels/cuda/attention/prefill_sm80_kernel.h"
#include "kernels/cuda/attention/prefill_static_switch.h"
#include "kernels/cuda/attention/prefill_sm80_traits.h"
#include "kernels/cuda/attention/prefill_sm90_kernel.h"
#include "kernels/cuda/attention/prefill_sm90_traits.h"

namespace ftengine::kernels::cuda {

// One kernel for every member. It compiles for every architecture of the build (CMake's list): an
// architecture below the member's instructions (sm80's cp.async on sm_75, sm75's ldmatrix on
// sm_70) gets a trap instead of the body, and dispatch never launches it there.
template <typename Traits, bool kCausal>
__global__ void __launch_bounds__(Traits::kNumThreads, Traits::kMinBlocksPerSm)
    prefill_kernel(const __grid_constant__ AttentionParams params) {
#if defined(__CUDA_ARCH__)
  if constexpr (__CUDA_ARCH__ < Traits::Arch::kMinCudaArch) {
    __trap();
  } else if constexpr (Traits::kM8n8k4) {
    prefill_sm70_body<Traits, kCausal>(params);
  } else {
    prefill_mma_body<Traits, kCausal>(params);
  }
#endif
}

inline void check_prefill_launch(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("prefill: ") + what + ": " + cudaGetErrorString(error));
  }
}

// x: query tile of (token, head) rows, counted down in the kernel; y: KV head; z: sequence.
// Sized from host-side bounds only, so a captured graph replays with new lengths.
template <typename Traits>
dim3 prefill_grid(const AttentionParams& params) {
  const int64_t rows =
      static_cast<int64_t>(params.max_seqlen_q) * (params.num_heads / params.num_kv_heads);
  return dim3(static_cast<unsigned>((rows + Traits::kBlockM - 1) / Traits::kBlockM),
              params.num_kv_heads, params.batch);
}

template <typename Traits, bool kCausal>
void launch_prefill(const AttentionParams& params, cudaStream_t stream) {
  static_assert(Traits::kSharedBytes <= Traits::Arch::kMaxSharedBytes);
  const auto kernel = &prefill_kernel<Traits, kCausal>;
  // Above 48 KB a kernel must opt in to dynamic shared memory; cheap enough to repeat per call,
  // and it keeps the attribute right on whichever device is current.
  check_prefill_launch(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            Traits::kSharedBytes),
                       "cudaFuncSetAttribute");
  const dim3 grid = prefill_grid<Traits>(params);
  kernel<<<grid, Traits::kNumThreads, Traits::kSharedBytes, stream>>>(params);
  check_prefill_launch(cudaGetLastError(), "kernel launch");
}

// The Hopper member takes the tensor maps of the two caches beside the params.
template <typename Traits, bool kCausal>
void launch_prefill_sm90(const AttentionParams& params, cudaStream_t stream) {
  static_assert(Traits::kSharedBytes <= Traits::Arch::kMaxSharedBytes);
  const CUtensorMap k_map = make_prefill_sm90_kv_map(params, params.k_cache, Traits::kTmaSlots);
  const CUtensorMap v_map = make_prefill_sm90_kv_map(params, params.v_cache, Traits::kTmaSlots);
  const auto kernel = &prefill_sm90_kernel<Traits, kCausal>;
  check_prefill_launch(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            Traits::kSharedBytes),
                       "cudaFuncSetAttribute");
  const dim3 grid = prefill_grid<Traits>(params);
  kernel<<<grid, Traits::kNumThreads, Traits::kSharedBytes, stream>>>(params, k_map, v_map);
  check_prefill_launch(cudaGetLastError(), "kernel launch");
}

template <typename Traits>
void run_prefill_instance(const AttentionParams& params, cudaStream_t stream) {
  PREFILL_BOOL_SWITCH(params.causal, kCausal, [&] {
    if constexpr (std::is_same_v<typename Traits::Arch, Sm90>) {
      launch_prefill_sm90<Traits, kCausal>(params, stream);
    } else {
      launch_prefill<Traits, kCausal>(params, stream);
    }
  });
}

}  // namespace ftengine::kernels::cuda
