#include "kernels/cuda/elementwise.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

namespace ftengine::kernels::cuda {
namespace {

constexpr int kThreads = 256;

void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string(kernel) + " launch failed: " + cudaGetErrorString(error));
  }
}

unsigned int blocks_for(int64_t count, int threads = kThreads) {
  // Grid-stride loops cover the rest; 65535 x threads elements per pass is plenty.
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Runs `body.template operator()<T>()` with T the C++ type of `type`.
template <typename Body>
void dispatch_type(DataType type, Body&& body) {
  switch (type) {
    case DataType::kFloat32:
      body(float{});
      return;
    case DataType::kFloat16:
      body(__half{});
      return;
    case DataType::kBFloat16:
      body(__nv_bfloat16{});
      return;
  }
  throw std::invalid_argument("unknown data type");
}

template <typename Src, typename Dst>
__global__ void convert_kernel(const Src* src, Dst* dst, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_float<Dst>(to_float(src[i]));
  }
}

template <typename T>
__global__ void embedding_kernel(const T* table, int64_t table_rows, int64_t first_id,
                                 const int32_t* ids, int64_t cols, T* out) {
  const int64_t row = blockIdx.x;
  const int64_t local = static_cast<int64_t>(ids[row]) - first_id;
  const bool inside = local >= 0 && local < table_rows;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    out[row * cols + c] = inside ? table[local * cols + c] : from_float<T>(0.f);
  }
}

// Sum over the block; every thread gets the total. `scratch` holds one float per warp.
__device__ float block_sum(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// One block per row; each thread owns kVector consecutive elements of it, loaded with one
// 16-byte access and kept in registers between the sum of squares and the write: the row is
// read once. A decode step has a single row, so one block's latency is the whole kernel's
// (measured: 14 us a call with scalar loads and two reads, Llama-7B shape, H100).
template <typename T>
constexpr int kVector = 16 / sizeof(T);

template <typename T>
struct alignas(16) Vector {
  T values[kVector<T>];
};

template <typename T>
__global__ void add_rmsnorm_vector_kernel(T* x, const T* residual, const float* weight,
                                          int64_t cols, float eps, T* out) {
  __shared__ float scratch[32];
  constexpr int kWidth = kVector<T>;
  const int64_t offset = blockIdx.x * cols + static_cast<int64_t>(threadIdx.x) * kWidth;
  const bool active = static_cast<int64_t>(threadIdx.x) * kWidth < cols;
  float values[kWidth];
  float sum_squares = 0.f;
  if (active) {
    Vector<T> row = *reinterpret_cast<const Vector<T>*>(x + offset);
    if (residual) {
      const Vector<T> add = *reinterpret_cast<const Vector<T>*>(residual + offset);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) {
        // The sum is rounded to the activation type, as the unfused residual add stores it.
        row.values[i] = from_float<T>(to_float(row.values[i]) + to_float(add.values[i]));
      }
      *reinterpret_cast<Vector<T>*>(x + offset) = row;
    }
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      values[i] = to_float(row.values[i]);
      sum_squares += values[i] * values[i];
    }
  }
  const float inverse_rms = rsqrtf(block_sum(sum_squares, scratch) / cols + eps);
  if (active) {
    Vector<T> result;
    const int64_t column = static_cast<int64_t>(threadIdx.x) * kWidth;
#pragma unroll
    for (int i = 0; i < kWidth; ++i) {
      // HF's LlamaRMSNorm rounds the normalised value to the activation type before the weight.
      const float normed = to_float(from_float<T>(values[i] * inverse_rms));
      result.values[i] = from_float<T>(normed * weight[column + i]);
    }
    *reinterpret_cast<Vector<T>*>(out + offset) = result;
  }
}

// The general form, for rows that are not a multiple of the vector width or are too wide.
template <typename T>
__global__ void add_rmsnorm_kernel(T* x, const T* residual, const float* weight, int64_t cols,
                                   float eps, T* out) {
  __shared__ float scratch[32];
  T* row = x + blockIdx.x * cols;
  const T* residual_row = residual ? residual + blockIdx.x * cols : nullptr;
  float sum_squares = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float value = to_float(row[c]);
    if (residual_row) {
      const T stored = from_float<T>(value + to_float(residual_row[c]));
      row[c] = stored;
      value = to_float(stored);
    }
    sum_squares += value * value;
  }
  const float inverse_rms = rsqrtf(block_sum(sum_squares, scratch) / cols + eps);
  T* out_row = out + blockIdx.x * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float normed = to_float(from_float<T>(to_float(row[c]) * inverse_rms));
    out_row[c] = from_float<T>(normed * weight[c]);
  }
}

