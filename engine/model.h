// The Model interface and the decoder configuration models are built from. A model is created
// from a WeightStore by the registry in models/, and runs one forward step per call.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/communicator.h"
#include "engine/forward_batch.h"
#include "engine/kv_cache.h"
#include "engine/tensor.h"
#include "engine/weight_store.h"

namespace ftengine {

// Rotary scaling as transformers names it in config.json's rope_scaling.
enum class RopeType : int { kDefault, kLinear, kLlama3 };

struct RopeConfig {
  float theta = 10000.f;
  RopeType type = RopeType::kDefault;
  float factor = 1.f;               // linear and llama3
  float low_freq_factor = 1.f;      // llama3
  float high_freq_factor = 4.f;     // llama3
  int32_t original_max_position = 8192;  // llama3
  bool interleaved = false;         // Meta checkpoints rotate (x[2i], x[2i+1]) pairs
  // Per-frequency divisors applied after the scaling above (llama.cpp's rope_freqs tensor, how
  // GGUF files carry Llama 3.1's scaling); empty means none.
  std::vector<float> freq_factors;
};

struct ModelConfig {
  std::string architecture;
  int32_t vocab_size = 0;
  int32_t hidden_size = 0;
  int32_t intermediate_size = 0;
  int32_t num_layers = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t max_position_embeddings = 0;
  float norm_eps = 1e-6f;
  RopeConfig rope;
  bool attention_bias = false;  // bias on q, k, v and o projections
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  DType weight_dtype = DType::kFloat32;  // storage of matrices; vectors (norms, biases) are float32
};

// Which shard of the model a rank holds (Megatron-style tensor parallelism).
struct TensorParallel {
  int rank = 0;
  int size = 1;
};

// A tensor of the checkpoint and the part of it this rank loads: the whole tensor when
// shard_axis < 0, else indices [shard_begin, shard_begin + shard_count) along shard_axis.
struct WeightSpec {
  std::string name;
  Shape shape;  // as stored in the checkpoint
  int shard_axis = -1;
  int64_t shard_begin = 0;
  int64_t shard_count = 0;

  Shape local_shape() const {
    Shape local = shape;
    if (shard_axis >= 0) local[shard_axis] = shard_count;
    return local;
  }
};

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelConfig& config() const = 0;
  // KV heads this rank keeps in its cache (all of them without tensor parallelism).
  virtual int32_t local_kv_heads() const = 0;
  // One forward step over the batch; returns float32 logits [batch.logits_rows.size(), vocab],
  // the full vocabulary on every rank.
  virtual Tensor forward(const ForwardBatch& batch, KvCache& cache) = 0;
};

}  // namespace ftengine
