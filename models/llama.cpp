#include "models/llama.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>

#include "models/rope.h"
#include "models/workspace.h"

namespace ftengine::models {

namespace {

std::string layer_prefix(int layer) { return "model.layers." + std::to_string(layer) + "."; }

// q, k, v become one projection and gate, up another, so each is a single matrix product.
Tensor take_stacked(Backend& backend, WeightStore& weights, const std::vector<std::string>& names) {
  std::vector<Tensor> parts;
  for (const auto& name : names) parts.push_back(weights.take(name));
  return parts.size() == 1 ? parts.front() : backend.concat_rows(parts);
}

// How the model splits over tensor-parallel ranks (Megatron-style): attention heads, the MLP's
// intermediate size and the vocabulary are divided; when there are fewer KV heads than ranks,
// each KV head is replicated on tp / kv_heads consecutive ranks.
struct ShardPlan {
  int rank = 0, size = 1;
  int32_t heads = 0;         // query heads on this rank
  int32_t kv_heads = 0;      // KV heads on this rank
  int32_t first_head = 0;    // first query head
  int32_t first_kv_head = 0;
  int32_t intermediate = 0;  // MLP width on this rank
  int32_t vocab = 0;         // vocabulary rows on this rank
  int32_t first_token = 0;   // first vocabulary id on this rank

  ShardPlan(const ModelConfig& c, const TensorParallel& parallel)
      : rank(parallel.rank), size(parallel.size) {
    auto require = [&](bool ok, const std::string& what) {
      if (!ok) {
        throw std::invalid_argument("cannot split the model over " + std::to_string(size) +
                                    " tensor-parallel ranks: " + what);
      }
    };
    require(size >= 1 && rank >= 0 && rank < size, "rank out of range");
    require(c.num_heads % size == 0, std::to_string(c.num_heads) +
                                         " attention heads are not divisible by " +
                                         std::to_string(size));
    require(c.num_kv_heads % size == 0 || size % c.num_kv_heads == 0,
            std::to_string(c.num_kv_heads) + " KV heads neither divide nor are divisible by " +
                std::to_string(size));
    require(c.intermediate_size % size == 0, "intermediate_size " +
                                                 std::to_string(c.intermediate_size) +
                                                 " is not divisible by " + std::to_string(size));
    require(c.vocab_size % size == 0, "vocab_size " + std::to_string(c.vocab_size) +
                                          " is not divisible by " + std::to_string(size));
    heads = c.num_heads / size;
    first_head = rank * heads;
    if (c.num_kv_heads >= size) {
      kv_heads = c.num_kv_heads / size;
      first_kv_head = rank * kv_heads;
    } else {
      kv_heads = 1;
      first_kv_head = rank * c.num_kv_heads / size;
    }
    intermediate = c.intermediate_size / size;
    vocab = c.vocab_size / size;
    first_token = rank * vocab;
  }
};

struct LlamaLayer {
  Tensor input_norm, post_attention_norm;
  Tensor qkv_weight, qkv_bias;  // [(H + 2 KV) · head_dim, hidden]
  Tensor o_weight, o_bias;
  Tensor gate_up_weight, gate_up_bias;  // [2 · intermediate, hidden]
  Tensor down_weight, down_bias;
};

// Activations for the largest step seen so far; smaller steps use their first rows.
struct Workspace {
  int64_t capacity = 0;
  Tensor hidden, normed, qkv, q, attention_out, projected, gate_up, activated;
  // The head's outputs, sized by the rows that need logits (see grown_rows).
  Tensor local_logits, gathered_logits, logits;
};

class LlamaModel final : public Model {
 public:
  LlamaModel(const ModelConfig& config, WeightStore& weights, Backend& backend,
             std::shared_ptr<Communicator> communicator, int32_t allreduce_tile_tokens)
      : config_(config),
        backend_(backend),
        communicator_(std::move(communicator)),
        plan_(config, {communicator_->rank(), communicator_->size()}),
        allreduce_tile_tokens_(allreduce_tile_tokens) {
    embed_tokens_ = weights.take("model.embed_tokens.weight");
    final_norm_ = weights.take("model.norm.weight");
    lm_head_ = config.tie_word_embeddings ? embed_tokens_ : weights.take("lm_head.weight");
    for (int i = 0; i < config.num_layers; ++i) {
      const std::string p = layer_prefix(i);
      auto names = [&](const char* module, std::vector<const char*> parts, const char* suffix) {
        std::vector<std::string> full;
        for (const char* part : parts) full.push_back(p + module + "." + part + "." + suffix);
        return full;
      };
      LlamaLayer layer;
      layer.input_norm = weights.take(p + "input_layernorm.weight");
      layer.post_attention_norm = weights.take(p + "post_attention_layernorm.weight");
      layer.qkv_weight =
          take_stacked(backend, weights, names("self_attn", {"q_proj", "k_proj", "v_proj"}, "weight"));
      layer.o_weight = weights.take(p + "self_attn.o_proj.weight");
      if (config.attention_bias) {
        layer.qkv_bias =
            take_stacked(backend, weights, names("self_attn", {"q_proj", "k_proj", "v_proj"}, "bias"));
        layer.o_bias = weights.take(p + "self_attn.o_proj.bias");
      }
      layer.gate_up_weight =
          take_stacked(backend, weights, names("mlp", {"gate_proj", "up_proj"}, "weight"));
      layer.down_weight = weights.take(p + "mlp.down_proj.weight");
      if (config.mlp_bias) {
        layer.gate_up_bias =
            take_stacked(backend, weights, names("mlp", {"gate_proj", "up_proj"}, "bias"));
        layer.down_bias = weights.take(p + "mlp.down_proj.bias");
      }
      layers_.push_back(std::move(layer));
    }
    inv_freq_ = rope_inv_freq(config.rope, config.head_dim);
    attention_shape_.num_heads = plan_.heads;
    attention_shape_.num_kv_heads = plan_.kv_heads;
    attention_shape_.head_dim = config.head_dim;
    attention_shape_.softmax_scale = 1.f / std::sqrt(static_cast<float>(config.head_dim));
    attention_shape_.causal = true;
    rotary_.inv_freq = &inv_freq_;
    rotary_.rotary_dim = config.head_dim;
    rotary_.interleaved = config.rope.interleaved;
  }