template <typename T>
__global__ void layernorm_kernel(const T* x, const float* weight, const float* bias,
                                 int64_t cols, float eps, T* out) {
  __shared__ float scratch[32];
  const T* row = x + blockIdx.x * cols;
  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) sum += to_float(row[c]);
  const float mean = block_sum(sum, scratch) / cols;
  float squares = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float centred = to_float(row[c]) - mean;
    squares += centred * centred;
  }
  const float inverse_std = rsqrtf(block_sum(squares, scratch) / cols + eps);
  T* out_row = out + blockIdx.x * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    out_row[c] = from_float<T>((to_float(row[c]) - mean) * inverse_std * weight[c] + bias[c]);
  }
}

template <typename T>
__global__ void gelu_kernel(T* x, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = to_float(x[i]);
    x[i] = from_float<T>(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
  }
}

template <typename T>
__global__ void silu_mul_kernel(const T* gate_up, int64_t rows, int64_t cols, T* out) {
  const int64_t count = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const float gate = to_float(gate_up[r * 2 * cols + c]);
    const float up = to_float(gate_up[r * 2 * cols + cols + c]);
    // silu rounded to the activation type before the product, as torch computes act(gate) * up.
    const float activated = to_float(from_float<T>(gate / (1.f + __expf(-gate))));
    out[i] = from_float<T>(activated * up);
  }
}

template <typename T>
__global__ void add_kernel(T* x, const T* y, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = from_float<T>(to_float(x[i]) + to_float(y[i]));
  }
}

template <typename T>
__global__ void add_bias_kernel(T* x, const float* bias, int64_t rows, int64_t cols) {
  const int64_t count = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = from_float<T>(to_float(x[i]) + bias[i % cols]);
  }
}

template <typename T>
__global__ void copy_columns_kernel(const T* src, int64_t rows, int64_t src_cols, T* dst,
                                    int64_t dst_cols, int64_t column) {
  const int64_t count = rows * src_cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / src_cols, c = i % src_cols;
    dst[r * dst_cols + column + c] = src[i];
  }
}

template <typename T>
__global__ void gather_rows_kernel(const T* x, const int32_t* rows, int64_t cols, T* out) {
  const int64_t source = rows[blockIdx.x];
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    out[blockIdx.x * cols + c] = x[source * cols + c];
  }
}

// Grid: (token, group of heads). The angles of a token are computed once into shared memory
// and shared by its heads (measured: 21 us a call for one decode token of the Llama-7B shape
// with a sincosf per rotated pair, H100). The last group of blocks also copies v.
constexpr int kRotaryHeadsPerBlock = 8;
constexpr int kMaxRotaryHalf = 256;

template <typename T, typename P>
__global__ void merge_attention_part_kernel(T* out, float* lse, const P* part_out,
                                            const float* part_lse, const int32_t* tokens,
                                            int64_t first_token, int32_t heads,
                                            int32_t head_dim) {
  const int64_t r = blockIdx.x;
  const int32_t head = blockIdx.y;
  const int64_t t = tokens ? tokens[r] : first_token + r;
  const float lse_a = lse[t * heads + head];
  const float lse_b = part_lse[r * heads + head];
  __syncthreads();  // every thread has read lse before thread 0 rewrites it below
  const float top = fmaxf(lse_a, lse_b);
  if (top == -INFINITY) return;  // neither part saw a key: out stays zero, lse -inf
  const float weight_a = __expf(lse_a - top), weight_b = __expf(lse_b - top);
  const float total = weight_a + weight_b;
  T* row = out + (t * heads + head) * head_dim;
  const P* part_row = part_out + (r * heads + head) * head_dim;
  for (int32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    row[d] = from_float<T>((weight_a * to_float(row[d]) + weight_b * to_float(part_row[d])) /
                           total);
  }
  if (threadIdx.x == 0) lse[t * heads + head] = top + __logf(total);
}

