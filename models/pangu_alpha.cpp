#include "models/pangu_alpha.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "models/workspace.h"

namespace ftengine::models {

namespace {

std::string block_prefix(int layer) { return "transformer.h." + std::to_string(layer) + "."; }

struct PanguBlock {
  Tensor ln_1_weight, ln_1_bias, ln_2_weight, ln_2_bias;
  Tensor qkv_weight, qkv_bias;  // [3 · hidden, hidden]; the query layer uses k, v rows only
  Tensor q_weight, q_bias;      // query layer: its q projection, applied to wqe[position]
  Tensor c_proj_weight, c_proj_bias;
  Tensor fc_weight, fc_bias, fc_proj_weight, fc_proj_bias;
};

struct Workspace {
  int64_t capacity = 0;
  Tensor hidden, normed, positions, qkv, q, attention_out, projected, inner, query, kv;
  Tensor logits;  // sized by the rows that need logits (see grown_rows)
};

class PanguAlphaModel final : public Model {
 public:
  PanguAlphaModel(const ModelConfig& config, WeightStore& weights, Backend& backend)
      : config_(config), backend_(backend) {
    word_embedding_ = weights.take("transformer.wte.weight");
    position_embedding_ = weights.take("transformer.wpe.weight");
    query_embedding_ = weights.take("transformer.wqe.weight");
    final_norm_weight_ = weights.take("transformer.ln_f.weight");
    final_norm_bias_ = weights.take("transformer.ln_f.bias");
    for (int i = 0; i < config.num_layers; ++i) {
      const std::string p = block_prefix(i);
      const bool query_layer = i == config.num_layers - 1;
      PanguBlock block;
      block.ln_1_weight = weights.take(p + "ln_1.weight");
      block.ln_1_bias = weights.take(p + "ln_1.bias");
      block.ln_2_weight = weights.take(p + "ln_2.weight");
      block.ln_2_bias = weights.take(p + "ln_2.bias");
      Tensor q_weight = weights.take(p + "attn.q_proj.weight");
      Tensor q_bias = weights.take(p + "attn.q_proj.bias");
      std::vector<Tensor> weights_qkv = {q_weight, weights.take(p + "attn.k_proj.weight"),
                                         weights.take(p + "attn.v_proj.weight")};
      std::vector<Tensor> biases_qkv = {q_bias, weights.take(p + "attn.k_proj.bias"),
                                        weights.take(p + "attn.v_proj.bias")};
      if (query_layer) {
        block.q_weight = q_weight;
        block.q_bias = q_bias;
        weights_qkv.erase(weights_qkv.begin());
        biases_qkv.erase(biases_qkv.begin());
      }
      block.qkv_weight = backend.concat_rows(weights_qkv);
      block.qkv_bias = backend.concat_rows(biases_qkv);
      block.c_proj_weight = weights.take(p + "attn.c_proj.weight");
      block.c_proj_bias = weights.take(p + "attn.c_proj.bias");
      block.fc_weight = weights.take(p + "mlp.c_fc.weight");
      block.fc_bias = weights.take(p + "mlp.c_fc.bias");
      block.fc_proj_weight = weights.take(p + "mlp.c_proj.weight");
      block.fc_proj_bias = weights.take(p + "mlp.c_proj.bias");
      blocks_.push_back(std::move(block));
    }
    attention_shape_.num_heads = config.num_heads;
    attention_shape_.num_kv_heads = config.num_heads;
    attention_shape_.head_dim = config.head_dim;
    attention_shape_.softmax_scale = 1.f / std::sqrt(static_cast<float>(config.head_dim));
    attention_shape_.causal = true;
    rotary_.inv_freq = &no_rotation_;  // absolute positions: q and k are not rotated
    rotary_.rotary_dim = 0;
  }

  const ModelConfig& config() const override { return config_; }
  int32_t local_kv_heads() const override { return config_.num_heads; }

