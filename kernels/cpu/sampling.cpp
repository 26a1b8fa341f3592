#include "kernels/cpu/sampling.h"

#include <algorithm>
#include <cmath>

namespace ftengine::kernels::cpu {

namespace {

int32_t argmax(const float* logits, int64_t vocab_size) {
  // First maximum, as torch.argmax picks, so greedy ties break the same way.
  int64_t best = 0;
  for (int64_t i = 1; i < vocab_size; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

}  // namespace

int32_t sample_token(float* logits, int64_t vocab_size, const SamplingConfig& config,
                     const int32_t* history, int64_t history_length, std::mt19937_64& rng,
                     SamplingScratch& scratch) {
  if (config.repetition_penalty != 1.f) {
    // Each distinct id is penalised once, however often it occurred.
    auto& ids = scratch.distinct_ids;
    ids.assign(history, history + history_length);
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size) continue;
      float& logit = logits[id];
      logit = logit < 0.f ? logit * config.repetition_penalty : logit / config.repetition_penalty;
    }
  }
  if (config.temperature <= 0.f) return argmax(logits, vocab_size);

  auto& candidates = scratch.candidates;
  candidates.resize(static_cast<size_t>(vocab_size));
  for (int64_t i = 0; i < vocab_size; ++i) {
    candidates[i] = {logits[i] / config.temperature, static_cast<int32_t>(i)};
  }
  const auto by_logit_descending = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t kept = candidates.size();
  if (config.top_k > 0 && static_cast<size_t>(config.top_k) < kept) {
    kept = static_cast<size_t>(config.top_k);
    std::partial_sort(candidates.begin(), candidates.begin() + kept, candidates.end(),
                      by_logit_descending);
  } else {
    std::sort(candidates.begin(), candidates.end(), by_logit_descending);
  }

  auto& probabilities = scratch.probabilities;
  probabilities.resize(kept);
  const float max_logit = candidates[0].first;
  double total = 0.0;
  for (size_t i = 0; i < kept; ++i) {
    probabilities[i] = std::exp(candidates[i].first - max_logit);
    total += probabilities[i];
  }
  if (config.top_p < 1.f) {
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    double mass = 0.0;
    size_t prefix = 0;
    while (prefix < kept) {
      mass += probabilities[prefix] / total;
      ++prefix;
      if (mass >= config.top_p) break;
    }
    kept = prefix;
    total = 0.0;
    for (size_t i = 0; i < kept; ++i) total += probabilities[i];
  }

  std::uniform_real_distribution<double> uniform(0.0, total);
  double draw = uniform(rng);
  for (size_t i = 0; i < kept; ++i) {
    draw -= probabilities[i];
    if (draw < 0.0) return candidates[i].second;
  }
  return candidates[kept - 1].second;
}

}  // namespace ftengine::kernels::cpu
