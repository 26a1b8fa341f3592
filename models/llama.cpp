#include "models/llama.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "models/rope.h"

namespace ftengine::models {

namespace {

std::string layer_prefix(int layer) { return "model.layers." + std::to_string(layer) + "."; }

// q, k, v become one projection and gate, up another, so each is a single matrix product.
Tensor take_stacked(Backend& backend, WeightStore& weights, const std::vector<std::string>& names) {
  std::vector<Tensor> parts;
  for (const auto& name : names) parts.push_back(weights.take(name));
  return parts.size() == 1 ? parts.front() : backend.concat_rows(parts);
}

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
};

class LlamaModel final : public Model {
 public:
  LlamaModel(const ModelConfig& config, WeightStore& weights, Backend& backend)
      : config_(config), backend_(backend) {
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
    attention_shape_.num_heads = config.num_heads;
    attention_shape_.num_kv_heads = config.num_kv_heads;
    attention_shape_.head_dim = config.head_dim;
    attention_shape_.softmax_scale = 1.f / std::sqrt(static_cast<float>(config.head_dim));
    attention_shape_.causal = true;
    rotary_.inv_freq = &inv_freq_;
    rotary_.rotary_dim = config.head_dim;
    rotary_.interleaved = config.rope.interleaved;
  }

  const ModelConfig& config() const override { return config_; }

  Tensor forward(const ForwardBatch& batch, KvCache& cache) override {
    const int64_t tokens = batch.num_tokens();
    reserve(tokens);
    const auto& c = config_;
    const int64_t q_width = static_cast<int64_t>(c.num_heads) * c.head_dim;
    Tensor hidden = workspace_.hidden.first_rows(tokens);
    Tensor normed = workspace_.normed.first_rows(tokens);
    Tensor qkv = workspace_.qkv.first_rows(tokens);
    Tensor q = workspace_.q.first_rows(tokens);
    Tensor attention_out = workspace_.attention_out.first_rows(tokens);
    Tensor projected = workspace_.projected.first_rows(tokens);
    Tensor gate_up = workspace_.gate_up.first_rows(tokens);
    Tensor activated = workspace_.activated.first_rows(tokens);

    backend_.embedding(embed_tokens_, batch.token_ids, hidden);
    for (int i = 0; i < c.num_layers; ++i) {
      const LlamaLayer& layer = layers_[i];
      const LayerKvCache& layer_cache = cache.layer(i);
      backend_.rmsnorm(hidden, layer.input_norm, c.norm_eps, normed);
      backend_.linear(normed, layer.qkv_weight, bias(layer.qkv_bias), qkv);
      backend_.rotary_cache_write(qkv, batch, attention_shape_, rotary_, q, layer_cache);
      backend_.attention(q, batch, attention_shape_, layer_cache, cache.shape().block_size,
                         attention_out, nullptr);
      backend_.linear(attention_out.reshaped({tokens, q_width}), layer.o_weight,
                      bias(layer.o_bias), projected);
      backend_.add_inplace(hidden, projected);

      backend_.rmsnorm(hidden, layer.post_attention_norm, c.norm_eps, normed);
      backend_.linear(normed, layer.gate_up_weight, bias(layer.gate_up_bias), gate_up);
      backend_.silu_mul(gate_up, activated);
      backend_.linear(activated, layer.down_weight, bias(layer.down_bias), projected);
      backend_.add_inplace(hidden, projected);
    }

    const int64_t rows = static_cast<int64_t>(batch.logits_rows.size());
    Tensor selected = backend_.empty({rows, c.hidden_size}, backend_.activation_dtype());
    backend_.gather_rows(hidden, batch.logits_rows, selected);
    Tensor selected_normed = backend_.empty({rows, c.hidden_size}, backend_.activation_dtype());
    backend_.rmsnorm(selected, final_norm_, c.norm_eps, selected_normed);
    Tensor logits = backend_.empty({rows, c.vocab_size}, backend_.activation_dtype());
    backend_.linear(selected_normed, lm_head_, nullptr, logits);
    return logits;
  }

 private:
  static const Tensor* bias(const Tensor& tensor) { return tensor.defined() ? &tensor : nullptr; }

  void reserve(int64_t tokens) {
    if (tokens <= workspace_.capacity) return;
    const auto& c = config_;
    const DType dtype = backend_.activation_dtype();
    const int64_t head_width = c.head_dim;
    auto make = [&](Shape shape) { return backend_.empty(std::move(shape), dtype); };
    workspace_.hidden = make({tokens, c.hidden_size});
    workspace_.normed = make({tokens, c.hidden_size});
    workspace_.qkv = make({tokens, (c.num_heads + 2LL * c.num_kv_heads) * head_width});
    workspace_.q = make({tokens, c.num_heads, head_width});
    workspace_.attention_out = make({tokens, c.num_heads, head_width});
    workspace_.projected = make({tokens, c.hidden_size});
    workspace_.gate_up = make({tokens, 2LL * c.intermediate_size});
    workspace_.activated = make({tokens, c.intermediate_size});
    workspace_.capacity = tokens;
  }

  ModelConfig config_;
  Backend& backend_;
  Tensor embed_tokens_, final_norm_, lm_head_;
  std::vector<LlamaLayer> layers_;
  std::vector<float> inv_freq_;
  AttentionShape attention_shape_;
  RotaryArgs rotary_;
  Workspace workspace_;
};

}  // namespace

std::vector<WeightSpec> llama_expected_weights(const ModelConfig& c) {
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size;
  const int64_t q_width = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t kv_width = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  std::vector<WeightSpec> specs = {{"model.embed_tokens.weight", {c.vocab_size, hidden}},
                                   {"model.norm.weight", {hidden}}};
  if (!c.tie_word_embeddings) specs.push_back({"lm_head.weight", {c.vocab_size, hidden}});
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = layer_prefix(i);
    specs.push_back({p + "input_layernorm.weight", {hidden}});
    specs.push_back({p + "post_attention_layernorm.weight", {hidden}});
    specs.push_back({p + "self_attn.q_proj.weight", {q_width, hidden}});
    specs.push_back({p + "self_attn.k_proj.weight", {kv_width, hidden}});
    specs.push_back({p + "self_attn.v_proj.weight", {kv_width, hidden}});
    specs.push_back({p + "self_attn.o_proj.weight", {hidden, q_width}});
    if (c.attention_bias) {
      specs.push_back({p + "self_attn.q_proj.bias", {q_width}});
      specs.push_back({p + "self_attn.k_proj.bias", {kv_width}});
      specs.push_back({p + "self_attn.v_proj.bias", {kv_width}});
      specs.push_back({p + "self_attn.o_proj.bias", {hidden}});
    }
    specs.push_back({p + "mlp.gate_proj.weight", {inter, hidden}});
    specs.push_back({p + "mlp.up_proj.weight", {inter, hidden}});
    specs.push_back({p + "mlp.down_proj.weight", {hidden, inter}});
    if (c.mlp_bias) {
      specs.push_back({p + "mlp.gate_proj.bias", {inter}});
      specs.push_back({p + "mlp.up_proj.bias", {inter}});
      specs.push_back({p + "mlp.down_proj.bias", {hidden}});
    }
  }
  return specs;
}

std::unique_ptr<Model> make_llama(const ModelConfig& config, WeightStore& weights,
                                  Backend& backend) {
  return std::make_unique<LlamaModel>(config, weights, backend);
}

}  // namespace ftengine::models