  const ModelConfig& config() const override { return config_; }
  int32_t local_kv_heads() const override { return plan_.kv_heads; }

  Tensor forward(const ForwardBatch& batch, KvCache& cache) override {
    const int64_t tokens = batch.num_tokens();
    reserve(tokens);
    const auto& c = config_;
    const int64_t q_width = static_cast<int64_t>(plan_.heads) * c.head_dim;
    Tensor hidden = workspace_.hidden.first_rows(tokens);
    Tensor normed = workspace_.normed.first_rows(tokens);
    Tensor qkv = workspace_.qkv.first_rows(tokens);
    Tensor q = workspace_.q.first_rows(tokens);
    Tensor attention_out = workspace_.attention_out.first_rows(tokens);
    Tensor projected = workspace_.projected.first_rows(tokens);
    Tensor gate_up = workspace_.gate_up.first_rows(tokens);
    Tensor activated = workspace_.activated.first_rows(tokens);

    backend_.begin_step(batch);
    backend_.embedding(embed_tokens_, batch.token_ids, plan_.first_token, hidden);
    if (plan_.size > 1) communicator_->allreduce_sum(hidden.raw(), hidden.numel(), hidden.dtype());
    for (int i = 0; i < c.num_layers; ++i) {
      const LlamaLayer& layer = layers_[i];
      const LayerKvCache& layer_cache = cache.layer(i);
      // The previous layer's MLP output joins the residual stream in the same pass as the norm.
      if (i == 0) {
        backend_.rmsnorm(hidden, layer.input_norm, c.norm_eps, normed);
      } else {
        backend_.add_rmsnorm(hidden, projected, layer.input_norm, c.norm_eps, normed);
      }
      backend_.linear(normed, layer.qkv_weight, bias(layer.qkv_bias), qkv);
      backend_.rotary_cache_write(qkv, batch, attention_shape_, rotary_, q, layer_cache);
      backend_.attention(q, batch, attention_shape_, layer_cache, cache.shape().block_size,
                         attention_out, nullptr);
      row_parallel_linear(attention_out.reshaped({tokens, q_width}), layer.o_weight,
                          layer.o_bias, projected);
      backend_.add_rmsnorm(hidden, projected, layer.post_attention_norm, c.norm_eps, normed);
      backend_.linear(normed, layer.gate_up_weight, bias(layer.gate_up_bias), gate_up);
      backend_.silu_mul(gate_up, activated);
      row_parallel_linear(activated, layer.down_weight, layer.down_bias, projected);
    }
    backend_.add_inplace(hidden, projected);

    // The head reads only the rows that need logits; the layers' buffers are free by now
    // (logits rows never outnumber the step's tokens).
    const int64_t rows = static_cast<int64_t>(batch.logits_rows.size());
    Tensor selected = workspace_.projected.first_rows(rows);
    backend_.gather_rows(hidden, batch.logits_rows, selected);
    Tensor selected_normed = workspace_.normed.first_rows(rows);
    backend_.rmsnorm(selected, final_norm_, c.norm_eps, selected_normed);
    // Logits are float32 everywhere: the matrix product writes them so (float32 accumulation),
    // and sampling compares values too close for half precision.
    Tensor local_logits = grown_rows(backend_, workspace_.local_logits, rows, plan_.vocab,
                                     DType::kFloat32);
    backend_.linear(selected_normed, lm_head_, nullptr, local_logits);
    if (plan_.size == 1) return local_logits;
    return gather_vocabulary(local_logits);
  }

