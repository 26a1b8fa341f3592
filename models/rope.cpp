#include "models/rope.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace ftengine::models {

std::vector<float> rope_inv_freq(const RopeConfig& rope, int rotary_dim) {
  const int half = rotary_dim / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    inv_freq[i] = 1.f / std::pow(rope.theta, exponent);
  }
  switch (rope.type) {
    case RopeType::kDefault:
      break;
    case RopeType::kLinear:
      for (float& f : inv_freq) f /= rope.factor;
      break;
    case RopeType::kLlama3: {
      // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
      // interpolated smoothly (transformers' _compute_llama3_parameters).
      const float old_context = static_cast<float>(rope.original_max_position);
      const float low_freq_wavelen = old_context / rope.low_freq_factor;
      const float high_freq_wavelen = old_context / rope.high_freq_factor;
      const float pi = 3.14159265358979323846f;
      for (float& f : inv_freq) {
        const float wavelen = 2.f * pi / f;
        if (wavelen > low_freq_wavelen) {
          f = f / rope.factor;
        } else if (wavelen >= high_freq_wavelen) {
          const float smooth = (old_context / wavelen - rope.low_freq_factor) /
                               (rope.high_freq_factor - rope.low_freq_factor);
          f = (1.f - smooth) * f / rope.factor + smooth * f;
        }
      }
      break;
    }
  }
  if (!rope.freq_factors.empty()) {
    if (static_cast<int>(rope.freq_factors.size()) != half) {
      throw std::invalid_argument("rope frequency factors: " +
                                  std::to_string(rope.freq_factors.size()) + " given, " +
                                  std::to_string(half) + " rotary frequencies");
    }
    for (int i = 0; i < half; ++i) inv_freq[i] /= rope.freq_factors[i];
  }
  return inv_freq;
}

}  // namespace ftengine::models
