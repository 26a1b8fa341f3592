// Split-KV decode instances for half: every (head_dim, GQA group, shared-memory size) variant
// of launch_decode_for_dtype, compiled apart from the other dtype to halve the build's critical
// path.
#include "kernels/cuda/attention/decode_split_kv_kernel.cuh"

namespace ftengine::kernels::cuda::decode_detail {

template void launch_decode_for_dtype<__half>(const DecodeArgs&, cudaStream_t);

}  // namespace ftengine::kernels::cuda::decode_detail
