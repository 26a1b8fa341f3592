// The Backend interface: every computation a model needs, on one device. Models are written once
// against it; the CPU backend always exists, the CUDA backend (and an Ascend slot) plug in here.
//
// Activations are float32 on the CPU, float16 or bfloat16 on the GPU; weights may be float32 or
// bfloat16 on the CPU. Every op takes whole tensors plus the host-side batch description;
// strided access lives inside the kernels.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/forward_batch.h"
#include "engine/kv_cache.h"
#include "engine/tensor.h"
#include "kernels/cpu/sampling.h"

namespace ftengine {

struct RotaryArgs {
  const std::vector<float>* inv_freq = nullptr;  // [rotary_dim / 2], scaling applied
  int32_t rotary_dim = 0;
  bool interleaved = false;  // Meta-checkpoint pair rotation instead of HF's rotate_half
};

// One logits row to sample from: what the generator knows of its sequence.
struct SamplingRow {
  const kernels::cpu::SamplingConfig* config = nullptr;
  const int32_t* history = nullptr;  // prompt and generated ids (repetition penalty)
  int64_t history_length = 0;
  uint64_t seed = 0;  // the request's seed; with `step`, a counter-based draw on the device
  int64_t step = 0;   // tokens generated so far
};

struct AttentionShape {
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  float softmax_scale = 0.f;
  bool causal = true;
};

// What the host tier of the KV cache (CPU-GPU cooperative attention) has cost so far.
struct HostTierStats {
  int64_t layers = 0;             // attention calls that used the host tier
  double cpu_seconds = 0;         // the CPU attention kernel
  double query_wait_seconds = 0;  // the CPU waiting for its queries from the GPU
  double streamed_bytes = 0;      // host-tier K/V copied to the GPU
  double cpu_bytes = 0;           // host-tier K/V the CPU attended over in place
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  virtual int num_threads() const = 0;

  // Memory. from_host converts while copying (float32 or bfloat16 source, either storage type).
  virtual Tensor empty(Shape shape, DType dtype) = 0;
  // Zero-filled: the KV cache, whose slots past a sequence's end kernels may load (and mask).
  virtual Tensor zeros(Shape shape, DType dtype) = 0;
  // Zero-filled host memory this backend's kernels read and write in place (pinned and mapped
  // on a GPU): the host tier of the KV cache. Backends without one refuse.
  virtual Tensor host_tier_zeros(Shape /*shape*/, DType /*dtype*/) {
    throw std::invalid_argument(name() + " has no host tier for the KV cache: it already "
                                "keeps the whole cache in host memory");
  }
  virtual Tensor from_host(const void* data, Shape shape, DType source, DType stored) = 0;
  virtual void to_host_f32(const Tensor& tensor, float* destination) = 0;
  // Stacks same-dtype tensors along their first axis (fusing q/k/v or gate/up at load time).
  virtual Tensor concat_rows(const std::vector<Tensor>& parts) = 0;
  // The dtype activations and the KV cache are kept in on this backend.
  virtual DType activation_dtype() const = 0;
  // The CUDA stream (a cudaStream_t) every op of this backend is queued on, in order; null where
  // ops finish before they return (the CPU). A communicator of device memory orders its
  // collectives against it (Communicator::use_stream).
  virtual void* stream() const { return nullptr; }
  // Returns once every op queued so far has finished: timing work on a queueing backend needs it.
  virtual void synchronize() {}

  // Called by the model once per forward step, before any op of the step. A GPU backend
  // uploads the batch's index arrays here; the ops of the step then read them on the device.
  virtual void begin_step(const ForwardBatch& /*batch*/) {}

  // Runs one forward step of the generator. A backend that can record a step's device work
  // (CUDA graphs) replays the recording for later steps of the same shape instead of launching
  // every kernel again.
  virtual Tensor run_step(const ForwardBatch& /*batch*/, const std::function<Tensor()>& forward) {
    return forward();
  }

