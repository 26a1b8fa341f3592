// Rotary frequencies with the scalings of transformers' rope_scaling (default, linear, llama3).
#pragma once

#include <vector>

#include "engine/model.h"

namespace ftengine::models {

// inv_freq[i] for i < rotary_dim / 2, computed in float32 the way transformers does.
std::vector<float> rope_inv_freq(const RopeConfig& rope, int rotary_dim);

}  // namespace ftengine::models
