// The CUDA backend: the Backend interface on one NVIDIA GPU. Activations and the KV cache are
// float16 or bfloat16, matrix products go through cuBLASLt with float32 accumulation, attention
// through the FastAttention CUDA family (kernels/cuda/attention), everything else through the
// fused row kernels of kernels/cuda/elementwise. All work runs on one stream, in order (an NCCL
// communicator's collectives run on a stream of their own, ordered against this one by events).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/cooperative_attention.h"
#include "engine/cuda/cublaslt_gemm.h"
#include "engine/cuda/cuda_allocator.h"
#include "engine/cuda/cuda_check.h"
#include "kernels/cuda/attention/attention.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/sampling.h"

namespace ftengine {
namespace {

namespace kc = kernels::cuda;
using cuda::check_cuda;

kc::DataType data_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return kc::DataType::kFloat32;
    case DType::kFloat16:
      return kc::DataType::kFloat16;
    case DType::kBFloat16:
      return kc::DataType::kBFloat16;
    case DType::kInt32:
      break;
  }
  throw std::invalid_argument("no CUDA kernels for dtype " + dtype_name(dtype));
}

void require(bool condition, const std::string& what) {
  if (!condition) throw std::invalid_argument("CUDA backend: " + what);
}

// Device copies of one step's index arrays, in one buffer filled by one copy. The addresses stay
// fixed while the capacity suffices, which a captured CUDA graph relies on.
struct DeviceBatch {
  const ForwardBatch* host = nullptr;
  int32_t* token_ids = nullptr;
  int32_t* positions = nullptr;
  int32_t* slot_mapping = nullptr;
  int32_t* cu_seqlens_q = nullptr;
  int32_t* seqlens_kv = nullptr;
  int32_t* block_table = nullptr;
  int32_t* logits_rows = nullptr;
  int32_t block_table_stride = 0;
  int32_t max_seqlen_q = 0;
  int32_t max_seqlen_kv = 0;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, DType activation, bool cuda_graphs, kc::AttentionKernel attention,
              cuda::HostTierRoute host_tier_route, int cpu_threads)
      : device_(device),
        activation_(activation),
        allocator_(device),
        cuda_graphs_(cuda_graphs),
        forced_attention_(attention) {
    require(activation == DType::kBFloat16 || activation == DType::kFloat16,
            "activations must be float16 or bfloat16, got " + dtype_name(activation));
    int count = 0;
    check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    require(device >= 0 && device < count, "no CUDA device " + std::to_string(device) + " (" +
                                               std::to_string(count) + " visible)");
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp properties{};
    check_cuda(cudaGetDeviceProperties(&properties, device), "cudaGetDeviceProperties");
    compute_capability_ = properties.major * 10 + properties.minor;
    device_name_ = properties.name;
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    upload_done_ = make_event();
    sampled_ = make_event();
    // 32 MiB: cuBLASLt's Hopper kernels want a large workspace for split-K and stream-K.
    gemm_workspace_ = byte_buffer(size_t{32} << 20);
    gemm_ = std::make_unique<cuda::CublasLtGemm>(gemm_workspace_.raw(), gemm_workspace_.nbytes());
    cooperative_ = std::make_unique<cuda::CooperativeAttention>(
        allocator_, pinned_allocator_, stream_, host_tier_route, cpu_threads);
  }

  ~CudaBackend() override {
    if (stream_) cudaStreamSynchronize(stream_);
    graphs_.clear();
    gemm_.reset();
    cooperative_.reset();
    if (pinned_) cudaFreeHost(pinned_);
    if (sampling_pinned_) cudaFreeHost(sampling_pinned_);
    if (sampled_ids_pinned_) cudaFreeHost(sampled_ids_pinned_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::kCuda; }
  std::string name() const override { return "cuda:" + std::to_string(device_) + " " + device_name_; }
  int num_threads() const override { return 1; }
  DType activation_dtype() const override { return activation_; }
  void* stream() const override { return stream_; }
  void synchronize() override {
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  Tensor empty(Shape shape, DType dtype) override {
    return Tensor(std::move(shape), dtype, allocator_);
  }

  Tensor zeros(Shape shape, DType dtype) override {
    activate();
    Tensor tensor = empty(std::move(shape), dtype);
    check_cuda(cudaMemsetAsync(tensor.raw(), 0, tensor.nbytes(), stream_), "cudaMemsetAsync");
    return tensor;
  }

  Tensor host_tier_zeros(Shape shape, DType dtype) override {
    activate();
    Tensor tensor(std::move(shape), dtype, pinned_allocator_);
    // Tens of gigabytes at full context: every core clears its share.
    auto* bytes = static_cast<char*>(tensor.raw());
    const int64_t size = static_cast<int64_t>(tensor.nbytes()), piece = int64_t{64} << 20;
#pragma omp parallel for schedule(static)
    for (int64_t offset = 0; offset < size; offset += piece) {
      std::memset(bytes + offset, 0, static_cast<size_t>(std::min(piece, size - offset)));
    }
    return tensor;
  }

  HostTierStats host_tier_stats() const override { return cooperative_->stats(); }

  // Bytes a scratch buffer holds; 0 before its first use (an undefined Tensor has no buffer).
  static size_t capacity(const Tensor& buffer) { return buffer.defined() ? buffer.nbytes() : 0; }

  // A scratch buffer of at least `bytes` bytes.
  Tensor byte_buffer(size_t bytes) {
    return empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::kInt32);
  }

  Tensor from_host(const void* data, Shape shape, DType source, DType stored) override {
    activate();
    require(source == DType::kFloat32 || source == DType::kBFloat16,
            "weights arrive as float32 or bfloat16");
    // Matrices in the activation type (the tensor cores' operands); vectors stay float32 for
    // the norm and bias kernels.
    if (stored == DType::kBFloat16 || stored == DType::kFloat16) stored = activation_;
    Tensor tensor = empty(std::move(shape), stored);
    const size_t source_bytes = static_cast<size_t>(tensor.numel()) * dtype_size(source);
    if (source == stored) {
      check_cuda(cudaMemcpyAsync(tensor.raw(), data, source_bytes, cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpyAsync(weights)");
    } else {
      Tensor staging = byte_buffer(source_bytes);
      check_cuda(cudaMemcpyAsync(staging.raw(), data, source_bytes, cudaMemcpyHostToDevice,
                                 stream_),
                 "cudaMemcpyAsync(weights)");
      kc::convert(staging.raw(), data_type(source), tensor.raw(), data_type(stored),
                  tensor.numel(), stream_);
    }
    // The caller's host buffer may go away when this returns.
    synchronize();
    return tensor;
  }

  void to_host_f32(const Tensor& tensor, float* destination) override {
    activate();
    const size_t bytes = static_cast<size_t>(tensor.numel()) * sizeof(float);
    if (tensor.dtype() == DType::kFloat32) {
      check_cuda(cudaMemcpyAsync(destination, tensor.raw(), bytes, cudaMemcpyDeviceToHost, stream_),
                 "cudaMemcpyAsync(to host)");
    } else {
      Tensor widened = empty(tensor.shape(), DType::kFloat32);
      kc::convert(tensor.raw(), data_type(tensor.dtype()), widened.raw(), kc::DataType::kFloat32,
                  tensor.numel(), stream_);
      check_cuda(cudaMemcpyAsync(destination, widened.raw(), bytes, cudaMemcpyDeviceToHost,
                                 stream_),
                 "cudaMemcpyAsync(to host)");
    }
    synchronize();
  }

  Tensor concat_rows(const std::vector<Tensor>& parts) override {
    activate();
    require(!parts.empty(), "concat_rows of nothing");
    Shape shape = parts.front().shape();
    shape[0] = 0;
    for (const Tensor& part : parts) shape[0] += part.dim(0);
    Tensor out = empty(shape, parts.front().dtype());
    size_t offset = 0;
    for (const Tensor& part : parts) {
      check_cuda(cudaMemcpyAsync(static_cast<char*>(out.raw()) + offset, part.raw(), part.nbytes(),
                                 cudaMemcpyDeviceToDevice, stream_),
                 "cudaMemcpyAsync(concat)");
      offset += part.nbytes();
    }
    return out;
  }

  void begin_step(const ForwardBatch& batch) override {
    activate();
    stage_indices(batch);
    check_cuda(cudaMemcpyAsync(indices_.raw(), pinned_, staged_bytes_, cudaMemcpyHostToDevice,
                               stream_),
               "cudaMemcpyAsync(batch)");
    cooperative_->plan(batch);
    if (!capturing_) {
      check_cuda(cudaEventRecord(upload_done_.get(), stream_), "cudaEventRecord");
    }
  }

  // Decode steps (one token per sequence) of up to kMaxGraphTokens sequences run as CUDA graphs:
  // the first step of a shape runs eagerly (sizing every buffer and cuBLASLt plan), then is
  // recorded; later steps of that shape write their indices into the pinned buffer the
  // recording uploads from and replay it. A shape is (sequences, block-table width rounded up
  // to a power of two), so a long generation records a handful of graphs. A tensor-parallel
  // step's NCCL collectives are recorded with it (NCCL supports stream capture: its kernels
  // become graph nodes on its stream, forked from and joined to this one by events), which
  // keeps the launch-bound decode step one graph launch on every rank; every rank records and
  // replays the same steps in the same order, so the replayed collectives pair up as launched
  // ones would.
  Tensor run_step(const ForwardBatch& batch, const std::function<Tensor()>& forward) override {
    activate();
    // A step over the host tier copies and plans per step on the host (and may wait for the
    // CPU inside every layer): nothing to record, and its attention takes far longer than
    // launching its kernels.
    if (batch.uses_host_tier()) return forward();
    const int64_t n = batch.num_tokens();
    const bool recordable = n > 0 && n <= kMaxGraphTokens && n == batch.num_sequences() &&
                            static_cast<int64_t>(batch.logits_rows.size()) == n;
    if (!recordable) return forward();
    // Decode steps use the recording layout (padded block table, split-KV planned for its
    // width) with or without graphs, so both paths run the same kernels on the same plan and
    // give bit-identical results. Steps outside run_step (prompt scoring) keep the plain one.
    struct LayoutScope {
      bool& flag;
      explicit LayoutScope(bool& f) : flag(f) { flag = true; }
      ~LayoutScope() { flag = false; }
    } layout(graph_layout_);
    if (!cuda_graphs_) return forward();
    if (allocator_.free_count() != graphs_free_count_ || graphs_.size() >= kMaxGraphs) {
      graphs_.clear();  // a recorded address may have been freed and reused since
    }
    const GraphKey key{n, padded_stride(batch)};
    auto found = graphs_.find(key);
    if (found != graphs_.end()) {
      stage_indices(batch);
      check_cuda(cudaGraphLaunch(found->second.exec.get(), stream_), "cudaGraphLaunch");
      check_cuda(cudaEventRecord(upload_done_.get(), stream_), "cudaEventRecord");
      return found->second.logits;
    }
    // The first step of a shape may grow a workspace, freeing the old buffer that recordings of
    // other shapes point at: those go, and this shape records on the grown one.
    const uint64_t frees_before = allocator_.free_count();
    Tensor logits = forward();
    if (allocator_.free_count() != frees_before) graphs_.clear();
    RecordedStep recorded;
    recorded.exec = record([&] { recorded.logits = forward(); });
    if (recorded.logits.raw() != logits.raw()) {
      throw std::logic_error("CUDA backend: a recorded step returned another logits buffer");
    }
    graphs_free_count_ = allocator_.free_count();
    graphs_.emplace(key, std::move(recorded));
    return logits;
  }

  bool sample(const Tensor& logits, const std::vector<SamplingRow>& rows,
              std::vector<int32_t>& tokens) override {
    activate();
    const int32_t n = static_cast<int32_t>(rows.size());
    tokens.resize(rows.size());
    if (n == 0) return true;
    const int32_t vocab = static_cast<int32_t>(logits.dim(1));
    require(logits.dtype() == DType::kFloat32, "logits must be float32");
    // Per-row settings in one pinned block, uploaded with one copy: floats, ints, seeds, steps,
    // history offsets, then the histories when some row has a repetition penalty.
    bool penalised = false;
    int64_t history_total = 0;
    for (const SamplingRow& row : rows) {
      penalised |= row.config->repetition_penalty != 1.f;
      history_total += row.history_length;
    }
    if (!penalised) history_total = 0;
    const size_t words = 4 * static_cast<size_t>(n) + 4 * static_cast<size_t>(n) +
                         static_cast<size_t>(n) + 1 + static_cast<size_t>(history_total);
    ensure_sampling_capacity(words * sizeof(int32_t), n, vocab);
    check_cuda(cudaEventSynchronize(sampled_.get()), "cudaEventSynchronize");
    auto* host = static_cast<int32_t*>(sampling_pinned_);
    auto* floats = reinterpret_cast<float*>(host);
    float* temperature = floats;
    float* top_p = floats + n;
    float* penalty = floats + 2 * n;
    int32_t* top_k = host + 3 * n;
    auto* seeds = reinterpret_cast<uint64_t*>(host + 4 * n);
    auto* steps = reinterpret_cast<int64_t*>(host + 6 * n);
    int32_t* offsets = host + 8 * n;
    int32_t* history = offsets + n + 1;
    offsets[0] = 0;
    for (int32_t r = 0; r < n; ++r) {
      const SamplingRow& row = rows[r];
      temperature[r] = row.config->temperature;
      top_p[r] = row.config->top_p;
      penalty[r] = row.config->repetition_penalty;
      top_k[r] = row.config->top_k;
      seeds[r] = row.seed;
      steps[r] = row.step;
      const int64_t length = penalised ? row.history_length : 0;
      std::memcpy(history + offsets[r], row.history, length * sizeof(int32_t));
      offsets[r + 1] = offsets[r] + static_cast<int32_t>(length);
    }
    auto* device = sampling_inputs_.data<int32_t>();
    check_cuda(cudaMemcpyAsync(device, host, words * sizeof(int32_t), cudaMemcpyHostToDevice,
                               stream_),
               "cudaMemcpyAsync(sampling)");
    kc::SamplingParams p;
    p.logits = logits.data<float>();
    p.logits_row_stride = vocab;
    p.rows = n;
    p.vocab = vocab;
    p.temperature = reinterpret_cast<const float*>(device);
    p.top_p = reinterpret_cast<const float*>(device + n);
    p.repetition_penalty = reinterpret_cast<const float*>(device + 2 * n);
    p.top_k = device + 3 * n;
    p.seeds = reinterpret_cast<const uint64_t*>(device + 4 * n);
    p.steps = reinterpret_cast<int64_t*>(device + 6 * n);
    if (penalised) {
      p.history_offsets = device + 8 * n;
      p.history = device + 9 * n + 1;
    }
    p.out_ids = sampled_ids_.data<int32_t>();
    kc::run_sampling(p, sampling_workspace_.raw(), sampling_workspace_.nbytes(), stream_);
    check_cuda(cudaMemcpyAsync(sampled_ids_pinned_, p.out_ids, n * sizeof(int32_t),
                               cudaMemcpyDeviceToHost, stream_),
               "cudaMemcpyAsync(tokens)");
    check_cuda(cudaEventRecord(sampled_.get(), stream_), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(sampled_.get()), "cudaEventSynchronize");
    std::memcpy(tokens.data(), sampled_ids_pinned_, n * sizeof(int32_t));
    return true;
  }

  void embedding(const Tensor& table, const std::vector<int32_t>& ids, int64_t first_id,
                 Tensor& out) override {
    kc::embedding(table.raw(), table.dim(0), first_id, device_indices(ids),
                  static_cast<int64_t>(ids.size()), table.dim(1), data_type(table.dtype()),
                  out.raw(), stream_);
  }

  void linear(const Tensor& x, const Tensor& weight, const Tensor* bias, Tensor& out) override {
    require(x.dtype() == weight.dtype(), "linear of " + x.describe() + " and " + weight.describe());
    const int64_t k = weight.dim(1);
    const int64_t m = x.numel() / k, n = weight.dim(0);
    gemm_->linear(x.raw(), weight.raw(), out.raw(), m, n, k, x.dtype(), out.dtype(), stream_);
    if (bias) add_bias(out, *bias);
  }

  void add_bias(Tensor& x, const Tensor& bias) override {
    const int64_t cols = bias.numel();
    kc::add_bias(x.raw(), bias.data<float>(), x.numel() / cols, cols, data_type(x.dtype()),
                 stream_);
  }

  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    const int64_t cols = weight.numel();
    kc::add_rmsnorm(x.raw(), nullptr, weight.data<float>(), x.numel() / cols, cols, eps,
                    data_type(x.dtype()), out.raw(), stream_);
  }

  void add_rmsnorm(Tensor& x, const Tensor& residual, const Tensor& weight, float eps,
                   Tensor& out) override {
    const int64_t cols = weight.numel();
    kc::add_rmsnorm(x.raw(), residual.raw(), weight.data<float>(), x.numel() / cols, cols, eps,
                    data_type(x.dtype()), out.raw(), stream_);
  }

  void layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps,
                 Tensor& out) override {
    const int64_t cols = weight.numel();
    kc::layernorm(x.raw(), weight.data<float>(), bias.data<float>(), x.numel() / cols, cols, eps,
                  data_type(x.dtype()), out.raw(), stream_);
  }

  void gelu_inplace(Tensor& x) override {
    kc::gelu_inplace(x.raw(), x.numel(), data_type(x.dtype()), stream_);
  }

  void copy_columns(const Tensor& src, Tensor& dst, int64_t column) override {
    kc::copy_columns(src.raw(), src.dim(0), src.numel() / src.dim(0), dst.raw(),
                     dst.numel() / dst.dim(0), column, data_type(src.dtype()), stream_);
  }

  void add_inplace(Tensor& x, const Tensor& y) override {
    kc::add_inplace(x.raw(), y.raw(), x.numel(), data_type(x.dtype()), stream_);
  }

  void silu_mul(const Tensor& gate_up, Tensor& out) override {
    const int64_t cols = out.numel() / out.dim(0);
    kc::silu_mul(gate_up.raw(), out.dim(0), cols, data_type(out.dtype()), out.raw(), stream_);
  }

  void gather_rows(const Tensor& x, const std::vector<int32_t>& rows, Tensor& out) override {
    kc::gather_rows(x.raw(), device_indices(rows), static_cast<int64_t>(rows.size()),
                    x.numel() / x.dim(0), data_type(x.dtype()), out.raw(), stream_);
  }

  void rotary_cache_write(const Tensor& qkv, const ForwardBatch& batch,
                          const AttentionShape& shape, const RotaryArgs& rotary, Tensor& q_out,
                          const LayerKvCache& cache) override {
    require_current(batch);
    kc::RotaryCacheWriteParams p;
    p.type = data_type(qkv.dtype());
    p.qkv = qkv.raw();
    p.qkv_token_stride = qkv.numel() / std::max<int64_t>(qkv.dim(0), 1);
    p.tokens = batch.num_tokens();
    p.positions = batch_.positions;
    p.slot_mapping = batch_.slot_mapping;
    p.inv_freq = inv_freq_on_device(*rotary.inv_freq);
    p.rotary_dim = rotary.rotary_dim;
    p.interleaved = rotary.interleaved;
    p.num_heads = shape.num_heads;
    p.num_kv_heads = shape.num_kv_heads;
    p.head_dim = shape.head_dim;
    p.q_out = q_out.raw();
    p.k_cache = cache.k.raw();
    p.v_cache = cache.v.raw();
    p.kv_token_stride = static_cast<int64_t>(shape.num_kv_heads) * shape.head_dim;
    p.kv_block_stride = cache.k.dim(1) * p.kv_token_stride;
    p.kv_head_stride = shape.head_dim;
    p.block_size = static_cast<int32_t>(cache.k.dim(1));
    if (cache.k_host.defined()) {
      p.k_cache_host = cache.k_host.raw();
      p.v_cache_host = cache.v_host.raw();
      p.host_first_block = cache.host_first_block;
    }
    kc::rotary_cache_write(p, stream_);
  }

  std::string attention_unsupported_reason(const AttentionShape& shape,
                                           int32_t block_size) const override {
    // A stand-in call with the model's shapes: prefill (several queries) and decode (one).
    alignas(16) static const char dummy[16] = {};
    kc::AttentionParams p = shape_params(shape, block_size, activation_);
    p.q = p.out = const_cast<char*>(dummy);
    p.k_cache = p.v_cache = dummy;
    p.kv_num_blocks = 1;
    p.block_table = p.cu_seqlens_q = p.seqlens_kv = reinterpret_cast<const int32_t*>(dummy);
    p.block_table_stride = 1;
    p.batch = 1;
    p.max_seqlen_kv = block_size;
    for (const int32_t queries : {2, 1}) {
      p.max_seqlen_q = queries;
      const kc::AttentionKernel kernel = kernel_for(p);
      const std::string reason = kc::attention_unsupported_reason(p, kernel, compute_capability_);
      if (!reason.empty()) return std::string(kc::attention_kernel_name(kernel)) + ": " + reason;
    }
    return "";
  }

  void attention(const Tensor& q, const ForwardBatch& batch, const AttentionShape& shape,
                 const LayerKvCache& cache, int32_t block_size, Tensor& out,
                 Tensor* lse) override {
    require_current(batch);
    kc::AttentionParams p = shape_params(shape, block_size, q.dtype());
    p.q = q.raw();
    p.out = out.raw();
    p.lse = lse ? lse->data<float>() : nullptr;
    p.k_cache = cache.k.raw();
    p.v_cache = cache.v.raw();
    p.kv_num_blocks = static_cast<int32_t>(cache.k.dim(0));
    p.block_table = batch_.block_table;
    p.block_table_stride = batch_.block_table_stride;
    p.cu_seqlens_q = batch_.cu_seqlens_q;
    p.seqlens_kv = batch_.seqlens_kv;
    p.batch = batch.num_sequences();
    p.max_seqlen_q = batch_.max_seqlen_q;
    // A recorded step keeps its grid: it plans for the whole width of its block table.
    p.max_seqlen_kv = graph_layout_ ? batch_.block_table_stride * block_size : batch_.max_seqlen_kv;
    if (cooperative_->active()) {
      cooperative_->run(p, cache, [&](const kc::AttentionParams& call) { run_attention(call); });
    } else {
      run_attention(p);
    }
  }

 private:
  // One call of the FastAttention member these params get.
  void run_attention(const kc::AttentionParams& p) {
    const kc::AttentionKernel kernel = kernel_for(p);
    const size_t workspace_bytes =
        kc::attention_workspace_bytes(p, kernel, compute_capability_);
    if (workspace_bytes > capacity(attention_workspace_)) {
      attention_workspace_ = byte_buffer(workspace_bytes);
    }
    kc::run_attention(p, kernel, attention_workspace_.raw(), capacity(attention_workspace_),
                      stream_);
  }

  // The params fields a model's attention shape decides: q, out and the cache are packed
  // [token][head][dim] (cache blocks [slot][kv_head][dim]).
  static kc::AttentionParams shape_params(const AttentionShape& shape, int32_t block_size,
                                          DType dtype) {
    kc::AttentionParams p;
    p.dtype = dtype == DType::kFloat16 ? kc::ElementType::kFloat16 : kc::ElementType::kBFloat16;
    p.q_head_stride = p.out_head_stride = p.kv_head_stride = shape.head_dim;
    p.q_token_stride = p.out_token_stride = int64_t{shape.num_heads} * shape.head_dim;
    p.kv_token_stride = int64_t{shape.num_kv_heads} * shape.head_dim;
    p.kv_block_stride = block_size * p.kv_token_stride;
    p.block_size = block_size;
    p.num_heads = shape.num_heads;
    p.num_kv_heads = shape.num_kv_heads;
    p.head_dim = shape.head_dim;
    p.softmax_scale = shape.softmax_scale;
    p.causal = shape.causal;
    return p;
  }

  // The member a call runs: the forced one, or the best for these params.
  kc::AttentionKernel kernel_for(const kc::AttentionParams& p) const {
    return forced_attention_ != kc::AttentionKernel::kAuto
               ? forced_attention_
               : kc::choose_attention_kernel(p, compute_capability_);
  }

  struct EventDeleter {
    void operator()(cudaEvent_t event) const { cudaEventDestroy(event); }
  };
  using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDeleter>;
  static Event make_event() {
    cudaEvent_t event = nullptr;
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    return Event(event);
  }

  // The current device is per host thread, and another engine (or a Python thread that drives
  // this one) may have switched it: every entry point that launches work selects ours first.
  // The ops of a step run on the thread of its begin_step.
  void activate() const { check_cuda(cudaSetDevice(device_), "cudaSetDevice"); }

  struct GraphExecDeleter {
    void operator()(cudaGraphExec_t exec) const { cudaGraphExecDestroy(exec); }
  };
  using GraphExec = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDeleter>;
  struct RecordedStep {
    GraphExec exec;
    Tensor logits;  // where the replay leaves its logits
  };
  using GraphKey = std::pair<int64_t, int32_t>;  // (sequences, block-table stride)
  static constexpr int64_t kMaxGraphTokens = 128;
  static constexpr size_t kMaxGraphs = 64;

  // Records the device work `body` launches on the stream (nothing runs) as an executable graph.
  GraphExec record(const std::function<void()>& body) {
    // Relaxed: host-side bookkeeping (the caching allocator) may run while recording.
    check_cuda(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed),
               "cudaStreamBeginCapture");
    capturing_ = true;
    cudaGraph_t graph = nullptr;
    try {
      body();
    } catch (...) {
      capturing_ = false;
      cudaStreamEndCapture(stream_, &graph);
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    capturing_ = false;
    check_cuda(cudaStreamEndCapture(stream_, &graph), "cudaStreamEndCapture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check_cuda(status, "cudaGraphInstantiate");
    return GraphExec(exec);
  }

  // The block-table width a recorded step is planned for: the batch's, rounded up to a power
  // of two so a generation crossing block boundaries reuses recordings.
  int32_t padded_stride(const ForwardBatch& batch) const {
    int32_t stride = 1;
    while (stride < batch.block_table_stride) stride *= 2;
    return stride;
  }

  // Writes the batch's index arrays into the pinned staging buffer and points batch_ at their
  // device places; the upload itself is begin_step's, or a replayed graph's.
  void stage_indices(const ForwardBatch& b) {
    const int32_t n = b.num_sequences();
    const int32_t stride = graph_layout_ ? padded_stride(b) : b.block_table_stride;
    const size_t count = b.token_ids.size() + b.positions.size() + b.slot_mapping.size() +
                         b.cu_seqlens_q.size() + b.seqlens_kv.size() +
                         static_cast<size_t>(n) * stride + b.logits_rows.size();
    const size_t bytes = std::max<size_t>(count, 1) * sizeof(int32_t);
    if (bytes > index_capacity_bytes_) {
      if (capturing_) throw std::logic_error("CUDA backend: index buffer grew while recording");
      synchronize();  // the old buffers may still be in flight
      if (pinned_) cudaFreeHost(pinned_);
      pinned_ = nullptr;
      index_capacity_bytes_ = std::max(bytes, 2 * index_capacity_bytes_);
      check_cuda(cudaMallocHost(&pinned_, index_capacity_bytes_), "cudaMallocHost");
      indices_ = byte_buffer(index_capacity_bytes_);
      graphs_.clear();  // recorded uploads point at the old buffers
    } else if (!capturing_) {
      // The previous upload out of the pinned buffer must be done before it is rewritten.
      check_cuda(cudaEventSynchronize(upload_done_.get()), "cudaEventSynchronize");
    }
    int32_t* host = static_cast<int32_t*>(pinned_);
    int32_t* device = indices_.data<int32_t>();
    size_t offset = 0;
    auto place = [&](const std::vector<int32_t>& values) {
      std::memcpy(host + offset, values.data(), values.size() * sizeof(int32_t));
      int32_t* where = device + offset;
      offset += values.size();
      return where;
    };
    batch_ = DeviceBatch{};
    batch_.host = &b;
    batch_.token_ids = place(b.token_ids);
    batch_.positions = place(b.positions);
    batch_.slot_mapping = place(b.slot_mapping);
    batch_.cu_seqlens_q = place(b.cu_seqlens_q);
    batch_.seqlens_kv = place(b.seqlens_kv);
    batch_.block_table = device + offset;
    batch_.block_table_stride = stride;
    for (int32_t s = 0; s < n; ++s) {
      const int32_t* row = b.block_table.data() + static_cast<size_t>(s) * b.block_table_stride;
      std::memcpy(host + offset, row, b.block_table_stride * sizeof(int32_t));
      std::fill(host + offset + b.block_table_stride, host + offset + stride, 0);
      offset += stride;
    }
    batch_.logits_rows = place(b.logits_rows);
    for (int32_t s = 0; s < n; ++s) {
      batch_.max_seqlen_q = std::max(batch_.max_seqlen_q, b.cu_seqlens_q[s + 1] - b.cu_seqlens_q[s]);
      batch_.max_seqlen_kv = std::max(batch_.max_seqlen_kv, b.seqlens_kv[s]);
    }
    staged_bytes_ = offset * sizeof(int32_t);
  }

  void ensure_sampling_capacity(size_t input_bytes, int32_t rows, int32_t vocab) {
    if (input_bytes > capacity(sampling_inputs_)) {
      check_cuda(cudaEventSynchronize(sampled_.get()), "cudaEventSynchronize");
      if (sampling_pinned_) cudaFreeHost(sampling_pinned_);
      sampling_pinned_ = nullptr;
      const size_t bytes = std::max(input_bytes, 2 * capacity(sampling_inputs_));
      check_cuda(cudaMallocHost(&sampling_pinned_, bytes), "cudaMallocHost");
      sampling_inputs_ = byte_buffer(bytes);
    }
    if (static_cast<size_t>(rows) * sizeof(int32_t) > capacity(sampled_ids_)) {
      if (sampled_ids_pinned_) cudaFreeHost(sampled_ids_pinned_);
      sampled_ids_pinned_ = nullptr;
      sampled_ids_ = byte_buffer(2 * rows * sizeof(int32_t));
      check_cuda(cudaMallocHost(&sampled_ids_pinned_, sampled_ids_.nbytes()), "cudaMallocHost");
    }
    const size_t workspace = kc::sampling_workspace_bytes(rows, vocab);
    if (workspace > capacity(sampling_workspace_)) sampling_workspace_ = byte_buffer(workspace);
  }

  void require_current(const ForwardBatch& batch) const {
    if (batch_.host != &batch) {
      throw std::logic_error("CUDA backend: an op ran with a batch begin_step() did not upload");
    }
  }

  // The device copy of one of the current batch's index arrays. Ops receive the host vectors
  // (the Backend interface is device-neutral) and find their uploaded copies by identity.
  const int32_t* device_indices(const std::vector<int32_t>& values) const {
    const ForwardBatch* b = batch_.host;
    if (b) {
      if (&values == &b->token_ids) return batch_.token_ids;
      if (&values == &b->positions) return batch_.positions;
      if (&values == &b->logits_rows) return batch_.logits_rows;
      if (&values == &b->slot_mapping) return batch_.slot_mapping;
    }
    throw std::logic_error("CUDA backend: index array is not part of the step's batch");
  }

  // Rotary frequencies are per model: uploaded on first use and kept.
  const float* inv_freq_on_device(const std::vector<float>& inv_freq) {
    if (inv_freq_host_ != &inv_freq) {
      inv_freq_ = empty({static_cast<int64_t>(inv_freq.size())}, DType::kFloat32);
      check_cuda(cudaMemcpyAsync(inv_freq_.raw(), inv_freq.data(), inv_freq.size() * sizeof(float),
                                 cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpyAsync(inv_freq)");
      synchronize();
      inv_freq_host_ = &inv_freq;
    }
    return inv_freq_.data<float>();
  }

  int device_;
  DType activation_;
  int compute_capability_ = 0;
  std::string device_name_;
  cuda::CachingDeviceAllocator allocator_;
  cuda::PinnedHostAllocator pinned_allocator_;
  cudaStream_t stream_ = nullptr;
  Tensor gemm_workspace_;
  std::unique_ptr<cuda::CublasLtGemm> gemm_;
  Tensor attention_workspace_;
  // Step indices: pinned host staging, its device twin, and the event that frees the staging.
  void* pinned_ = nullptr;
  size_t index_capacity_bytes_ = 0;
  Tensor indices_;
  Event upload_done_;
  DeviceBatch batch_;
  size_t staged_bytes_ = 0;
  // CUDA graphs of decode steps.
  bool cuda_graphs_;
  kc::AttentionKernel forced_attention_;  // kAuto: the best member for each call
  bool graph_layout_ = false;  // this step's indices are laid out for a recording
  bool capturing_ = false;
  std::map<GraphKey, RecordedStep> graphs_;
  uint64_t graphs_free_count_ = 0;
  // Device sampling: per-row settings (pinned staging and device twin), chosen ids.
  void* sampling_pinned_ = nullptr;
  Tensor sampling_inputs_;
  Tensor sampling_workspace_;
  Tensor sampled_ids_;
  void* sampled_ids_pinned_ = nullptr;
  Event sampled_;
  const std::vector<float>* inv_freq_host_ = nullptr;
  Tensor inv_freq_;
  std::unique_ptr<cuda::CooperativeAttention> cooperative_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device, DType activation, bool cuda_graphs,
                                           const std::string& attention_kernel,
                                           const std::string& host_tier_route, int cpu_threads) {
  return std::make_unique<CudaBackend>(device, activation, cuda_graphs,
                                       kc::parse_attention_kernel(attention_kernel),
                                       cuda::parse_host_tier_route(host_tier_route), cpu_threads);
}

}  // namespace ftengine
