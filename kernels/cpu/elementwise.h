// Row-wise CPU kernels of the decoder: norms, activations, gathers, conversions. Plain pointers
// in, results out; each runs its rows in parallel with OpenMP.
#pragma once

#include <cstdint>

namespace ftengine::kernels::cpu {

// out[r] = x[r] / sqrt(mean(x[r]²) + eps) * weight, accumulated in float32 like HF's LlamaRMSNorm.
void rmsnorm(const float* x, const float* weight, int64_t rows, int64_t cols, float eps,
             float* out);

// out[r] = (x[r] - mean) / sqrt(var + eps) * weight + bias, statistics in float32 like torch.
void layernorm(const float* x, const float* weight, const float* bias, int64_t rows,
               int64_t cols, float eps, float* out);

// x = gelu(x) with the exact erf form (torch's default, transformers' "gelu").
void gelu_inplace(float* x, int64_t count);

// dst[r][column + c] = src[r][c] for c < src_cols; dst rows are dst_cols wide.
void copy_columns(const float* src, int64_t rows, int64_t src_cols, float* dst, int64_t dst_cols,
                  int64_t column);

// x[i] += y[i]
void add_inplace(float* x, const float* y, int64_t count);

// gate_up[r] = [gate | up] (2 × cols wide); out[r] = silu(gate) * up.
void silu_mul(const float* gate_up, int64_t rows, int64_t cols, float* out);

// out[r] = table[ids[r] - first_id] widened to float32 when that row is one of the table's
// table_rows, else zeros: a vocabulary-parallel shard holds ids [first_id, first_id + table_rows)
// and the ranks' partial rows are summed afterwards.
void embedding_f32(const float* table, int64_t table_rows, int64_t first_id, const int32_t* ids,
                   int64_t rows, int64_t cols, float* out);
void embedding_bf16(const uint16_t* table, int64_t table_rows, int64_t first_id,
                    const int32_t* ids, int64_t rows, int64_t cols, float* out);

// x[r] += bias for every row.
void add_bias(float* x, const float* bias, int64_t rows, int64_t cols);

void bf16_to_f32(const uint16_t* in, int64_t count, float* out);
void f32_to_bf16(const float* in, int64_t count, uint16_t* out);

// out[i] = x[rows[i]] for row-major x with `cols` columns.
void gather_rows(const float* x, const int32_t* rows, int64_t count, int64_t cols, float* out);

}  // namespace ftengine::kernels::cpu
