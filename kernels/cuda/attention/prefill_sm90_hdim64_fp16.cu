// Written by prefill_generate_instances.py; edit that script, not this file.
#include "kernels/cuda/attention/prefill_launch.h"

namespace ftengine::kernels::cuda {

template void run_prefill_instance<PrefillSm90Traits<__half, 64>>(const AttentionParams& params,
                                                                  cudaStream_t stream);

}  // namespace ftengine::kernels::cuda
