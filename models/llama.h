// The Llama decoder (Llama 2, 3, 3.1, 3.2 and relatives that differ only by config flags:
// attention bias, MLP bias, tied embeddings, explicit head_dim, rotary scaling).
#pragma once

#include <memory>
#include <vector>

#include "engine/model.h"

namespace ftengine::models {

std::vector<WeightSpec> llama_expected_weights(const ModelConfig& config,
                                              const TensorParallel& parallel);
std::unique_ptr<Model> make_llama(const ModelConfig& config, WeightStore& weights,
                                  Backend& backend, std::shared_ptr<Communicator> communicator,
                                  int32_t allreduce_tile_tokens);

}  // namespace ftengine::models
