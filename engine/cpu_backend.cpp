// The CPU backend: float32 activations, OpenMP for row-parallel kernels, BLAS (blas.h) for the
// matrix products, and the CPU FastAttention kernel.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "engine/backend.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/bfloat16.h"
#include "kernels/cpu/blas.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/rotary.h"

namespace ftengine {

namespace {

namespace kcpu = kernels::cpu;

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

void require_f32(const Tensor& tensor, const char* what) {
  require(tensor.dtype() == DType::kFloat32,
          std::string(what) + " must be float32 on the CPU, got " + tensor.describe());
}

// 64 rows of a 4096-wide bfloat16 weight widen to 1 MiB of float32, about one L2.
constexpr int64_t kBf16PanelRows = 64;

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads)
      : num_threads_(num_threads > 0 ? num_threads : omp_get_num_procs()) {
    kcpu::use_single_threaded_blas();
  }

  Device device() const override { return Device::kCpu; }
  std::string name() const override { return "cpu"; }
  int num_threads() const override { return num_threads_; }
  DType activation_dtype() const override { return DType::kFloat32; }

  Tensor empty(Shape shape, DType dtype) override {
    return Tensor(std::move(shape), dtype, cpu_allocator());
  }

  Tensor zeros(Shape shape, DType dtype) override {
    Tensor tensor = empty(std::move(shape), dtype);
    std::memset(tensor.raw(), 0, tensor.nbytes());
    return tensor;
  }

  Tensor from_host(const void* data, Shape shape, DType source, DType stored) override {
    use_threads();
    Tensor tensor(std::move(shape), stored, cpu_allocator());
    const int64_t count = tensor.numel();
    if (source == stored) {
      std::copy_n(static_cast<const char*>(data), tensor.nbytes(), tensor.data<char>());
    } else if (source == DType::kBFloat16 && stored == DType::kFloat32) {
      kcpu::bf16_to_f32(static_cast<const uint16_t*>(data), count, tensor.data<float>());
    } else if (source == DType::kFloat32 && stored == DType::kBFloat16) {
      kcpu::f32_to_bf16(static_cast<const float*>(data), count, tensor.data<uint16_t>());
    } else {
      throw std::invalid_argument("cannot store " + dtype_name(source) + " data as " +
                                  dtype_name(stored));
    }
    return tensor;
  }

  void to_host_f32(const Tensor& tensor, float* destination) override {
    require_f32(tensor, "to_host_f32 source");
    std::copy_n(tensor.data<float>(), tensor.numel(), destination);
  }

  Tensor concat_rows(const std::vector<Tensor>& parts) override {
    use_threads();
    require(!parts.empty(), "concat_rows needs at least one tensor");
    Shape shape = parts.front().shape();
    shape[0] = 0;
    for (const Tensor& part : parts) {
      require(part.dtype() == parts.front().dtype() && part.rank() == parts.front().rank(),
              "concat_rows parts differ in dtype or rank");
      shape[0] += part.dim(0);
    }
    Tensor stacked(shape, parts.front().dtype(), cpu_allocator());
    char* destination = stacked.data<char>();
    for (const Tensor& part : parts) {
      destination = std::copy_n(part.data<char>(), part.nbytes(), destination);
    }
    return stacked;
  }

  void embedding(const Tensor& table, const std::vector<int32_t>& ids, int64_t first_id,
                 Tensor& out) override {
    use_threads();
    require_f32(out, "embedding output");
    const int64_t rows = static_cast<int64_t>(ids.size()), cols = table.dim(1);
    require(out.numel() == rows * cols, "embedding output has the wrong size");
    if (table.dtype() == DType::kBFloat16) {
      kcpu::embedding_bf16(table.data<uint16_t>(), table.dim(0), first_id, ids.data(), rows, cols,
                           out.data<float>());
    } else {
      require_f32(table, "embedding table");
      kcpu::embedding_f32(table.data<float>(), table.dim(0), first_id, ids.data(), rows, cols,
                          out.data<float>());
    }
  }

  void linear(const Tensor& x, const Tensor& weight, const Tensor* bias, Tensor& out) override {
    use_threads();
    require_f32(x, "linear input");
    require_f32(out, "linear output");
    const int64_t rows = x.dim(0), in_features = x.dim(1), out_features = weight.dim(0);
    require(weight.dim(1) == in_features && out.dim(0) == rows && out.dim(1) == out_features,
            "linear shapes disagree: x " + x.describe() + ", weight " + weight.describe() +
                ", out " + out.describe());
    require(weight.dtype() == DType::kFloat32 || weight.dtype() == DType::kBFloat16,
            "linear weight must be float32 or bfloat16, got " + weight.describe());
    linear_partitioned(x, weight, out);
    if (bias != nullptr) add_bias(out, *bias);
  }

