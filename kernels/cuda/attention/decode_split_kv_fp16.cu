// Split-KV decode instances for float16: every (kernel, head_dim, GQA group, shared-memory
// size) variant of launch_decode_for_dtype, compiled apart from the other dtype to halve the
// build's critical path.
#include "kernels/cuda/attention/decode_split_kv_launch.cuh"

namespace ftengine::kernels::cuda::decode_detail {

template void launch_decode_for_dtype<__half>(const DecodeArgs&, bool, cudaStream_t);

}  // namespace ftengine::kernels::cuda::decode_detail