template <typename T>
__global__ void rotary_cache_write_kernel(RotaryCacheWriteParams p) {
  __shared__ float cos_table[kMaxRotaryHalf], sin_table[kMaxRotaryHalf];
  const int64_t t = blockIdx.x;
  const T* row = static_cast<const T*>(p.qkv) + t * p.qkv_token_stride;
  const int32_t half = p.rotary_dim / 2;
  // float32 angles, as HF computes them, so long positions round the same way.
  const float position = static_cast<float>(p.positions[t]);
  for (int32_t i = threadIdx.x; i < half; i += blockDim.x) {
    sincosf(position * p.inv_freq[i], &sin_table[i], &cos_table[i]);
  }
  __syncthreads();
  const int64_t slot = p.slot_mapping[t];
  int64_t block = slot / p.block_size;
  const bool host_tier = p.k_cache_host != nullptr && block >= p.host_first_block;
  if (host_tier) block -= p.host_first_block;
  const int64_t slot_offset = block * p.kv_block_stride + (slot % p.block_size) * p.kv_token_stride;
  T* q_out = static_cast<T*>(p.q_out) + t * static_cast<int64_t>(p.num_heads) * p.head_dim;
  T* k_cache = static_cast<T*>(host_tier ? p.k_cache_host : p.k_cache) + slot_offset;
  T* v_cache = static_cast<T*>(host_tier ? p.v_cache_host : p.v_cache) + slot_offset;
  const int32_t pairs = p.head_dim / 2;  // rotated pairs plus pass-through pairs per head
  const int32_t rotated_heads = p.num_heads + p.num_kv_heads;
  const int32_t first_head = blockIdx.y * kRotaryHeadsPerBlock;
  const int32_t heads = min(kRotaryHeadsPerBlock, rotated_heads - first_head);
  for (int32_t item = threadIdx.x; item < heads * pairs; item += blockDim.x) {
    const int32_t head = first_head + item / pairs, i = item % pairs;
    const T* in = row + static_cast<int64_t>(head) * p.head_dim;
    T* out = head < p.num_heads ? q_out + static_cast<int64_t>(head) * p.head_dim
                                : k_cache + (head - p.num_heads) * p.kv_head_stride;
    // Element indices of this pair: (2i, 2i+1) interleaved, (i, i + half) half-split; pairs past
    // the rotary part are copied.
    int32_t first, second;
    if (p.interleaved) {
      first = 2 * i;
      second = 2 * i + 1;
    } else if (i < half) {
      first = i;
      second = i + half;
    } else {
      first = p.rotary_dim + 2 * (i - half);
      second = first + 1;
    }
    const float a = to_float(in[first]), b = to_float(in[second]);
    if (i < half) {
      out[first] = from_float<T>(a * cos_table[i] - b * sin_table[i]);
      out[second] = from_float<T>(b * cos_table[i] + a * sin_table[i]);
    } else {
      out[first] = in[first];
      out[second] = in[second];
    }
  }
  if (blockIdx.y == gridDim.y - 1) {
    const T* v_row = row + static_cast<int64_t>(p.num_heads + p.num_kv_heads) * p.head_dim;
    for (int32_t item = threadIdx.x; item < p.num_kv_heads * p.head_dim; item += blockDim.x) {
      const int32_t head = item / p.head_dim, d = item % p.head_dim;
      v_cache[head * p.kv_head_stride + d] = v_row[item];
    }
  }
}

}  // namespace

void convert(const void* src, DataType src_type, void* dst, DataType dst_type, int64_t count,
             cudaStream_t stream) {
  if (count == 0) return;
  dispatch_type(src_type, [&](auto src_tag) {
    using Src = decltype(src_tag);
    dispatch_type(dst_type, [&](auto dst_tag) {
      using Dst = decltype(dst_tag);
      convert_kernel<Src, Dst><<<blocks_for(count), kThreads, 0, stream>>>(
          static_cast<const Src*>(src), static_cast<Dst*>(dst), count);
    });
  });
  check_launch("convert");
}

void embedding(const void* table, int64_t table_rows, int64_t first_id, const int32_t* ids,
               int64_t rows, int64_t cols, DataType type, void* out, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    embedding_kernel<T><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(table), table_rows, first_id, ids, cols, static_cast<T*>(out));
  });
  check_launch("embedding");
}

void add_rmsnorm(void* x, const void* residual, const float* weight, int64_t rows, int64_t cols,
                 float eps, DataType type, void* out, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    constexpr int width = kVector<T>;
    const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    if (cols % width == 0 && cols / width <= 1024 && aligned(x) && aligned(out) &&
        (!residual || aligned(residual))) {
      const int threads = static_cast<int>((cols / width + 31) / 32 * 32);
      add_rmsnorm_vector_kernel<T><<<static_cast<unsigned int>(rows), threads, 0, stream>>>(
          static_cast<T*>(x), static_cast<const T*>(residual), weight, cols, eps,
          static_cast<T*>(out));
    } else {
      add_rmsnorm_kernel<T><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
          static_cast<T*>(x), static_cast<const T*>(residual), weight, cols, eps,
          static_cast<T*>(out));
    }
  });
  check_launch("add_rmsnorm");
}

