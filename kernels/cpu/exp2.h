// The online softmax's arithmetic shared by the CPU attention members: scores in log2 units,
// 2^x vectorisable inside `omp simd`, log-sum-exps back in natural log.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace ftengine::kernels::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x for x <= 0 with relative error ~2e-7, written so that gcc vectorises it inside an
// `omp simd` loop (std::exp2 is a libm call and would serialise the softmax). Inputs below
// -126 (masked or negligible scores, -inf included) give exactly 0.
inline float exp2_nonpositive(float x) {
  const float clamped = x < -126.f ? -126.f : x;
  // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits,
  // which avoids floor() and float-to-int conversions that gcc would not vectorise.
  constexpr float kRoundMagic = 12582912.f;
  const float shifted = clamped + kRoundMagic;
  const float whole = shifted - kRoundMagic;
  const float f = clamped - whole;  // in [-0.5, 0.5]
  // Cephes exp2f minimax polynomial on [-0.5, 0.5].
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  int32_t magic_bits;
  std::memcpy(&magic_bits, &kRoundMagic, sizeof(magic_bits));
  const int32_t exponent_bits = (shifted_bits - magic_bits + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  return x < -126.f ? 0.f : p * scale;
}

}  // namespace ftengine::kernels::cpu