 private:
  static const Tensor* bias(const Tensor& tensor) { return tensor.defined() ? &tensor : nullptr; }

  // Row-parallel projection (o_proj, down_proj): each rank multiplies its slice of the input
  // features, and the partial outputs are summed over ranks. Tiling-AllReduce (FastAttention
  // §3.3): the tokens are split into tiles and tile i's sum runs while tile i+1 is multiplied.
  // The bias is added once, after the sum.
  void row_parallel_linear(const Tensor& x, const Tensor& weight, const Tensor& bias_tensor,
                           Tensor& out) {
    const int64_t tokens = x.dim(0);
    const int64_t tile = allreduce_tile(tokens);
    try {
      for (int64_t begin = 0; begin < tokens; begin += tile) {
        const int64_t count = std::min(tile, tokens - begin);
        Tensor out_tile = out.row_range(begin, count);
        backend_.linear(x.row_range(begin, count), weight, nullptr, out_tile);
        if (tile < tokens) {
          communicator_->start_allreduce_sum(out_tile.raw(), out_tile.numel(), out_tile.dtype());
          communicator_->progress();
        }
      }
    } catch (...) {
      // Sums already started write into `out`: they must finish before anything is freed.
      communicator_->wait_all();
      throw;
    }
    if (tile < tokens) {
      communicator_->wait_all();
    } else if (plan_.size > 1) {
      communicator_->allreduce_sum(out.raw(), out.numel(), out.dtype());
    }
    if (bias_tensor.defined()) backend_.add_bias(out, bias_tensor);
  }

  // Tokens per AllReduce tile: the configured count; or, when tiling pays on this machine, a
  // quarter of the step with at least kMinTileTokens, so each tile's matrix product stays large
  // enough to run at speed; decode steps (too few tokens to split) use one AllReduce. The
  // measurement runs at the first step long enough to tile: every rank runs the same steps, so
  // all of them reach its collectives together (unlike at load, where a rank may have failed).
  // A configured tile applies on one rank too, where each tile's sum is an identity: that is
  // how one GPU runs the tiled path through a real (one-rank) NCCL communicator.
  int64_t allreduce_tile(int64_t tokens) {
    static constexpr int64_t kMinTileTokens = 64;
    if (allreduce_tile_tokens_ < 0) return tokens;
    if (allreduce_tile_tokens_ > 0) return std::min<int64_t>(allreduce_tile_tokens_, tokens);
    if (plan_.size == 1 || tokens < 2 * kMinTileTokens) return tokens;
    if (!tiling_decided_) {
      tile_allreduce_ = tiling_pays();
      tiling_decided_ = true;
    }
    if (!tile_allreduce_) return tokens;
    return std::max(kMinTileTokens, (tokens + 3) / 4);
  }