  Tensor forward(const ForwardBatch& batch, KvCache& cache) override {
    const int64_t tokens = batch.num_tokens();
    reserve(tokens);
    const auto& c = config_;
    const int64_t width = c.hidden_size;
    Tensor hidden = workspace_.hidden.first_rows(tokens);
    Tensor normed = workspace_.normed.first_rows(tokens);
    Tensor positions = workspace_.positions.first_rows(tokens);
    Tensor qkv = workspace_.qkv.first_rows(tokens);
    Tensor q = workspace_.q.first_rows(tokens);
    Tensor attention_out = workspace_.attention_out.first_rows(tokens);
    Tensor projected = workspace_.projected.first_rows(tokens);
    Tensor inner = workspace_.inner.first_rows(tokens);
    Tensor query = workspace_.query.first_rows(tokens);

    backend_.begin_step(batch);
    backend_.embedding(word_embedding_, batch.token_ids, 0, hidden);
    backend_.embedding(position_embedding_, batch.positions, 0, positions);
    backend_.add_inplace(hidden, positions);
    for (int i = 0; i < c.num_layers; ++i) {
      const PanguBlock& block = blocks_[i];
      const bool query_layer = i == c.num_layers - 1;
      if (query_layer) {
        backend_.layernorm(hidden, final_norm_weight_, final_norm_bias_, c.norm_eps, normed);
        std::swap(hidden, normed);  // ln_f's output is the query layer's residual stream
      }
      backend_.layernorm(hidden, block.ln_1_weight, block.ln_1_bias, c.norm_eps, normed);
      if (query_layer) {
        // q from the query-position embedding, k and v from the normed hidden states.
        backend_.embedding(query_embedding_, batch.positions, 0, positions);
        backend_.linear(positions, block.q_weight, &block.q_bias, query);
        Tensor kv = workspace_.kv.first_rows(tokens);
        backend_.linear(normed, block.qkv_weight, &block.qkv_bias, kv);
        backend_.copy_columns(query, qkv, 0);
        backend_.copy_columns(kv, qkv, width);
      } else {
        backend_.linear(normed, block.qkv_weight, &block.qkv_bias, qkv);
      }
      backend_.rotary_cache_write(qkv, batch, attention_shape_, rotary_, q, cache.layer(i));
      backend_.attention(q, batch, attention_shape_, cache.layer(i), cache.shape().block_size,
                         attention_out, nullptr);
      backend_.linear(attention_out.reshaped({tokens, width}), block.c_proj_weight,
                      &block.c_proj_bias, projected);
      backend_.add_inplace(hidden, projected);

      backend_.layernorm(hidden, block.ln_2_weight, block.ln_2_bias, c.norm_eps, normed);
      backend_.linear(normed, block.fc_weight, &block.fc_bias, inner);
      backend_.gelu_inplace(inner);
      backend_.linear(inner, block.fc_proj_weight, &block.fc_proj_bias, projected);
      backend_.add_inplace(hidden, projected);
    }

    const int64_t rows = static_cast<int64_t>(batch.logits_rows.size());
    Tensor selected = projected.first_rows(rows);  // free after the last block
    backend_.gather_rows(hidden, batch.logits_rows, selected);
    Tensor logits = grown_rows(backend_, workspace_.logits, rows, c.vocab_size, DType::kFloat32);
    backend_.linear(selected, word_embedding_, nullptr, logits);
    return logits;
  }

 private:
  void reserve(int64_t tokens) {
    if (tokens <= workspace_.capacity) return;
    const auto& c = config_;
    const DType dtype = backend_.activation_dtype();
    auto make = [&](Shape shape) { return backend_.empty(std::move(shape), dtype); };
    workspace_.hidden = make({tokens, c.hidden_size});
    workspace_.normed = make({tokens, c.hidden_size});
    workspace_.positions = make({tokens, c.hidden_size});
    workspace_.qkv = make({tokens, 3LL * c.hidden_size});
    workspace_.q = make({tokens, c.num_heads, c.head_dim});
    workspace_.attention_out = make({tokens, c.num_heads, c.head_dim});
    workspace_.projected = make({tokens, c.hidden_size});
    workspace_.inner = make({tokens, c.intermediate_size});
    workspace_.query = make({tokens, c.hidden_size});
    workspace_.kv = make({tokens, 2LL * c.hidden_size});
    workspace_.capacity = tokens;
  }

  ModelConfig config_;
  Backend& backend_;
  Tensor word_embedding_, position_embedding_, query_embedding_;
  Tensor final_norm_weight_, final_norm_bias_;
  std::vector<PanguBlock> blocks_;
  std::vector<float> no_rotation_;
  AttentionShape attention_shape_;
  RotaryArgs rotary_;
  Workspace workspace_;
};

}  // namespace

std::vector<WeightSpec> pangu_alpha_expected_weights(const ModelConfig& c,
                                                     const TensorParallel& parallel) {
  if (parallel.size != 1) {
    throw std::invalid_argument("PanGu-alpha runs on one rank only (tensor parallelism is "
                                "implemented for the Llama family)");
  }
  if (c.num_heads * c.head_dim != c.hidden_size || c.num_kv_heads != c.num_heads) {
    throw std::invalid_argument("PanGu-alpha needs hidden_size = num_heads * head_dim and no GQA");
  }
  const int64_t e = c.hidden_size, inner = c.intermediate_size;
  const int64_t positions = c.max_position_embeddings;
  std::vector<WeightSpec> specs = {
      {"transformer.wte.weight", {c.vocab_size, e}},
      {"transformer.wpe.weight", {positions, e}},
      {"transformer.wqe.weight", {positions, e}},
      {"transformer.ln_f.weight", {e}},
      {"transformer.ln_f.bias", {e}},
  };
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = block_prefix(i);
    for (const char* norm : {"ln_1", "ln_2"}) {
      specs.push_back({p + norm + ".weight", {e}});
      specs.push_back({p + norm + ".bias", {e}});
    }
    for (const char* projection : {"q_proj", "k_proj", "v_proj", "c_proj"}) {
      specs.push_back({p + "attn." + projection + ".weight", {e, e}});
      specs.push_back({p + "attn." + projection + ".bias", {e}});
    }
    specs.push_back({p + "mlp.c_fc.weight", {inner, e}});
    specs.push_back({p + "mlp.c_fc.bias", {inner}});
    specs.push_back({p + "mlp.c_proj.weight", {e, inner}});
    specs.push_back({p + "mlp.c_proj.bias", {e}});
  }
  return specs;
}

std::unique_ptr<Model> make_pangu_alpha(const ModelConfig& config, WeightStore& weights,
                                        Backend& backend, std::shared_ptr<Communicator>,
                                        int32_t) {
  return std::make_unique<PanguAlphaModel>(config, weights, backend);
}

}  // namespace ftengine::models
