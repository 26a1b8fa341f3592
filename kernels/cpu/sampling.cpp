#include "kernels/cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace ftengine::kernels::cpu {

namespace {

// NaN logits (a broken model) never win and are never drawn.
float sanitised(float logit) {
  return std::isnan(logit) ? -std::numeric_limits<float>::infinity() : logit;
}

int32_t argmax(const float* logits, int64_t vocab_size) {
  // First maximum, as torch.argmax picks, so greedy ties break the same way.
  int64_t best = 0;
  float best_logit = sanitised(logits[0]);
  for (int64_t i = 1; i < vocab_size; ++i) {
    if (sanitised(logits[i]) > best_logit) {
      best = i;
      best_logit = sanitised(logits[i]);
    }
  }
  return static_cast<int32_t>(best);
}

}  // namespace

std::string sampling_config_error(const SamplingConfig& config) {
  if (!std::isfinite(config.temperature) || config.temperature < 0.f) {
    return "temperature must be a finite number >= 0";
  }
  if (!(config.top_p > 0.f && config.top_p <= 1.f)) return "top_p must be in (0, 1]";
  if (config.top_k < 0) return "top_k must be >= 0";
  if (!std::isfinite(config.repetition_penalty) || config.repetition_penalty <= 0.f) {
    return "repetition_penalty must be a finite number > 0";
  }
  return {};
}

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
  const int32_t best = argmax(logits, vocab_size);
  if (config.temperature <= 0.f) return best;

  // Weights exp((logit - max) / T), in double: a tiny temperature then underflows every other
  // token to 0 (the argmax wins) instead of overflowing to inf and NaN.
  const double max_logit = sanitised(logits[best]);
  const double inverse_temperature = 1.0 / config.temperature;
  auto weight = [&](float logit) {
    return std::exp((static_cast<double>(sanitised(logit)) - max_logit) * inverse_temperature);
  };
  auto draw = [&](double total) {
    return std::uniform_real_distribution<double>(0.0, total)(rng);
  };

  const bool cut = config.top_k > 0 || config.top_p < 1.f;
  if (!cut) {
    // The whole vocabulary: one pass for the total, one for the draw; no sort.
    double total = 0.0;
    for (int64_t i = 0; i < vocab_size; ++i) total += weight(logits[i]);
    double remaining = draw(total);
    for (int64_t i = 0; i < vocab_size; ++i) {
      remaining -= weight(logits[i]);
      if (remaining < 0.0) return static_cast<int32_t>(i);
    }
    return best;
  }

  auto& candidates = scratch.candidates;
  candidates.resize(static_cast<size_t>(vocab_size));
  double total = 0.0;
  for (int64_t i = 0; i < vocab_size; ++i) {
    const double w = weight(logits[i]);
    candidates[i] = {static_cast<float>(w), static_cast<int32_t>(i)};
    total += w;
  }
  const auto heavier = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  // Sort only as long a prefix as the cut needs: the top_k (top-p then applies to their
  // renormalised mass, as in transformers), or a prefix grown until it holds top_p of the mass
  // (usually a few dozen tokens of a vocabulary of tens of thousands).
  size_t sorted = candidates.size();
  if (config.top_k > 0 && static_cast<size_t>(config.top_k) < candidates.size()) {
    sorted = static_cast<size_t>(config.top_k);
    std::partial_sort(candidates.begin(), candidates.begin() + sorted, candidates.end(), heavier);
    total = 0.0;
    for (size_t i = 0; i < sorted; ++i) total += candidates[i].first;
  } else if (config.top_p < 1.f) {
    sorted = std::min<size_t>(64, candidates.size());
    for (;;) {
      std::partial_sort(candidates.begin(), candidates.begin() + sorted, candidates.end(),
                        heavier);
      double mass = 0.0;
      for (size_t i = 0; i < sorted; ++i) mass += candidates[i].first;
      if (mass >= config.top_p * total || sorted == candidates.size()) break;
      sorted = std::min(candidates.size(), sorted * 8);
    }
  }
  size_t kept = 0;
  double kept_mass = 0.0;
  while (kept < sorted) {
    kept_mass += candidates[kept].first;
    ++kept;
    if (config.top_p < 1.f && kept_mass >= config.top_p * total) break;
  }
  double remaining = draw(kept_mass);
  for (size_t i = 0; i < kept; ++i) {
    remaining -= candidates[i].first;
    if (remaining < 0.0) return candidates[i].second;
  }
  return candidates[0].second;
}

}  // namespace ftengine::kernels::cpu