  // Whether overlapping pays: it can hide at most the AllReduce's time, and costs smaller, less
  // efficient matrix products plus the cores the communication itself occupies. Measured once,
  // with every rank taking part: one o_proj-sized product against the AllReduce of its output.
  // On 2 CPU ranks over shared memory the sum is 0.11 of the o_proj product (~1% of a prefill)
  // and every tiling lost time (scripts/bench_tp_cpu.py); over a slow interconnect, or against
  // GPU-speed products, the ratio is far higher. The ranks vote and sum whole votes, which every
  // rank receives bit-identical, so all of them decide alike (a mismatch would pair different
  // collectives). A GPU queues both and returns at once: each timing waits for the device.
  bool tiling_pays() {
    static constexpr int64_t kProbeTokens = 256;
    static constexpr double kWorthwhileRatio = 0.25;
    const DType dtype = backend_.activation_dtype();
    Tensor x = backend_.zeros({kProbeTokens, layers_[0].o_weight.dim(1)}, dtype);
    Tensor y = backend_.zeros({kProbeTokens, config_.hidden_size}, dtype);
    auto seconds = [&](auto&& work) {
      work();  // warm-up
      backend_.synchronize();
      const auto start = std::chrono::steady_clock::now();
      work();
      backend_.synchronize();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    };
    const double product = seconds([&] { backend_.linear(x, layers_[0].o_weight, nullptr, y); });
    const double sum = seconds([&] { communicator_->allreduce_sum(y.raw(), y.numel(), dtype); });
    float votes = sum / std::max(product, 1e-9) > kWorthwhileRatio ? 1.f : 0.f;
    communicator_->allreduce_sum_host(&votes, 1);
    return 2.f * votes > static_cast<float>(plan_.size);
  }

  // Each rank computed logits for its vocabulary slice; every rank gets all of them, in order:
  // gathered as [rank][row][slice], then each rank's block placed at its columns by the backend
  // (so the logits never leave the device that computed them).
  Tensor gather_vocabulary(const Tensor& local_logits) {
    const int64_t rows = local_logits.dim(0), slice = plan_.vocab;
    Tensor gathered = grown_rows(backend_, workspace_.gathered_logits, plan_.size * rows, slice,
                                 DType::kFloat32);
    communicator_->allgather(local_logits.raw(), local_logits.numel(), DType::kFloat32,
                             gathered.raw());
    Tensor logits = grown_rows(backend_, workspace_.logits, rows, config_.vocab_size,
                               DType::kFloat32);
    for (int r = 0; r < plan_.size; ++r) {
      backend_.copy_columns(gathered.row_range(r * rows, rows), logits, r * slice);
    }
    return logits;
  }

  void reserve(int64_t tokens) {
    if (tokens <= workspace_.capacity) return;
    const auto& c = config_;
    const DType dtype = backend_.activation_dtype();
    const int64_t head_width = c.head_dim;
    auto make = [&](Shape shape) { return backend_.empty(std::move(shape), dtype); };
    workspace_.hidden = make({tokens, c.hidden_size});
    workspace_.normed = make({tokens, c.hidden_size});
    workspace_.qkv = make({tokens, (plan_.heads + 2LL * plan_.kv_heads) * head_width});
    workspace_.q = make({tokens, plan_.heads, head_width});
    workspace_.attention_out = make({tokens, plan_.heads, head_width});
    workspace_.projected = make({tokens, c.hidden_size});
    workspace_.gate_up = make({tokens, 2LL * plan_.intermediate});
    workspace_.activated = make({tokens, plan_.intermediate});
    workspace_.capacity = tokens;
  }

