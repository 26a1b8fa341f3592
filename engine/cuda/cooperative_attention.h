// CPU-GPU cooperative attention (FastAttention §3.4): attention over a paged KV cache whose last
// blocks live in pinned host memory (the host tier, engine/kv_cache.h).
//
// A sequence's host-tier keys are a suffix of its positions, and a step's new tokens lie all
// before the tier or all in it (the generator cuts chunks there). So each layer splits cleanly:
//   - the GPU attends over every sequence's device keys in one call, as without a tier (a
//     sequence whose queries are in the tier sees its whole device prefix: causal is moot for
//     one query; several queries get their own non-causal call);
//   - the host keys are copied to the GPU and attended there ("stream"), or attended in place
//     by the CPU kernel of kernels/cpu/attention_kv16.h while the GPU works ("cpu": the
//     queries go to the host first, the partial output and log-sum-exp come back), or both
//     ("auto"): a decode step's host keys split between the CPU (its first blocks) and the
//     bus (the rest) in the ratio that makes both finish together, re-estimated after every
//     layer from the CPU's and the GPU's measured times; prompt chunks stream (the CPU is
//     compute-bound there, 10-100x slower). A model whose KV heads serve more query heads
//     than the CPU member takes streams everything;
// and each partial is folded into the GPU's by log-sum-exp. Exact, whatever the split.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "engine/allocator.h"
#include "engine/backend.h"
#include "engine/forward_batch.h"
#include "engine/kv_cache.h"
#include "engine/tensor.h"
#include "kernels/cuda/attention/attention_params.h"

namespace ftengine::cuda {

// Where host-tier keys are attended (see the header comment).
enum class HostTierRoute : int { kAuto, kCpu, kStream };
HostTierRoute parse_host_tier_route(const std::string& name);

class CooperativeAttention {
 public:
  // `run_gpu` runs one GPU attention call on the stream (the backend's dispatch).
  using RunGpu = std::function<void(const kernels::cuda::AttentionParams&)>;

  // `cpu_threads` runs the CPU member (0: every core).
  CooperativeAttention(Allocator& device, Allocator& pinned, cudaStream_t stream,
                       HostTierRoute route, int cpu_threads);
  ~CooperativeAttention();

  // Plans a step from its host values and uploads what the GPU calls read; nothing happens
  // (active() is false) when no sequence of the step attends over host-tier keys.
  void plan(const ForwardBatch& batch);
  bool active() const { return active_; }

  // One layer: `whole` describes the call without a tier (q, out, an lse the merges update,
  // the cache's device blocks, the step's device index arrays).
  void run(const kernels::cuda::AttentionParams& whole, const LayerKvCache& cache,
           const RunGpu& run_gpu);

  const HostTierStats& stats() const { return stats_; }

 private:
  // A slice of one sequence's host-tier keys, attended by one route.
  struct HostPart {
    int32_t seq;
    int32_t q_start;
    int32_t q_len;
    int32_t device_len;  // keys on the GPU: positions [0, device_len)
    int32_t host_start;  // this slice: positions [host_start, host_start + host_len), a block
    int32_t host_len;    // boundary on, the sequence's last keys when streamed
    int32_t device_args;  // offset in the uploaded indices of {0, q_len, device_len}
    int32_t host_args;    // ... of {0, q_len, host_len}
    bool split;           // a streamed slice whose other part the CPU takes (auto)
  };

  Tensor grow(Tensor& buffer, Allocator& allocator, size_t bytes);
  // Host blocks of a decode part the CPU takes.
  int32_t cpu_blocks(int32_t host_blocks) const;
  // kAuto: moves cpu_share_ toward the share at which the last layer's CPU part would have
  // taken as long as the GPU's work beside it (its device attention, then its streamed
  // share), from the CPU's time and the GPU's event times. Called once those events are done.
  void balance();
  void run_cpu_parts(const kernels::cuda::AttentionParams& whole, const LayerKvCache& cache);
  // Copies a part's host blocks to the staging area, attends, merges; returns bytes copied.
  double stream_part(const HostPart& part, const kernels::cuda::AttentionParams& whole,
                     const LayerKvCache& cache, const RunGpu& run_gpu);

  Allocator& device_;
  Allocator& pinned_;
  cudaStream_t stream_;
  HostTierRoute route_;
  int cpu_threads_;
  bool cpu_serves_model_ = true;  // the CPU member takes this model's query group
  cudaEvent_t queries_ready_ = nullptr;
  // Around the GPU's work beside the CPU: {start, split start, split end} (its unsplittable
  // part, then its streamed share), two sets: a layer records one while balance() reads the
  // other, the last layer's.
  cudaEvent_t events_[2][3] = {};
  int event_set_ = 0;
  bool active_ = false;
  const ForwardBatch* batch_ = nullptr;

  std::vector<HostPart> prefix_parts_;  // several queries in the tier: non-causal prefix call
  std::vector<HostPart> cpu_parts_;
  std::vector<HostPart> streamed_parts_;
  // Inputs of the CPU kernel over cpu_parts_, packed: query rows, lengths, table rows.
  std::vector<int32_t> cpu_cu_seqlens_;
  std::vector<int32_t> cpu_seqlens_;
  std::vector<int32_t> cpu_table_;  // rows of host blocks: global ids, then host-tier ids
  bool cpu_table_host_relative_ = false;
  int32_t cpu_table_stride_ = 0;
  int32_t cpu_rows_ = 0;
  int32_t max_device_len_ = 0;

  // Device: the uploaded indices (device seqlens, CPU rows' tokens, per-part arguments, the
  // identity block table of the staging area), scratch, staging; host: pinned transfers.
  std::vector<int32_t> host_indices_;
  Tensor indices_;
  int32_t device_seqlens_ = 0, cpu_tokens_ = 0, identity_table_ = 0;  // offsets in indices_
  Tensor scratch_lse_, part_out_, part_lse_, stage_k_, stage_v_, cpu_results_;
  Tensor pinned_queries_, pinned_results_;
  std::vector<float> queries_f32_;

  // kAuto's split: the CPU's share of a decode step's host blocks, and the last layer's
  // measurements (bytes each side took, the CPU's seconds; its event set gives the GPU's).
  struct Measurement {
    int event_set = 0;
    double cpu_seconds = 0, cpu_bytes = 0, split_bytes = 0;
  };
  double cpu_share_ = 0.3;
  double last_cpu_seconds_ = 0, last_cpu_bytes_ = 0;  // this layer's CPU part
  std::optional<Measurement> pending_;                // the last layer's, until balanced

  HostTierStats stats_;
};

}  // namespace ftengine::cuda