  void add_bias(Tensor& x, const Tensor& bias) override {
    use_threads();
    require_f32(bias, "bias");
    require(bias.numel() == x.dim(-1), "bias of " + bias.describe() + " for " + x.describe());
    kcpu::add_bias(x.data<float>(), bias.data<float>(), x.numel() / x.dim(-1), x.dim(-1));
  }

  void rmsnorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out) override {
    use_threads();
    require_f32(x, "rmsnorm input");
    require_f32(weight, "rmsnorm weight");
    const int64_t cols = x.dim(-1);
    require(weight.numel() == cols, "rmsnorm weight of " + weight.describe() + " for " +
                                        x.describe());
    kcpu::rmsnorm(x.data<float>(), weight.data<float>(), x.numel() / cols, cols, eps,
                  out.data<float>());
  }

  void layernorm(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps,
                 Tensor& out) override {
    use_threads();
    require_f32(x, "layernorm input");
    const int64_t cols = x.dim(-1);
    require(weight.numel() == cols && bias.numel() == cols, "layernorm weight/bias size");
    kcpu::layernorm(x.data<float>(), weight.data<float>(), bias.data<float>(), x.numel() / cols,
                    cols, eps, out.data<float>());
  }

  void gelu_inplace(Tensor& x) override {
    use_threads();
    kcpu::gelu_inplace(x.data<float>(), x.numel());
  }

  void copy_columns(const Tensor& src, Tensor& dst, int64_t column) override {
    require(src.dim(0) == dst.dim(0) && column >= 0 && column + src.dim(1) <= dst.dim(1),
            "copy_columns: " + src.describe() + " does not fit " + dst.describe());
    kcpu::copy_columns(src.data<float>(), src.dim(0), src.dim(1), dst.data<float>(), dst.dim(1),
                       column);
  }

  void add_inplace(Tensor& x, const Tensor& y) override {
    use_threads();
    require(x.numel() == y.numel(), "add_inplace sizes differ");
    kcpu::add_inplace(x.data<float>(), y.data<float>(), x.numel());
  }

  void silu_mul(const Tensor& gate_up, Tensor& out) override {
    use_threads();
    const int64_t cols = out.dim(-1);
    kcpu::silu_mul(gate_up.data<float>(), gate_up.numel() / (2 * cols), cols, out.data<float>());
  }

  void gather_rows(const Tensor& x, const std::vector<int32_t>& rows, Tensor& out) override {
    use_threads();
    kcpu::gather_rows(x.data<float>(), rows.data(), static_cast<int64_t>(rows.size()), x.dim(-1),
                      out.data<float>());
  }

  void rotary_cache_write(const Tensor& qkv, const ForwardBatch& batch,
                          const AttentionShape& shape, const RotaryArgs& rotary, Tensor& q_out,
                          const LayerKvCache& cache) override {
    use_threads();
    kcpu::RotaryCacheWriteParams p;
    p.qkv = qkv.data<float>();
    p.qkv_token_stride = qkv.dim(1);
    p.q_out = q_out.data<float>();
    p.k_cache = cache.k.data<float>();
    p.v_cache = cache.v.data<float>();
    p.block_size = static_cast<int32_t>(cache.k.dim(1));
    p.kv_token_stride = cache.k.dim(2) * cache.k.dim(3);
    p.kv_block_stride = p.block_size * p.kv_token_stride;
    p.kv_head_stride = cache.k.dim(3);
    p.slot_mapping = batch.slot_mapping.data();
    p.positions = batch.positions.data();
    p.inv_freq = rotary.inv_freq->data();
    p.rotary_dim = rotary.rotary_dim;
    p.interleaved = rotary.interleaved;
    p.tokens = batch.num_tokens();
    p.num_heads = shape.num_heads;
    p.num_kv_heads = shape.num_kv_heads;
    p.head_dim = shape.head_dim;
    kcpu::rotary_cache_write(p);
  }

  void attention(const Tensor& q, const ForwardBatch& batch, const AttentionShape& shape,
                 const LayerKvCache& cache, int32_t block_size, Tensor& out,
                 Tensor* lse) override {
    use_threads();
    kcpu::AttentionParams p;
    p.q = q.data<float>();
    p.q_head_stride = shape.head_dim;
    p.q_token_stride = static_cast<int64_t>(shape.num_heads) * shape.head_dim;
    p.out = out.data<float>();
    p.out_head_stride = p.q_head_stride;
    p.out_token_stride = p.q_token_stride;
    p.lse = lse != nullptr ? lse->data<float>() : nullptr;
    p.k_cache = cache.k.data<float>();
    p.v_cache = cache.v.data<float>();
    p.kv_head_stride = shape.head_dim;
    p.kv_token_stride = cache.k.dim(2) * shape.head_dim;
    p.kv_block_stride = block_size * p.kv_token_stride;
    p.block_size = block_size;
    p.block_table = batch.block_table.data();
    p.block_table_stride = batch.block_table_stride;
    p.cu_seqlens_q = batch.cu_seqlens_q.data();
    p.seqlens_kv = batch.seqlens_kv.data();
    p.batch = batch.num_sequences();
    p.num_heads = shape.num_heads;
    p.num_kv_heads = shape.num_kv_heads;
    p.head_dim = shape.head_dim;
    p.softmax_scale = shape.softmax_scale;
    p.causal = shape.causal;
    p.num_threads = num_threads_;
    kcpu::attention(p);
  }

 private:
  // OpenMP's thread count is a per-thread setting: set it for whichever thread calls, so an
  // engine driven from any thread uses its own count and never another backend's.
  void use_threads() const { omp_set_num_threads(num_threads_); }

  // Each thread multiplies x by its own panels of weight rows (output columns) with
  // single-threaded BLAS. bfloat16 panels are widened into a per-thread buffer first, so memory
  // traffic stays that of bfloat16 (blas.h has float32 products only: the wheel's OpenBLAS has
  // no sbgemm).
  void linear_partitioned(const Tensor& x, const Tensor& weight, Tensor& out) {
    const int64_t rows = x.dim(0), in_features = x.dim(1), out_features = weight.dim(0);
    const bool widen = weight.dtype() == DType::kBFloat16;
    // float32: prefill splits the columns evenly across threads. Decode is memory-bound, and
    // two threads streaming equal halves still finish apart (one waits ~10% of the step at the
    // barrier), so decode takes smaller panels on demand: SmolLM2-135M decode on 2 cores went
    // from 42 to 48 tokens/s. bfloat16 panels are sized to stay in L2.
    const int64_t split = rows == 1 ? 4 * num_threads_ : num_threads_;
    const int64_t panel_rows =
        widen ? kBf16PanelRows : (out_features + split - 1) / split;
    const int64_t panels = (out_features + panel_rows - 1) / panel_rows;
    const float* input = x.data<float>();
    float* output = out.data<float>();
    // Per-thread widening buffers, allocated outside the parallel region (an allocation failure
    // inside one would terminate the process) and kept across calls.
    const size_t per_thread = widen ? static_cast<size_t>(panel_rows * in_features) : 0;
    if (widen_scratch_.size() < per_thread * num_threads_) {
      widen_scratch_.resize(per_thread * num_threads_);
    }
#pragma omp parallel
    {
      float* widened = widen_scratch_.data() + per_thread * omp_get_thread_num();
#pragma omp for schedule(dynamic)
      for (int64_t index = 0; index < panels; ++index) {
        const int64_t first = index * panel_rows;
        const int64_t count = std::min(panel_rows, out_features - first);
        const float* panel = nullptr;
        if (widen) {
          const uint16_t* source = weight.data<uint16_t>() + first * in_features;
          for (int64_t i = 0; i < count * in_features; ++i) {
            widened[i] = kernels::bf16_to_float(source[i]);
          }
          panel = widened;
        } else {
          panel = weight.data<float>() + first * in_features;
        }
        if (rows == 1) {  // decode: a matrix-vector product, which sgemm handles poorly
          kcpu::sgemv(false, count, in_features, 1.f, panel, in_features, input, 0.f,
                      output + first);
        } else {
          kcpu::sgemm(false, true, rows, count, in_features, 1.f, input, in_features, panel,
                      in_features, 0.f, output + first, out_features);
        }
      }
    }
  }

  int num_threads_;
  std::vector<float> widen_scratch_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads) {
  return std::make_unique<CpuBackend>(num_threads);
}

}  // namespace ftengine
