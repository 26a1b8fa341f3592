// Binding of the CUDA sampler (kernels/cuda/sampling.h), for op tests and the Python side. Every
// array is a device address given as an int (torch's data_ptr()); the binding checks counts, not
// the arrays' contents, which the caller validates on the host as for the CPU sampler.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/sampling.h"

namespace py = pybind11;
using ftengine::kernels::cuda::SamplingParams;

namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

template <typename T>
T* device_array(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

int32_t checked_count(int64_t value, const char* name) {
  if (value < 0 || value > INT32_MAX) {
    throw std::invalid_argument(std::string(name) + " must be in [0, 2^31), got " +
                                std::to_string(value));
  }
  return static_cast<int32_t>(value);
}

void cuda_sample(uintptr_t logits, int64_t rows, int64_t vocab, uintptr_t temperature,
                 uintptr_t top_k, uintptr_t top_p, uintptr_t repetition_penalty,
                 uintptr_t history, uintptr_t history_offsets, uintptr_t seeds, uintptr_t steps,
                 uintptr_t out_ids, uintptr_t stream_handle, int64_t logits_row_stride,
                 bool advance_steps, uintptr_t workspace, uint64_t workspace_bytes) {
  SamplingParams params;
  params.rows = checked_count(rows, "rows");
  params.vocab = checked_count(vocab, "vocab");
  params.logits = device_array<float>(logits);
  params.logits_row_stride = logits_row_stride == 0 ? vocab : logits_row_stride;
  params.temperature = device_array<const float>(temperature);
  params.top_k = device_array<const int32_t>(top_k);
  params.top_p = device_array<const float>(top_p);
  params.repetition_penalty = device_array<const float>(repetition_penalty);
  params.history = device_array<const int32_t>(history);
  params.history_offsets = device_array<const int32_t>(history_offsets);
  params.seeds = device_array<const uint64_t>(seeds);
  params.steps = device_array<int64_t>(steps);
  params.advance_steps = advance_steps;
  params.out_ids = device_array<int32_t>(out_ids);
  const std::string error = ftengine::kernels::cuda::sampling_params_error(params);
  if (!error.empty()) throw std::invalid_argument("cuda_sample: " + error);
  if (params.rows == 0) return;

  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const size_t needed =
      ftengine::kernels::cuda::sampling_workspace_bytes(params.rows, params.vocab);
  if (workspace != 0) {
    if (workspace_bytes < needed) {
      throw std::invalid_argument("cuda_sample: the workspace needs " + std::to_string(needed) +
                                  " bytes, got " + std::to_string(workspace_bytes));
    }
    ftengine::kernels::cuda::run_sampling(params, device_array<void>(workspace), workspace_bytes,
                                          stream);
    return;
  }
  void* scratch = nullptr;
  check_cuda(cudaMallocAsync(&scratch, needed, stream), "cuda_sample: cudaMallocAsync");
  try {
    ftengine::kernels::cuda::run_sampling(params, scratch, needed, stream);
  } catch (...) {
    cudaFreeAsync(scratch, stream);
    throw;
  }
  check_cuda(cudaFreeAsync(scratch, stream), "cuda_sample: cudaFreeAsync");
}

}  // namespace

void bind_cuda_sampling(py::module_& m) {
  m.def(
      "cuda_sampling_workspace_bytes",
      [](int64_t rows, int64_t vocab) {
        return ftengine::kernels::cuda::sampling_workspace_bytes(checked_count(rows, "rows"),
                                                                 checked_count(vocab, "vocab"));
      },
      py::arg("rows"), py::arg("vocab"),
      "device bytes cuda_sample's workspace needs for this batch");
  m.def("cuda_sample", &cuda_sample, py::arg("logits"), py::arg("rows"), py::arg("vocab"),
        py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("repetition_penalty"), py::arg("history"), py::arg("history_offsets"),
        py::arg("seeds"), py::arg("steps"), py::arg("out_ids"), py::arg("stream") = 0,
        py::arg("logits_row_stride") = 0, py::arg("advance_steps") = false,
        py::arg("workspace") = 0, py::arg("workspace_bytes") = 0,
        "Samples one token per row on `stream` (a cudaStream_t as int, 0: the legacy default "
        "stream). Device addresses as ints, 0 where optional: logits float32 [rows, "
        "logits_row_stride] (repetition penalty applied in place; stride 0: vocab); temperature, "
        "top_p, repetition_penalty float32 [rows]; top_k int32 [rows]; history int32 (flat ids) "
        "with history_offsets int32 [rows + 1]; seeds uint64 (int64 bits) [rows]; steps int64 "
        "[rows] (advance_steps adds 1 after the draw); out_ids int32 [rows]. Without a "
        "workspace, one of cuda_sampling_workspace_bytes is allocated and freed on the stream.");
}
