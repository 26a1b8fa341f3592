// Launchers of the split-KV decode kernels and the dispatch between them (host code, included by
// the instance files, decode_split_kv.cu and benchmarks).
#pragma once

#include "kernels/cuda/attention/decode_split_kv_kernel.cuh"
#include "kernels/cuda/attention/decode_split_kv_mma.cuh"

namespace ftengine::kernels::cuda::decode_detail {

// ---------------------------------------------------------------------------------------------
// Launch templates

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("decode_split_kv: ") + what + " launch failed: " +
                             cudaGetErrorString(err));
  }
}

struct DeviceInfo {
  int device = 0;
  int compute_capability = 0;
  int max_smem_per_block = 0;  // with opt-in
};

inline DeviceInfo current_device_info() {
  DeviceInfo info;
  int major = 0, minor = 0;
  if (cudaGetDevice(&info.device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, info.device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, info.device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&info.max_smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                             info.device) != cudaSuccess) {
    throw std::runtime_error("decode_split_kv: cannot query the current CUDA device");
  }
  info.compute_capability = major * 10 + minor;
  return info;
}

// Runs the split kernel of one instance, then the merge when there are several splits.
template <typename Traits, auto kernel>
void launch_decode(const DecodeArgs& args, const DeviceInfo& device, cudaStream_t stream) {
  if (Traits::kSmemBytes > 48 * 1024) {
    // Once per device and instance: the attribute sticks to the function.
    static unsigned long long raised_on_devices = 0;
    const unsigned long long bit = 1ull << (device.device % 64);
    if ((__atomic_load_n(&raised_on_devices, __ATOMIC_ACQUIRE) & bit) == 0) {
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               Traits::kSmemBytes) != cudaSuccess) {
        check_launch("split kernel (shared memory attribute)");
      }
      __atomic_fetch_or(&raised_on_devices, bit, __ATOMIC_ACQ_REL);
    }
  }
  const AttentionParams& p = args.params;
  const dim3 grid(p.num_kv_heads, args.num_splits, p.batch);
  kernel<<<grid, kThreads, Traits::kSmemBytes, stream>>>(args);
  check_launch("split kernel");
  if (args.num_splits == 1) return;

  using Element = typename Traits::Element;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((p.num_heads + kMergeHeadsPerCta - 1) / kMergeHeadsPerCta, p.batch);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  if (device.compute_capability >= 90) {
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  if (cudaLaunchKernelEx(&config, decode_merge_kernel<Element>, args) != cudaSuccess &&
      config.numAttrs > 0) {
    // Without programmatic launch the merge only waits for the whole split kernel as usual.
    (void)cudaGetLastError();
    config.attrs = nullptr;
    config.numAttrs = 0;
    (void)cudaLaunchKernelEx(&config, decode_merge_kernel<Element>, args);
  }
  check_launch("merge kernel");
}

// Tokens per chunk: about 16 KB of K (and as much of V) per stage.
template <int kHeadDimVecs>
constexpr int kLargeChunk = kHeadDimVecs <= 16 ? 64 : 32;
// Devices with less shared memory per block (Turing's 64 KB, Ada's 99 KB) get a 2-stage ring of
// half-size chunks; 64 tokens stay for head_dim 64 so the epilogue still fits in the ring.
template <int kHeadDimVecs>
constexpr int kSmallChunk = kHeadDimVecs <= 8 ? 64 : kHeadDimVecs <= 16 ? 32 : 16;

template <typename Element, int kHeadDimVecs, int kGroup>
void launch_decode_for_shape(const DecodeArgs& args, const DeviceInfo& device,
                             cudaStream_t stream) {
  using Large = DecodeTraits<Element, kHeadDimVecs, kGroup, kLargeChunk<kHeadDimVecs>, 3>;
  using Small = DecodeTraits<Element, kHeadDimVecs, kGroup, kSmallChunk<kHeadDimVecs>, 2>;
  if (Large::kSmemBytes <= device.max_smem_per_block) {
    launch_decode<Large, decode_split_kv_kernel<Large>>(args, device, stream);
  } else {
    launch_decode<Small, decode_split_kv_kernel<Small>>(args, device, stream);
  }
}

// Tensor-core kernel stages: 3, two 16-token steps in flight per warp (109 KB per CTA at
// head_dim 128). On the H100, at split counts of about 4 CTAs per SM, 2 stages ranged from -8% to
// +14% by shape and 4 stages lost up to 23%; not re-measured at one CTA per SM. head_dim 256
// takes 2 so that it still fits an A100's 163 KB.
template <int kHeadDimVecs>
constexpr int kMmaStages = kHeadDimVecs <= 16 ? 3 : 2;

template <typename Element, int kHeadDimVecs>
void launch_decode_for_head_dim(const DecodeArgs& args, const DeviceInfo& device,
                                bool allow_tensor_cores, cudaStream_t stream) {
  using Mma = MmaDecodeTraits<Element, kHeadDimVecs, kMmaStages<kHeadDimVecs>>;
  if (allow_tensor_cores && device.compute_capability >= 80 &&
      Mma::kSmemBytes <= device.max_smem_per_block) {
    launch_decode<Mma, decode_split_kv_mma_kernel<Mma>>(args, device, stream);
    return;
  }
  const int group = args.params.num_heads / args.params.num_kv_heads;
  if (group <= 1) {
    launch_decode_for_shape<Element, kHeadDimVecs, 1>(args, device, stream);
  } else if (group <= 2) {
    launch_decode_for_shape<Element, kHeadDimVecs, 2>(args, device, stream);
  } else if (group <= 4) {
    launch_decode_for_shape<Element, kHeadDimVecs, 4>(args, device, stream);
  } else if (group <= 8) {
    launch_decode_for_shape<Element, kHeadDimVecs, 8>(args, device, stream);
  } else {
    launch_decode_for_shape<Element, kHeadDimVecs, 16>(args, device, stream);
  }
}

// The one place that turns (device, head_dim, group) into an instance: the tensor-core kernel on
// Ampere and newer, else (Turing, or allow_tensor_cores off for tests and benchmarks) the
// CUDA-core kernel. Instantiated once per dtype in decode_split_kv_{fp16,bf16}.cu.
template <typename Element>
void launch_decode_for_dtype(const DecodeArgs& args, bool allow_tensor_cores,
                             cudaStream_t stream) {
  const DeviceInfo device = current_device_info();
  const int head_dim = args.params.head_dim;
  if (head_dim <= 64) {
    launch_decode_for_head_dim<Element, 8>(args, device, allow_tensor_cores, stream);
  } else if (head_dim <= 128) {
    launch_decode_for_head_dim<Element, 16>(args, device, allow_tensor_cores, stream);
  } else {
    launch_decode_for_head_dim<Element, 32>(args, device, allow_tensor_cores, stream);
  }
}

extern template void launch_decode_for_dtype<__half>(const DecodeArgs&, bool, cudaStream_t);
extern template void launch_decode_for_dtype<__nv_bfloat16>(const DecodeArgs&, bool,
                                                            cudaStream_t);

DecodeArgs make_decode_args(const AttentionParams& params, int num_splits, void* workspace);

// Fills DecodeArgs and launches with a given number of splits (decode_num_splits() in
// production; the benchmarks sweep it). `workspace` holds decode_workspace_bytes(params, splits).
void run_decode_with_splits(const AttentionParams& params, int num_splits, void* workspace,
                            cudaStream_t stream, bool allow_tensor_cores = true);
size_t decode_workspace_bytes(const AttentionParams& params, int num_splits);

}  // namespace ftengine::kernels::cuda::decode_detail