  // Picks the next token of every logits row where the logits live. Returns false when this
  // backend has no such sampler; the generator then samples on the host.
  virtual bool sample(const Tensor& /*logits*/, const std::vector<SamplingRow>& /*rows*/,
                      std::vector<int32_t>& /*tokens*/) {
    return false;
  }

  // out[t] = table[ids[t] - first_id], or zeros for ids outside the table's rows (a
  // vocabulary-parallel shard starting at first_id).
  virtual void embedding(const Tensor& table, const std::vector<int32_t>& ids, int64_t first_id,
                         Tensor& out) = 0;
  // out = x · weightᵀ (+ bias); weight is [out_features, in_features] as in HF checkpoints.
  virtual void linear(const Tensor& x, const Tensor& weight, const Tensor* bias, Tensor& out) = 0;
  virtual void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) = 0;
  // x += residual, then out = rmsnorm(x): the pre-norm decoder's residual stream. Backends that
  // fuse the two passes (one read of x instead of three) override it.
  virtual void add_rmsnorm(Tensor& x, const Tensor& residual, const Tensor& weight, float eps,
                           Tensor& out) {
    add_inplace(x, residual);
    rmsnorm(x, weight, eps, out);
  }
  virtual void layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps,
                         Tensor& out) = 0;
  virtual void gelu_inplace(Tensor& x) = 0;
  // dst[:, column : column + src.cols] = src (assembling a fused projection from parts).
  virtual void copy_columns(const Tensor& src, Tensor& dst, int64_t column) = 0;
  virtual void add_inplace(Tensor& x, const Tensor& y) = 0;
  // x[row] += bias for every row.
  virtual void add_bias(Tensor& x, const Tensor& bias) = 0;
  // gate_up = [gate | up] per row; out = silu(gate) * up.
  virtual void silu_mul(const Tensor& gate_up, Tensor& out) = 0;
  virtual void gather_rows(const Tensor& x, const std::vector<int32_t>& rows, Tensor& out) = 0;

  // Rotates q (into q_out) and k of the fused qkv projection and writes k, v into the cache
  // slots of batch.slot_mapping.
  virtual void rotary_cache_write(const Tensor& qkv, const ForwardBatch& batch,
                                  const AttentionShape& shape, const RotaryArgs& rotary,
                                  Tensor& q_out, const LayerKvCache& cache) = 0;
  // Empty when attention() can run a model of this shape over blocks of block_size slots, else
  // why not: checked when a model is built, so a model the kernels cannot serve fails at load
  // with the reason rather than at its first prompt.
  virtual std::string attention_unsupported_reason(const AttentionShape& /*shape*/,
                                                   int32_t /*block_size*/) const {
    return "";
  }

  virtual HostTierStats host_tier_stats() const { return {}; }

  // FastAttention over the paged cache for every sequence of the batch (prefill, chunked
  // prefill and decode alike), over both tiers when the cache has a host tier. lse may be
  // null.
  virtual void attention(const Tensor& q, const ForwardBatch& batch, const AttentionShape& shape,
                         const LayerKvCache& cache, int32_t block_size, Tensor& out,
                         Tensor* lse) = 0;
};

// The CPU backend; num_threads 0 uses every core.
std::unique_ptr<Backend> make_cpu_backend(int num_threads);

// The CUDA backend on one GPU, activations and KV cache in `activation` (float16 or bfloat16);
// decode steps are captured as CUDA graphs and replayed unless `cuda_graphs` is false;
// `attention_kernel` names the FastAttention member every attention call uses ("auto": the
// best for each call); `host_tier_route` where host-tier keys are attended ("auto", "cpu":
// the CPU kernel on `cpu_threads` threads (0: every core), "stream": copied to the GPU).
// Defined only in builds with CUDA (FTENGINE_WITH_CUDA).
std::unique_ptr<Backend> make_cuda_backend(int device, DType activation, bool cuda_graphs,
                                           const std::string& attention_kernel,
                                           const std::string& host_tier_route, int cpu_threads);

}  // namespace ftengine
