// Split-KV decode: what the CUDA-core kernel (decode_split_kv_kernel.cuh) and the tensor-core
// kernel (decode_split_kv_mma.cuh) share: the launch arguments, cp.async and conversion helpers,
// where a CTA works (SplitCta), the cp.async ring that streams the paged KV cache, and how a CTA
// stores its result.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda/attention/attention_params.h"

namespace ftengine::kernels::cuda::decode_detail {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 16;     // query heads per KV head that one CTA packs
constexpr int kMaxHeadDim = 256;
constexpr int kMaxSplits = 256;   // bounds the merge kernel's shared weights
constexpr int kMergeHeadsPerCta = kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// n / d and n % d for 0 <= n < 2^31 with a multiply-high instead of a division (block_size is a
// run-time value, and every loaded token needs its block and slot).
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 1;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((1ull << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((1ull << 32) * ((1ull << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return (__umulhi(n, multiplier) + n) >> shift;
  }
};

// Everything both kernels read, filled once per launch on the host.
struct DecodeArgs {
  AttentionParams params;
  int num_splits = 1;
  float scale_log2 = 0.f;  // softmax_scale * log2(e): scores come out in log2 units
  FastDivmod block_size;
  // Workspace when num_splits > 1, rows normalised by their own sum:
  // partial_out[((seq * num_heads + head) * num_splits + split) * head_dim + d],
  // partial_lse[(seq * num_heads + head) * num_splits + split] (natural log; -inf: empty split).
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  // A split slice starts at a multiple of 64, so with block_size % 16 == 0 each 16-token step
  // of the tensor-core kernel lies in one cache block: one block id per step.
  bool blocks_hold_sub_chunks = false;
};

// ---------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ void cp_async_16_or_zero(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
#else
  *static_cast<uint4*>(smem) = valid ? __ldg(static_cast<const uint4*>(gmem)) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Programmatic dependent launch (Hopper): the merge kernel may be launched while the split
// kernel's last CTAs run, and waits here for its results.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}

__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

template <typename Element>
struct Convert;

template <>
struct Convert<__half> {
  __device__ __forceinline__ static float2 to_float2(uint32_t bits) {
    __half2 h;
    memcpy(&h, &bits, sizeof(h));
    return __half22float2(h);
  }
  __device__ __forceinline__ static uint32_t from_float2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
};

template <>
struct Convert<__nv_bfloat16> {
  // bf16 is the top half of a float32: exact with two integer ops.
  __device__ __forceinline__ static float2 to_float2(uint32_t bits) {
    return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
  }
  __device__ __forceinline__ static uint32_t from_float2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
};

template <typename Element>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = Convert<Element>::to_float2(words[i]);
    out[2 * i] = pair.x;
    out[2 * i + 1] = pair.y;
  }
}

template <typename Element>
__device__ __forceinline__ uint4 pack8(const float (&in)[8]) {
  return make_uint4(Convert<Element>::from_float2(in[0], in[1]),
                    Convert<Element>::from_float2(in[2], in[3]),
                    Convert<Element>::from_float2(in[4], in[5]),
                    Convert<Element>::from_float2(in[6], in[7]));
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// The KV positions [begin, end) that split `split` of a sequence with kv_len tokens owns: equal
// chunk-aligned slices of the real length, so that a graph captured for a long max_seqlen_kv
// still spreads a short sequence over all its splits.
__device__ __forceinline__ void split_range(int kv_len, int num_splits, int split, int chunk,
                                           int& begin, int& end) {
  const int per_split = ((kv_len + num_splits - 1) / num_splits + chunk - 1) / chunk * chunk;
  const int64_t first = static_cast<int64_t>(split) * per_split;
  begin = static_cast<int>(first < kv_len ? first : kv_len);
  end = static_cast<int>(first + per_split < kv_len ? first + per_split : kv_len);
}

// A split that owns no position: the merge skips its -inf partial; a lone split (kv_len == 0)
// writes the final answer, a zero row and lse -inf.
template <typename Element>
__device__ __forceinline__ void store_empty_split(const DecodeArgs& args, int seq, int split,
                                                  int q_token, int head0, int group) {
  const AttentionParams& p = args.params;
  const int vecs = p.head_dim / 8;
  if (args.num_splits == 1) {
    for (int i = threadIdx.x; i < group * vecs; i += kThreads) {
      auto* dst = static_cast<Element*>(p.out) + static_cast<int64_t>(q_token) * p.out_token_stride +
                  static_cast<int64_t>(head0 + i / vecs) * p.out_head_stride + (i % vecs) * 8;
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
    if (p.lse != nullptr && static_cast<int>(threadIdx.x) < group) {
      p.lse[static_cast<int64_t>(q_token) * p.num_heads + head0 + threadIdx.x] = kNegInf;
    }
  } else if (static_cast<int>(threadIdx.x) < group) {
    args.partial_lse[(static_cast<int64_t>(seq) * p.num_heads + head0 + threadIdx.x) *
                         args.num_splits +
                     split] = kNegInf;
  }
}

// Stores dims [8 * vec, 8 * vec + 8) of one head's normalised result, and its lse once per head:
// the final output when there is one split, else the split's partial row.
template <typename Element>
__device__ __forceinline__ void store_head_result(const DecodeArgs& args, int seq, int split,
                                                  int q_token, int head, int vec,
                                                  const float (&values)[8], float lse) {
  const AttentionParams& p = args.params;
  if (args.num_splits == 1) {
    auto* dst = static_cast<Element*>(p.out) + static_cast<int64_t>(q_token) * p.out_token_stride +
                static_cast<int64_t>(head) * p.out_head_stride + vec * 8;
    *reinterpret_cast<uint4*>(dst) = pack8<Element>(values);
    if (vec == 0 && p.lse != nullptr) p.lse[static_cast<int64_t>(q_token) * p.num_heads + head] = lse;
  } else {
    const int64_t row = (static_cast<int64_t>(seq) * p.num_heads + head) * args.num_splits + split;
    float4* dst = reinterpret_cast<float4*>(args.partial_out + row * p.head_dim + vec * 8);
    dst[0] = make_float4(values[0], values[1], values[2], values[3]);
    dst[1] = make_float4(values[4], values[5], values[6], values[7]);
    if (vec == 0) args.partial_lse[row] = lse;
  }
}

// ---------------------------------------------------------------------------------------------
// Where a CTA works and the ring it streams the paged KV cache through

// One CTA of a split kernel. grid (num_kv_heads, num_splits, batch), kThreads threads: the KV
// heads of one token range are neighbours in the launch order, and a cache slot holds every head,
// so CTAs running side by side read adjacent bytes.
struct SplitCta {
  int kv_head = blockIdx.x;
  int split = blockIdx.y;
  int seq = blockIdx.z;
  int q_token = 0;  // the sequence's one query token
  int group = 0;    // query heads per KV head
  int head0 = 0;    // the group's first query head
  int head_dim = 0;
  int begin = 0;    // the split's KV positions [begin, end)
  int end = 0;

  // Fills in the rest; false when the CTA has nothing to stream: no query this step, or an empty
  // split (whose result it has stored). Slices are chunk_tokens-aligned. Apart from the
  // constructor, and head_dim read here, so that both kernels' generated PTX stays what it was
  // before this code was shared (grid indices, then thread indices, then these loads).
  template <typename Element>
  __device__ __forceinline__ bool start(const DecodeArgs& args, int chunk_tokens) {
    const AttentionParams& p = args.params;
    q_token = p.cu_seqlens_q[seq];
    if (p.cu_seqlens_q[seq + 1] <= q_token) return false;  // no query this step
    const int kv_len = max(p.seqlens_kv[seq], 0);
    group = p.num_heads / p.num_kv_heads;
    head0 = kv_head * group;
    head_dim = p.head_dim;
    split_range(kv_len, args.num_splits, split, chunk_tokens, begin, end);
    if (begin >= end) {
      store_empty_split<Element>(args, seq, split, q_token, head0, group);
      return false;
    }
    return true;
  }
};

// The kStages-deep cp.async ring of both kernels, over num_steps steps (chunks of the CTA, or a
// warp's sub-chunks). Block ids are read one step ahead of their loads into registers, so their
// latency hides behind a step of work instead of stalling the cp.async issue.
// start: kStages - 1 steps in flight, then the block ids of the next one.
template <int kStages, typename FetchBlockIds, typename LoadStep>
__device__ __forceinline__ void start_kv_ring(int num_steps, FetchBlockIds&& fetch_block_ids,
                                              LoadStep&& load_step) {
#pragma unroll
  for (int step = 0; step < kStages - 1; ++step) {
    if (step < num_steps) {
      fetch_block_ids(step);
      load_step(step);
    }
    cp_async_commit();
  }
  if (kStages - 1 < num_steps) fetch_block_ids(kStages - 1);
}

// Once step `step` has landed and every thread is done with the stage that step - 1 used: refill
// that stage with step + kStages - 1.
template <int kStages, typename FetchBlockIds, typename LoadStep>
__device__ __forceinline__ void advance_kv_ring(int step, int num_steps,
                                                FetchBlockIds&& fetch_block_ids,
                                                LoadStep&& load_step) {
  const int next = step + kStages - 1;
  if (next < num_steps) {
    load_step(next);
    if (next + 1 < num_steps) fetch_block_ids(next + 1);
  }
  cp_async_commit();
}

}  // namespace ftengine::kernels::cuda::decode_detail
