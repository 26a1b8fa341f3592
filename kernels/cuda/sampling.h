// Logits processing and sampling for a batch of rows on the GPU (one row per sequence of a decode
// step), with the semantics and order of the CPU sampler (kernels/cpu/sampling.h), which is the
// reference: repetition penalty, temperature, top-k, top-p over the top-k mass, then a draw;
// temperature 0 is greedy (first maximum, NaN never wins).
//
// Everything stays on the device: configs, histories, seeds and step counters are device arrays,
// nothing is allocated and nothing waits for the host, so a decode step that calls run_sampling
// can be captured in a CUDA graph and replayed with new contents in those arrays.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace ftengine::kernels::cuda {

// Token masses are summed as 64-bit fixed point (scale 2^43) so that sums are exact and the
// result does not depend on the order of atomics; vocab * 2^43 must stay below 2^64.
constexpr int32_t kMaxSamplingVocab = 1 << 20;

struct SamplingParams {
  // logits[row * logits_row_stride + id], float32. The repetition penalty is applied here in
  // place, as the CPU sampler does; nothing else is written.
  float* logits = nullptr;
  int64_t logits_row_stride = 0;  // elements between consecutive rows, >= vocab
  int32_t rows = 0;
  int32_t vocab = 0;  // 1 ..= kMaxSamplingVocab

  // Per-row configs, device arrays of `rows` entries, valid as sampling_config_error (CPU)
  // defines: the caller validates them on the host. A null array means its neutral value for
  // every row.
  const float* temperature = nullptr;         // 0 = greedy; null: every row greedy
  const int32_t* top_k = nullptr;             // 0 keeps every token; null: 0
  const float* top_p = nullptr;               // 1 keeps every token; null: 1
  const float* repetition_penalty = nullptr;  // 1 = none; null: none

  // Ids the repetition penalty applies to (prompt and generated tokens): row r owns
  // history[history_offsets[r] .. history_offsets[r + 1]). Ids outside [0, vocab) are ignored.
  // Both null: no penalty.
  const int32_t* history = nullptr;
  const int32_t* history_offsets = nullptr;  // [rows + 1], non-decreasing

  // Philox key and counter of each row's draw: the same seed and step give the same token; a
  // sequence keeps its seed and moves its step. Rows of a batch should not share a seed, or
  // their draws (noise per token id) are correlated. Null: 0.
  const uint64_t* seeds = nullptr;  // [rows]
  int64_t* steps = nullptr;         // [rows]
  bool advance_steps = false;       // add 1 to steps[row] after its draw (graph replays move on)

  int32_t* out_ids = nullptr;  // [rows], the chosen token of each row
};

// Empty when the host-side fields (counts, strides, required pointers) are usable, else what is
// wrong. The device arrays' contents are not read.
std::string sampling_params_error(const SamplingParams& params);

// Device scratch run_sampling needs for this many rows of this vocabulary (a few bytes per row
// and 4096 tokens).
size_t sampling_workspace_bytes(int32_t rows, int32_t vocab);

// Samples one token per row on `stream`. Throws std::invalid_argument when sampling_params_error
// is not empty or the workspace is too small, std::runtime_error when a launch fails.
void run_sampling(const SamplingParams& params, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream);

}  // namespace ftengine::kernels::cuda
