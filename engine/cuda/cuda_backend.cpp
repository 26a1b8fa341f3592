// The CUDA backend: the Backend interface on one NVIDIA GPU. Activations and the KV cache are
// float16 or bfloat16, matrix products go through cuBLASLt with float32 accumulation, attention
// through the FastAttention CUDA family (kernels/cuda/attention), everything else through the
// fused row kernels of kernels/cuda/elementwise. All work runs on one stream, in order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/cublaslt_gemm.h"
#include "engine/cuda/cuda_allocator.h"
#include "engine/cuda/cuda_check.h"
#include "kernels/cuda/attention/attention.h"
#include "kernels/cuda/elementwise.h"

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
  int32_t max_seqlen_q = 0;
  int32_t max_seqlen_kv = 0;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, DType activation)
      : device_(device), activation_(activation), allocator_(device) {
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
    // 32 MiB: cuBLASLt's Hopper kernels want a large workspace for split-K and stream-K.
    gemm_workspace_ = byte_buffer(size_t{32} << 20);
    gemm_ = std::make_unique<cuda::CublasLtGemm>(gemm_workspace_.raw(), gemm_workspace_.nbytes());
  }

  ~CudaBackend() override {
    if (stream_) cudaStreamSynchronize(stream_);
    gemm_.reset();
    if (pinned_) cudaFreeHost(pinned_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::kCuda; }
  std::string name() const override { return "cuda:" + std::to_string(device_) + " " + device_name_; }
  int num_threads() const override { return 1; }
  DType activation_dtype() const override { return activation_; }

  Tensor empty(Shape shape, DType dtype) override {
    return Tensor(std::move(shape), dtype, allocator_);
  }

  Tensor zeros(Shape shape, DType dtype) override {
    Tensor tensor = empty(std::move(shape), dtype);
    check_cuda(cudaMemsetAsync(tensor.raw(), 0, tensor.nbytes(), stream_), "cudaMemsetAsync");
    return tensor;
  }

  // A scratch buffer of at least `bytes` bytes.
  Tensor byte_buffer(size_t bytes) {
    return empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::kInt32);
  }

  Tensor from_host(const void* data, Shape shape, DType source, DType stored) override {
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
    const ForwardBatch& b = batch;
    const size_t count = b.token_ids.size() + b.positions.size() + b.slot_mapping.size() +
                         b.cu_seqlens_q.size() + b.seqlens_kv.size() + b.block_table.size() +
                         b.logits_rows.size();
    const size_t bytes = std::max<size_t>(count, 1) * sizeof(int32_t);
    if (bytes > index_capacity_bytes_) {
      synchronize();  // the old pinned buffer may still be in flight
      if (pinned_) cudaFreeHost(pinned_);
      pinned_ = nullptr;
      index_capacity_bytes_ = std::max(bytes, 2 * index_capacity_bytes_);
      check_cuda(cudaMallocHost(&pinned_, index_capacity_bytes_), "cudaMallocHost");
      indices_ = empty({static_cast<int64_t>(index_capacity_bytes_ / sizeof(int32_t))},
                       DType::kInt32);
    } else {
      // The previous step's copy out of the pinned buffer must be done before it is rewritten.
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
    batch_.host = &batch;
    batch_.token_ids = place(b.token_ids);
    batch_.positions = place(b.positions);
    batch_.slot_mapping = place(b.slot_mapping);
    batch_.cu_seqlens_q = place(b.cu_seqlens_q);
    batch_.seqlens_kv = place(b.seqlens_kv);
    batch_.block_table = place(b.block_table);
    batch_.logits_rows = place(b.logits_rows);
    for (int32_t s = 0; s < b.num_sequences(); ++s) {
      batch_.max_seqlen_q = std::max(batch_.max_seqlen_q, b.cu_seqlens_q[s + 1] - b.cu_seqlens_q[s]);
      batch_.max_seqlen_kv = std::max(batch_.max_seqlen_kv, b.seqlens_kv[s]);
    }
    check_cuda(cudaMemcpyAsync(device, host, offset * sizeof(int32_t), cudaMemcpyHostToDevice,
                               stream_),
               "cudaMemcpyAsync(batch)");
    check_cuda(cudaEventRecord(upload_done_.get(), stream_), "cudaEventRecord");
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
    kc::rotary_cache_write(p, stream_);
  }

  void attention(const Tensor& q, const ForwardBatch& batch, const AttentionShape& shape,
                 const LayerKvCache& cache, int32_t block_size, Tensor& out,
                 Tensor* lse) override {
    require_current(batch);
    kc::AttentionParams p;
    p.dtype = q.dtype() == DType::kFloat16 ? kc::ElementType::kFloat16 : kc::ElementType::kBFloat16;
    p.q = q.raw();
    p.q_head_stride = shape.head_dim;
    p.q_token_stride = static_cast<int64_t>(shape.num_heads) * shape.head_dim;
    p.out = out.raw();
    p.out_head_stride = p.q_head_stride;
    p.out_token_stride = p.q_token_stride;
    p.lse = lse ? lse->data<float>() : nullptr;
    p.k_cache = cache.k.raw();
    p.v_cache = cache.v.raw();
    p.kv_head_stride = shape.head_dim;
    p.kv_token_stride = static_cast<int64_t>(shape.num_kv_heads) * shape.head_dim;
    p.kv_block_stride = block_size * p.kv_token_stride;
    p.block_size = block_size;
    p.block_table = batch_.block_table;
    p.block_table_stride = batch.block_table_stride;
    p.cu_seqlens_q = batch_.cu_seqlens_q;
    p.seqlens_kv = batch_.seqlens_kv;
    p.batch = batch.num_sequences();
    p.max_seqlen_q = batch_.max_seqlen_q;
    p.max_seqlen_kv = batch_.max_seqlen_kv;
    p.num_heads = shape.num_heads;
    p.num_kv_heads = shape.num_kv_heads;
    p.head_dim = shape.head_dim;
    p.softmax_scale = shape.softmax_scale;
    p.causal = shape.causal;
    const kc::AttentionKernel kernel = kc::choose_attention_kernel(p, compute_capability_);
    const size_t workspace_bytes =
        kc::attention_workspace_bytes(p, kernel, compute_capability_);
    if (workspace_bytes > attention_workspace_.nbytes()) {
      attention_workspace_ = byte_buffer(workspace_bytes);
    }
    kc::run_attention(p, kernel, attention_workspace_.raw(), attention_workspace_.nbytes(),
                      stream_);
  }

 private:
  struct EventDeleter {
    void operator()(cudaEvent_t event) const { cudaEventDestroy(event); }
  };
  using Event = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDeleter>;
  static Event make_event() {
    cudaEvent_t event = nullptr;
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    return Event(event);
  }

  void synchronize() { check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

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
  const std::vector<float>* inv_freq_host_ = nullptr;
  Tensor inv_freq_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device, DType activation) {
  return std::make_unique<CudaBackend>(device, activation);
}

}  // namespace ftengine