void layernorm(const void* x, const float* weight, const float* bias, int64_t rows, int64_t cols,
               float eps, DataType type, void* out, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    layernorm_kernel<T><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(x), weight, bias, cols, eps, static_cast<T*>(out));
  });
  check_launch("layernorm");
}

void gelu_inplace(void* x, int64_t count, DataType type, cudaStream_t stream) {
  if (count == 0) return;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    gelu_kernel<T><<<blocks_for(count), kThreads, 0, stream>>>(static_cast<T*>(x), count);
  });
  check_launch("gelu");
}

void silu_mul(const void* gate_up, int64_t rows, int64_t cols, DataType type, void* out,
              cudaStream_t stream) {
  if (rows * cols == 0) return;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    silu_mul_kernel<T><<<blocks_for(rows * cols), kThreads, 0, stream>>>(
        static_cast<const T*>(gate_up), rows, cols, static_cast<T*>(out));
  });
  check_launch("silu_mul");
}

void add_inplace(void* x, const void* y, int64_t count, DataType type, cudaStream_t stream) {
  if (count == 0) return;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    add_kernel<T><<<blocks_for(count), kThreads, 0, stream>>>(static_cast<T*>(x),
                                                               static_cast<const T*>(y), count);
  });
  check_launch("add_inplace");
}

void add_bias(void* x, const float* bias, int64_t rows, int64_t cols, DataType type,
              cudaStream_t stream) {
  if (rows * cols == 0) return;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    add_bias_kernel<T><<<blocks_for(rows * cols), kThreads, 0, stream>>>(static_cast<T*>(x),
                                                                          bias, rows, cols);
  });
  check_launch("add_bias");
}

void copy_columns(const void* src, int64_t rows, int64_t src_cols, void* dst, int64_t dst_cols,
                  int64_t column, DataType type, cudaStream_t stream) {
  if (rows * src_cols == 0) return;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    copy_columns_kernel<T><<<blocks_for(rows * src_cols), kThreads, 0, stream>>>(
        static_cast<const T*>(src), rows, src_cols, static_cast<T*>(dst), dst_cols, column);
  });
  check_launch("copy_columns");
}

void gather_rows(const void* x, const int32_t* rows, int64_t count, int64_t cols, DataType type,
                 void* out, cudaStream_t stream) {
  if (count == 0) return;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    gather_rows_kernel<T><<<static_cast<unsigned int>(count), kThreads, 0, stream>>>(
        static_cast<const T*>(x), rows, cols, static_cast<T*>(out));
  });
  check_launch("gather_rows");
}

void merge_attention_part(void* out, float* lse, DataType type, const void* part_out,
                          const float* part_lse, DataType part_type, const int32_t* tokens,
                          int64_t first_token, int64_t rows, int32_t heads, int32_t head_dim,
                          cudaStream_t stream) {
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned int>(rows), static_cast<unsigned int>(heads));
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    dispatch_type(part_type, [&](auto part_tag) {
      using P = decltype(part_tag);
      merge_attention_part_kernel<T, P><<<grid, 128, 0, stream>>>(
          static_cast<T*>(out), lse, static_cast<const P*>(part_out), part_lse, tokens,
          first_token, heads, head_dim);
    });
  });
  check_launch("merge_attention_part");
}

void rotary_cache_write(const RotaryCacheWriteParams& params, cudaStream_t stream) {
  if (params.tokens == 0) return;
  if (params.head_dim % 2 != 0 || params.rotary_dim % 2 != 0 ||
      params.rotary_dim > params.head_dim || params.rotary_dim / 2 > kMaxRotaryHalf) {
    throw std::invalid_argument(
        "rotary_cache_write: head_dim and rotary_dim must be even, rotary_dim at most 512");
  }
  const dim3 grid(static_cast<unsigned int>(params.tokens),
                  (params.num_heads + params.num_kv_heads + kRotaryHeadsPerBlock - 1) /
                      kRotaryHeadsPerBlock);
  dispatch_type(params.type, [&](auto tag) {
    using T = decltype(tag);
    rotary_cache_write_kernel<T><<<grid, 256, 0, stream>>>(params);
  });
  check_launch("rotary_cache_write");
}

}  // namespace ftengine::kernels::cuda
