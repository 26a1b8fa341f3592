// The one place that knows every model architecture: tests, loaders and the runtime ask it which
// tensors an architecture needs and to build a model from them.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/model.h"

namespace ftengine::models {

std::vector<std::string> supported_architectures();

// Every tensor name and shape the checkpoint of `config` must hold.
std::vector<WeightSpec> expected_weights(const ModelConfig& config);

std::unique_ptr<Model> create_model(const ModelConfig& config, WeightStore& weights,
                                    Backend& backend);

}  // namespace ftengine::models
