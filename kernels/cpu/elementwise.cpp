#include "kernels/cpu/elementwise.h"

#include <cmath>
#include <algorithm>
#include <cstring>

#include "kernels/cpu/bfloat16.h"

namespace ftengine::kernels::cpu {

namespace {
// Below this many elements a row-wise op runs on the calling thread: waking the team costs
// more than the work (a decode step has one row of a few thousand elements per op).
constexpr int64_t kParallelElements = 1 << 15;
}  // namespace

void rmsnorm(const float* x, const float* weight, int64_t rows, int64_t cols, float eps,
             float* out) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    float* out_row = out + r * cols;
    float sum_squares = 0.f;
#pragma omp simd reduction(+ : sum_squares)
    for (int64_t c = 0; c < cols; ++c) sum_squares += row[c] * row[c];
    const float inverse_rms = 1.f / std::sqrt(sum_squares / static_cast<float>(cols) + eps);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) out_row[c] = row[c] * inverse_rms * weight[c];
  }
}

void layernorm(const float* x, const float* weight, const float* bias, int64_t rows,
               int64_t cols, float eps, float* out) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    float* out_row = out + r * cols;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < cols; ++c) sum += row[c];
    const float mean = sum / static_cast<float>(cols);
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < cols; ++c) squares += (row[c] - mean) * (row[c] - mean);
    const float inverse_std = 1.f / std::sqrt(squares / static_cast<float>(cols) + eps);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      out_row[c] = (row[c] - mean) * inverse_std * weight[c] + bias[c];
    }
  }
}

void gelu_inplace(float* x, int64_t count) {
#pragma omp parallel for schedule(static) if (count > kParallelElements)
  for (int64_t i = 0; i < count; ++i) {
    x[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * 0.70710678118654752f));
  }
}

void copy_columns(const float* src, int64_t rows, int64_t src_cols, float* dst, int64_t dst_cols,
                  int64_t column) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * dst_cols + column, src + r * src_cols, src_cols * sizeof(float));
  }
}

void add_inplace(float* x, const float* y, int64_t count) {
#pragma omp parallel for simd schedule(static) if (count > kParallelElements)
  for (int64_t i = 0; i < count; ++i) x[i] += y[i];
}

void silu_mul(const float* gate_up, int64_t rows, int64_t cols, float* out) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = gate_up + r * 2 * cols;
    const float* up = gate + cols;
    float* out_row = out + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) out_row[c] = gate[c] / (1.f + std::exp(-gate[c])) * up[c];
  }
}

namespace {

template <typename Item, typename Widen>
void embedding(const Item* table, int64_t table_rows, int64_t first_id, const int32_t* ids,
               int64_t rows, int64_t cols, float* out, Widen widen) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = static_cast<int64_t>(ids[r]) - first_id;
    float* destination = out + r * cols;
    if (row < 0 || row >= table_rows) {
      std::fill_n(destination, cols, 0.f);
      continue;
    }
    const Item* source = table + row * cols;
    for (int64_t c = 0; c < cols; ++c) destination[c] = widen(source[c]);
  }
}

}  // namespace

void embedding_f32(const float* table, int64_t table_rows, int64_t first_id, const int32_t* ids,
                   int64_t rows, int64_t cols, float* out) {
  embedding(table, table_rows, first_id, ids, rows, cols, out, [](float v) { return v; });
}

void embedding_bf16(const uint16_t* table, int64_t table_rows, int64_t first_id,
                    const int32_t* ids, int64_t rows, int64_t cols, float* out) {
  embedding(table, table_rows, first_id, ids, rows, cols, out,
            [](uint16_t v) { return bf16_to_float(v); });
}

void add_bias(float* x, const float* bias, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) x[r * cols + c] += bias[c];
  }
}

void bf16_to_f32(const uint16_t* in, int64_t count, float* out) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_float(in[i]);
}

void f32_to_bf16(const float* in, int64_t count, uint16_t* out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) out[i] = float_to_bf16(in[i]);
}

void gather_rows(const float* x, const int32_t* rows, int64_t count, int64_t cols, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(out + i * cols, x + static_cast<int64_t>(rows[i]) * cols, cols * sizeof(float));
  }
}

}  // namespace ftengine::kernels::cpu
