// Bindings of the CUDA kernels, for op tests and benchmarks (built only with CUDA). Tensors come
// in as device pointers (torch's data_ptr()), so the tests allocate with torch and the module
// never links against it. Every shape is checked by the kernels' own unsupported_reason().
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/attention/attention.h"

namespace py = pybind11;
namespace kc = ftengine::kernels::cuda;

void bind_cuda_sampling(py::module_& m);

namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(status));
  }
}

int device_capability() {
  int device = 0, major = 0, minor = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
        "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
        "cudaDeviceGetAttribute");
  return major * 10 + minor;
}

template <typename T>
T pointer(const py::kwargs& kwargs, const char* key) {
  return reinterpret_cast<T>(static_cast<uintptr_t>(kwargs[key].cast<uint64_t>()));
}

kc::AttentionParams params_from(const py::kwargs& kw) {
  static const char* const keys[] = {
      "dtype", "q", "out", "lse", "k_cache", "v_cache", "block_table", "cu_seqlens_q",
      "seqlens_kv", "q_token_stride", "q_head_stride", "out_token_stride", "out_head_stride",
      "kv_block_stride", "kv_token_stride", "kv_head_stride", "block_size",
      "block_table_stride", "batch", "max_seqlen_q", "max_seqlen_kv", "num_heads",
      "num_kv_heads", "head_dim", "softmax_scale", "causal"};
  for (const char* key : keys) {
    if (!kw.contains(key)) throw std::invalid_argument(std::string("missing argument ") + key);
  }
  kc::AttentionParams p;
  const std::string dtype = kw["dtype"].cast<std::string>();
  if (dtype == "float16") {
    p.dtype = kc::ElementType::kFloat16;
  } else if (dtype == "bfloat16") {
    p.dtype = kc::ElementType::kBFloat16;
  } else {
    throw std::invalid_argument("dtype must be float16 or bfloat16, got " + dtype);
  }
  p.q = pointer<const void*>(kw, "q");
  p.out = pointer<void*>(kw, "out");
  p.lse = pointer<float*>(kw, "lse");
  p.k_cache = pointer<const void*>(kw, "k_cache");
  p.v_cache = pointer<const void*>(kw, "v_cache");
  p.block_table = pointer<const int32_t*>(kw, "block_table");
  p.cu_seqlens_q = pointer<const int32_t*>(kw, "cu_seqlens_q");
  p.seqlens_kv = pointer<const int32_t*>(kw, "seqlens_kv");
  p.q_token_stride = kw["q_token_stride"].cast<int64_t>();
  p.q_head_stride = kw["q_head_stride"].cast<int64_t>();
  p.out_token_stride = kw["out_token_stride"].cast<int64_t>();
  p.out_head_stride = kw["out_head_stride"].cast<int64_t>();
  p.kv_block_stride = kw["kv_block_stride"].cast<int64_t>();
  p.kv_token_stride = kw["kv_token_stride"].cast<int64_t>();
  p.kv_head_stride = kw["kv_head_stride"].cast<int64_t>();
  p.block_size = kw["block_size"].cast<int32_t>();
  // Optional: only the Hopper member's TMA maps need the caches' extent.
  p.kv_num_blocks = kw.contains("kv_num_blocks") ? kw["kv_num_blocks"].cast<int32_t>() : 0;
  p.block_table_stride = kw["block_table_stride"].cast<int32_t>();
  p.batch = kw["batch"].cast<int32_t>();
  p.max_seqlen_q = kw["max_seqlen_q"].cast<int32_t>();
  p.max_seqlen_kv = kw["max_seqlen_kv"].cast<int32_t>();
  p.num_heads = kw["num_heads"].cast<int32_t>();
  p.num_kv_heads = kw["num_kv_heads"].cast<int32_t>();
  p.head_dim = kw["head_dim"].cast<int32_t>();
  p.softmax_scale = kw["softmax_scale"].cast<float>();
  p.causal = kw["causal"].cast<bool>();
  return p;
}

}  // namespace

void bind_cuda(py::module_& m) {
  m.def("cuda_device_capability", &device_capability,
        "Compute capability of the current CUDA device as major * 10 + minor (e.g. 90).");
  m.def(
      "cuda_memory_info",
      [](int device) {
        check(cudaSetDevice(device), "cudaSetDevice");
        size_t free_bytes = 0, total_bytes = 0;
        check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
        return py::make_tuple(free_bytes, total_bytes);
      },
      py::arg("device") = 0, "(free, total) bytes of a CUDA device's memory.");
  // For placing tensor-parallel ranks on GPUs (ftengine.distributed): how many GPUs a process
  // sees, and a name for each that is the same in every process whatever its
  // CUDA_VISIBLE_DEVICES.
  m.def(
      "cuda_device_count",
      [] {
        int count = 0;
        return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
      },
      "CUDA devices this process sees (0 where CUDA cannot run).");
  m.def(
      "cuda_pci_bus_id",
      [](int device) {
        char id[32] = {};
        check(cudaDeviceGetPCIBusId(id, sizeof(id), device), "cudaDeviceGetPCIBusId");
        return std::string(id);
      },
      py::arg("device"), "The PCI bus id of a CUDA device (\"0000:1B:00.0\").");
  m.def(
      "cuda_attention_unsupported_reason",
      [](const std::string& kernel, const py::kwargs& kwargs) {
        return kc::attention_unsupported_reason(params_from(kwargs), kc::parse_attention_kernel(kernel),
                                                device_capability());
      },
      py::arg("kernel") = "auto",
      "Why the attention kernel cannot run these arguments, or '' when it can.");
  m.def(
      "cuda_attention",
      [](const std::string& kernel_name, const py::kwargs& kwargs) {
        const kc::AttentionParams params = params_from(kwargs);
        const int capability = device_capability();
        kc::AttentionKernel kernel = kc::parse_attention_kernel(kernel_name);
        if (kernel == kc::AttentionKernel::kAuto) {
          kernel = kc::choose_attention_kernel(params, capability);
        }
        const std::string reason = kc::attention_unsupported_reason(params, kernel, capability);
        if (!reason.empty()) {
          throw std::invalid_argument(std::string(kc::attention_kernel_name(kernel)) + ": " +
                                      reason);
        }
        cudaStream_t stream = kwargs.contains("stream")
                                  ? pointer<cudaStream_t>(kwargs, "stream")
                                  : nullptr;
        const size_t bytes = kc::attention_workspace_bytes(params, kernel, capability);
        void* workspace = nullptr;
        if (bytes > 0) check(cudaMallocAsync(&workspace, bytes, stream), "cudaMallocAsync");
        try {
          kc::run_attention(params, kernel, workspace, bytes, stream);
        } catch (...) {
          if (workspace) cudaFreeAsync(workspace, stream);
          throw;
        }
        if (workspace) check(cudaFreeAsync(workspace, stream), "cudaFreeAsync");
        return std::string(kc::attention_kernel_name(kernel));
      },
      py::arg("kernel") = "auto",
      "Runs a FastAttention CUDA kernel on device pointers (see kernels/cuda/attention/"
      "attention_params.h for the meaning of each keyword); returns the kernel that ran.");
  bind_cuda_sampling(m);
}