  ModelConfig config_;
  Backend& backend_;
  std::shared_ptr<Communicator> communicator_;
  ShardPlan plan_;
  int32_t allreduce_tile_tokens_;  // > 0: fixed tile, -1: never tile, 0: tile when it pays
  bool tiling_decided_ = false;    // the measurement for allreduce_tile_tokens_ == 0 ran
  bool tile_allreduce_ = false;    // its outcome
  Tensor embed_tokens_, final_norm_, lm_head_;
  std::vector<LlamaLayer> layers_;
  std::vector<float> inv_freq_;
  AttentionShape attention_shape_;
  RotaryArgs rotary_;
  Workspace workspace_;
};

}  // namespace

std::vector<WeightSpec> llama_expected_weights(const ModelConfig& c,
                                              const TensorParallel& parallel) {
  const ShardPlan plan(c, parallel);
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size, d = c.head_dim;
  const int64_t q_width = static_cast<int64_t>(c.num_heads) * d;
  const int64_t kv_width = static_cast<int64_t>(c.num_kv_heads) * d;
  const bool split = parallel.size > 1;
  auto whole = [](std::string name, Shape shape) { return WeightSpec{std::move(name), shape}; };
  // Shards along `axis` only when there is more than one rank, so single-rank specs stay plain.
  auto shard = [&](std::string name, Shape shape, int axis, int64_t begin, int64_t count) {
    return split ? WeightSpec{std::move(name), shape, axis, begin, count}
                 : WeightSpec{std::move(name), shape};
  };
  const int64_t q_begin = plan.first_head * d, q_count = plan.heads * d;
  const int64_t kv_begin = plan.first_kv_head * d, kv_count = plan.kv_heads * d;
  const int64_t i_begin = static_cast<int64_t>(plan.rank) * plan.intermediate;
  const int64_t v_begin = plan.first_token, v_count = plan.vocab;

  std::vector<WeightSpec> specs = {
      shard("model.embed_tokens.weight", {c.vocab_size, hidden}, 0, v_begin, v_count),
      whole("model.norm.weight", {hidden})};
  if (!c.tie_word_embeddings) {
    specs.push_back(shard("lm_head.weight", {c.vocab_size, hidden}, 0, v_begin, v_count));
  }
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = layer_prefix(i);
    specs.push_back(whole(p + "input_layernorm.weight", {hidden}));
    specs.push_back(whole(p + "post_attention_layernorm.weight", {hidden}));
    specs.push_back(shard(p + "self_attn.q_proj.weight", {q_width, hidden}, 0, q_begin, q_count));
    specs.push_back(shard(p + "self_attn.k_proj.weight", {kv_width, hidden}, 0, kv_begin, kv_count));
    specs.push_back(shard(p + "self_attn.v_proj.weight", {kv_width, hidden}, 0, kv_begin, kv_count));
    specs.push_back(shard(p + "self_attn.o_proj.weight", {hidden, q_width}, 1, q_begin, q_count));
    if (c.attention_bias) {
      specs.push_back(shard(p + "self_attn.q_proj.bias", {q_width}, 0, q_begin, q_count));
      specs.push_back(shard(p + "self_attn.k_proj.bias", {kv_width}, 0, kv_begin, kv_count));
      specs.push_back(shard(p + "self_attn.v_proj.bias", {kv_width}, 0, kv_begin, kv_count));
      specs.push_back(whole(p + "self_attn.o_proj.bias", {hidden}));
    }
    specs.push_back(shard(p + "mlp.gate_proj.weight", {inter, hidden}, 0, i_begin, plan.intermediate));
    specs.push_back(shard(p + "mlp.up_proj.weight", {inter, hidden}, 0, i_begin, plan.intermediate));
    specs.push_back(shard(p + "mlp.down_proj.weight", {hidden, inter}, 1, i_begin, plan.intermediate));
    if (c.mlp_bias) {
      specs.push_back(shard(p + "mlp.gate_proj.bias", {inter}, 0, i_begin, plan.intermediate));
      specs.push_back(shard(p + "mlp.up_proj.bias", {inter}, 0, i_begin, plan.intermediate));
      specs.push_back(whole(p + "mlp.down_proj.bias", {hidden}));
    }
  }
  return specs;
}

std::unique_ptr<Model> make_llama(const ModelConfig& config, WeightStore& weights,
                                  Backend& backend, std::shared_ptr<Communicator> communicator,
                                  int32_t allreduce_tile_tokens) {
  return std::make_unique<LlamaModel>(config, weights, backend, std::move(communicator),
                                      allreduce_tile_tokens);
}

}  // namespace ftengine::models
