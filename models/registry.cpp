#include "models/registry.h"

#include <stdexcept>

#include "models/llama.h"
#include "models/pangu_alpha.h"

namespace ftengine::models {

namespace {

struct Architecture {
  const char* name;
  std::vector<WeightSpec> (*expected_weights)(const ModelConfig&, const TensorParallel&);
  std::unique_ptr<Model> (*create)(const ModelConfig&, WeightStore&, Backend&,
                                   std::shared_ptr<Communicator>, int32_t);
};

// openPangu-Embedded is the Llama graph with bias on q, k, v and o (its config's `bias`, mapped
// to attention_bias); PanGu-alpha is a graph of its own.
const Architecture kArchitectures[] = {
    {"LlamaForCausalLM", llama_expected_weights, make_llama},
    {"PanguEmbeddedForCausalLM", llama_expected_weights, make_llama},
    {"GPTPanguForCausalLM", pangu_alpha_expected_weights, make_pangu_alpha},
};

const Architecture& find_architecture(const std::string& name) {
  for (const auto& architecture : kArchitectures) {
    if (name == architecture.name) return architecture;
  }
  throw std::invalid_argument("unsupported architecture '" + name + "'");
}

}  // namespace

std::vector<std::string> supported_architectures() {
  std::vector<std::string> names;
  for (const auto& architecture : kArchitectures) names.emplace_back(architecture.name);
  return names;
}

std::vector<WeightSpec> expected_weights(const ModelConfig& config,
                                         const TensorParallel& parallel) {
  return find_architecture(config.architecture).expected_weights(config, parallel);
}

std::unique_ptr<Model> create_model(const ModelConfig& config, WeightStore& weights,
                                    Backend& backend, std::shared_ptr<Communicator> communicator,
                                    int32_t allreduce_tile_tokens) {
  return find_architecture(config.architecture)
      .create(config, weights, backend, std::move(communicator), allreduce_tile_tokens);
}

}  // namespace ftengine::models
