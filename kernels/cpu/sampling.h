// Logits processing and sampling for one sequence, in the order transformers applies them:
// repetition penalty, temperature, top-k, top-p, then a draw (or argmax when greedy).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace ftengine::kernels::cpu {

struct SamplingConfig {
  float temperature = 0.f;         // 0 means greedy
  int32_t top_k = 0;               // 0 keeps every token
  float top_p = 1.f;               // 1 keeps every token
  float repetition_penalty = 1.f;  // 1 means none (CTRL paper's penalty, as in transformers)
};

// Empty when the config is valid, else what is wrong (callers turn it into an error).
std::string sampling_config_error(const SamplingConfig& config);

// Scratch reused across calls so the decode loop does not allocate.
struct SamplingScratch {
  std::vector<std::pair<float, int32_t>> candidates;
  std::vector<float> probabilities;
  std::vector<int32_t> distinct_ids;
};

// Applies the repetition penalty to logits in place and returns the chosen token id.
// vocab_size must be positive and the config valid (sampling_config_error).
// `history` holds the prompt and generated ids the repetition penalty applies to.
int32_t sample_token(float* logits, int64_t vocab_size, const SamplingConfig& config,
                     const int32_t* history, int64_t history_length, std::mt19937_64& rng,
                     SamplingScratch& scratch);

}  // namespace ftengine::kernels::cpu
