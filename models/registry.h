// The one place that knows every model architecture: tests, loaders and the runtime ask it which
// tensors an architecture needs and to build a model from them.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/model.h"

namespace ftengine::models {

std::vector<std::string> supported_architectures();

// Every tensor name and shape the checkpoint of `config` must hold, and the shard of it rank
// `parallel.rank` loads; throws std::invalid_argument when the model cannot be split that way.
std::vector<WeightSpec> expected_weights(const ModelConfig& config, const TensorParallel& parallel);

// Builds the model from this rank's shards (named as in the checkpoint).
std::unique_ptr<Model> create_model(const ModelConfig& config, WeightStore& weights,
                                    Backend& backend, std::shared_ptr<Communicator> communicator,
                                    int32_t allreduce_tile_tokens);

}  // namespace ftengine::models
