// PanGu-α (GPTPanguForCausalLM): GPT-style decoder with learned absolute positions, LayerNorm
// with bias, GELU MLP, biased q/k/v/c_proj, and a top "query layer" whose queries come from a
// query-position embedding (wqe) while its keys and values come from the hidden states, which
// pass ln_f before that layer. The head is tied to the word embedding.
#pragma once

#include <memory>
#include <vector>

#include "engine/model.h"

namespace ftengine::models {

std::vector<WeightSpec> pangu_alpha_expected_weights(const ModelConfig& config,
                                                     const TensorParallel& parallel);
std::unique_ptr<Model> make_pangu_alpha(const ModelConfig& config, WeightStore& weights,
                                        Backend& backend,
                                        std::shared_ptr<Communicator> communicator,
                                        int32_t allreduce_tile_tokens);

}  // namespace ftengine::models
