// Split-KV decode: shared device code, the CUDA-core kernel (every architecture from Turing on)
// and the log-sum-exp merge. decode_split_kv_mma.cuh holds the tensor-core kernel,
// decode_split_kv_launch.cuh the launchers; the public entry points are in decode_split_kv.h.
//
// One CTA owns (split, KV head, sequence): the query heads of its GQA group, one token each, and
// a contiguous slice of that sequence's KV positions. The slice is streamed in chunks of
// kChunkTokens tokens through a kStages-deep cp.async ring in shared memory (16-byte, coalesced,
// read once), and each chunk is consumed in three steps separated by CTA barriers:
//   scores:  one thread per (token, few heads) takes a whole K row from shared memory; the query
//            rows sit there too, as float32 already scaled into log2 units. No shuffles.
//   softmax: one warp per head keeps the running max / sum (online softmax) in registers.
//   P·V:     one thread per (16-byte slice of head_dim, few heads, token subset) accumulates in
//            float32 registers; the token subsets are summed once, at the end.
// Everything is float32 from the conversion on; CUDA cores only, so the same code runs on Turing
// (where cp.async becomes a plain load + store).
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

// kHeadDimVecs: 16-byte vectors per K/V row (head_dim / 8, rounded up to the instance's size);
// kGroup: query heads per KV head rounded up to a power of two (extra heads see zero queries and
// are never written).
template <typename Element_, int kHeadDimVecs_, int kGroup_, int kChunkTokens_, int kStages_>
struct DecodeTraits {
  using Element = Element_;
  static constexpr int kHeadDimVecs = kHeadDimVecs_;
  static constexpr int kHeadDimPadded = kHeadDimVecs * 8;
  static constexpr int kGroup = kGroup_;
  static constexpr int kChunkTokens = kChunkTokens_;
  static constexpr int kStages = kStages_;

  // One spare vector per shared-memory row makes the row pitch an odd number of 16-byte units,
  // so the 8 threads of a quarter-warp reading one column of 8 consecutive rows (the score step)
  // hit 8 different bank quads.
  static constexpr int kRowPitchVecs = kHeadDimVecs + 1;

  // Score step: thread -> (token, group of kQkHeads heads).
  static constexpr int kQkHeadGroups = kThreads / kChunkTokens;
  static constexpr int kQkHeads = (kGroup + kQkHeadGroups - 1) / kQkHeadGroups;

  // Softmax step: warp w owns heads w, w + kWarps, ...
  static constexpr int kSoftmaxHeadsPerWarp = (kGroup + kWarps - 1) / kWarps;
  static constexpr int kSoftmaxTokensPerLane = (kChunkTokens + 31) / 32;

  // P·V step: thread -> (vector of head_dim, group of kPvHeads heads, token subset); at most 8
  // heads per thread keep the accumulators at 64 registers.
  static constexpr int kPvHeads = kGroup < 8 ? kGroup : 8;
  static constexpr int kPvHeadGroups = kGroup / kPvHeads;
  static constexpr int kPvTokenGroups = kThreads / (kHeadDimVecs * kPvHeadGroups);

  // Loads: thread -> (vector of head_dim, rows tid / kHeadDimVecs + i * kLoadRows).
  static constexpr int kLoadRows = kThreads / kHeadDimVecs;
  static constexpr int kLoadsPerThread = kChunkTokens / kLoadRows;

  static constexpr int kTileBytes = kChunkTokens * kRowPitchVecs * 16;  // K or V of one chunk
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kPipelineBytes = kStages * kStageBytes;
  // The epilogue reuses the ring to sum the token subsets' accumulators.
  static constexpr int kReduceBytes = kThreads * kPvHeads * 8 * 4;
  static constexpr int kRingBytes = kPipelineBytes > kReduceBytes ? kPipelineBytes : kReduceBytes;
  static constexpr int kQueryBytes = kGroup * kHeadDimPadded * 4;
  static constexpr int kScoreBytes = kGroup * kChunkTokens * 4;  // [head][token]
  static constexpr int kProbBytes = kChunkTokens * kGroup * 4;   // [token][head]
  static constexpr int kStatBytes = 3 * kGroup * 4;              // rescale, final max, final sum
  static constexpr int kSmemBytes =
      kRingBytes + kQueryBytes + kScoreBytes + kProbBytes + kStatBytes;

  static_assert(kThreads % kChunkTokens == 0, "a score pass covers the chunk exactly");
  static_assert(kThreads % kHeadDimVecs == 0 && kChunkTokens % kLoadRows == 0,
                "loads cover the chunk exactly");
  static_assert(kThreads % (kHeadDimVecs * kPvHeadGroups) == 0 &&
                    kChunkTokens % kPvTokenGroups == 0,
                "P·V threads tile exactly");
  static_assert(kStages >= 2, "the ring needs a stage in flight while one is consumed");
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
// Kernel 1: attention of one split. grid (num_kv_heads, num_splits, batch), kThreads threads: the
// KV heads of one token range are neighbours in the launch order, and a cache slot holds every
// head, so CTAs running side by side read adjacent bytes.

template <typename Traits>
__global__ void __launch_bounds__(kThreads) decode_split_kv_kernel(const DecodeArgs args) {
  using Element = typename Traits::Element;
  constexpr int kVecs = Traits::kHeadDimVecs;
  constexpr int kDimPadded = Traits::kHeadDimPadded;
  constexpr int kGroup = Traits::kGroup;
  constexpr int kChunk = Traits::kChunkTokens;
  constexpr int kStages = Traits::kStages;
  constexpr int kPitch = Traits::kRowPitchVecs;

  allow_dependent_launch();

  const AttentionParams& p = args.params;
  const int kv_head = blockIdx.x;
  const int split = blockIdx.y;
  const int seq = blockIdx.z;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  const int q_token = p.cu_seqlens_q[seq];
  if (p.cu_seqlens_q[seq + 1] <= q_token) return;  // no query this step
  const int kv_len = max(p.seqlens_kv[seq], 0);
  const int group = p.num_heads / p.num_kv_heads;
  const int head0 = kv_head * group;
  const int head_dim = p.head_dim;

  int begin, end;
  split_range(kv_len, args.num_splits, split, kChunk, begin, end);

  if (begin >= end) {
    store_empty_split<Element>(args, seq, split, q_token, head0, group);
    return;
  }

  extern __shared__ __align__(16) unsigned char smem[];
  uint4* ring = reinterpret_cast<uint4*>(smem);
  float* query_s = reinterpret_cast<float*>(smem + Traits::kRingBytes);  // [kGroup][kDimPadded]
  float* score_s = query_s + kGroup * kDimPadded;                       // [kGroup][kChunk]
  float* prob_s = score_s + kGroup * kChunk;                            // [kChunk][kGroup]
  float* rescale_s = prob_s + kChunk * kGroup;                          // [kGroup]
  float* max_s = rescale_s + kGroup;                                    // [kGroup]
  float* sum_s = max_s + kGroup;                                        // [kGroup]

  // ---- Loads: this thread's column and its rows of each chunk.
  const int load_vec = tid % kVecs;
  const int load_row = tid / kVecs;
  const bool load_vec_valid = load_vec * 8 < head_dim;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * p.kv_head_stride + load_vec * 8;
  const auto* k_base = static_cast<const Element*>(p.k_cache) + head_offset;
  const auto* v_base = static_cast<const Element*>(p.v_cache) + head_offset;
  const int32_t* blocks = p.block_table + static_cast<int64_t>(seq) * p.block_table_stride;
  const int num_chunks = (end - begin + kChunk - 1) / kChunk;

  // Block ids are read one chunk ahead into registers, so their latency hides behind a chunk of
  // work instead of stalling the cp.async issue.
  int block_ids[Traits::kLoadsPerThread];
  auto fetch_block_ids = [&](int chunk) {
#pragma unroll
    for (int i = 0; i < Traits::kLoadsPerThread; ++i) {
      const int pos = begin + chunk * kChunk + load_row + i * Traits::kLoadRows;
      block_ids[i] = pos < end ? __ldg(blocks + args.block_size.div(pos)) : 0;
    }
  };
  auto load_chunk = [&](int chunk) {
    uint4* k_tile = ring + (chunk % kStages) * (2 * kChunk * kPitch);
    uint4* v_tile = k_tile + kChunk * kPitch;
#pragma unroll
    for (int i = 0; i < Traits::kLoadsPerThread; ++i) {
      const int row = load_row + i * Traits::kLoadRows;
      const int pos = begin + chunk * kChunk + row;
      const bool valid = load_vec_valid && pos < end;
      const int slot = pos - static_cast<int>(args.block_size.div(pos)) * p.block_size;
      const int64_t offset = valid ? static_cast<int64_t>(block_ids[i]) * p.kv_block_stride +
                                         static_cast<int64_t>(slot) * p.kv_token_stride
                                   : 0;
      cp_async_16_or_zero(k_tile + row * kPitch + load_vec, k_base + offset, valid);
      cp_async_16_or_zero(v_tile + row * kPitch + load_vec, v_base + offset, valid);
    }
  };

  // Prologue: kStages - 1 chunks in flight, then the block ids of the next one.
#pragma unroll
  for (int chunk = 0; chunk < kStages - 1; ++chunk) {
    if (chunk < num_chunks) {
      fetch_block_ids(chunk);
      load_chunk(chunk);
    }
    cp_async_commit();
  }
  if (kStages - 1 < num_chunks) fetch_block_ids(kStages - 1);

  // ---- Queries of the group, float32, scaled into log2 units; padding heads / dims are zero.
  {
    const auto* q = static_cast<const Element*>(p.q) + static_cast<int64_t>(q_token) * p.q_token_stride;
    for (int i = tid; i < kGroup * kVecs; i += kThreads) {
      const int h = i / kVecs;
      const int v = i % kVecs;
      float values[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (h < group && v * 8 < head_dim) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(
            q + static_cast<int64_t>(head0 + h) * p.q_head_stride + v * 8));
        unpack8<Element>(raw, values);
#pragma unroll
        for (int e = 0; e < 8; ++e) values[e] *= args.scale_log2;
      }
      float4* dst = reinterpret_cast<float4*>(query_s + h * kDimPadded + v * 8);
      dst[0] = make_float4(values[0], values[1], values[2], values[3]);
      dst[1] = make_float4(values[4], values[5], values[6], values[7]);
    }
  }

  // ---- Per-thread roles.
  const int qk_token = tid % kChunk;
  const int qk_head0 = (tid / kChunk) * Traits::kQkHeads;
  const int pv_vec = tid % kVecs;
  const int pv_head0 = ((tid / kVecs) % Traits::kPvHeadGroups) * Traits::kPvHeads;
  const int pv_token0 = tid / (kVecs * Traits::kPvHeadGroups);

  float running_max[Traits::kSoftmaxHeadsPerWarp];
  float running_sum[Traits::kSoftmaxHeadsPerWarp];
#pragma unroll
  for (int j = 0; j < Traits::kSoftmaxHeadsPerWarp; ++j) {
    running_max[j] = kNegInf;
    running_sum[j] = 0.f;
  }
  float acc[Traits::kPvHeads][8];
#pragma unroll
  for (int j = 0; j < Traits::kPvHeads; ++j) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[j][e] = 0.f;
  }

  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    // Chunk `chunk` has landed for this thread; the barrier makes it everyone's, and frees the
    // stage that chunk - 1 used for the next load.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int next = chunk + kStages - 1;
      if (next < num_chunks) {
        load_chunk(next);
        if (next + 1 < num_chunks) fetch_block_ids(next + 1);
      }
      cp_async_commit();
    }

    const uint4* k_tile = ring + (chunk % kStages) * (2 * kChunk * kPitch);
    const uint4* v_tile = k_tile + kChunk * kPitch;
    const int chunk_begin = begin + chunk * kChunk;

    // ---- Scores: s[h][t] = q_h · k_t, in log2 units.
    {
      float score[Traits::kQkHeads][2];
#pragma unroll
      for (int j = 0; j < Traits::kQkHeads; ++j) score[j][0] = score[j][1] = 0.f;
      const uint4* k_row = k_tile + qk_token * kPitch;
      // Unrolled 4 deep: enough shared-memory loads in flight; a full unroll lets the compiler
      // hoist every load of the row and spill at 8+ heads or head_dim 256.
#pragma unroll 4
      for (int v = 0; v < kVecs; ++v) {
        float k[8];
        unpack8<Element>(k_row[v], k);
#pragma unroll
        for (int j = 0; j < Traits::kQkHeads; ++j) {
          // Heads past kGroup exist only when the head groups outnumber kGroup; they read row 0
          // and are not stored.
          const int h = qk_head0 + j < kGroup ? qk_head0 + j : 0;
          const float4 qa = *reinterpret_cast<const float4*>(query_s + h * kDimPadded + v * 8);
          const float4 qb = *reinterpret_cast<const float4*>(query_s + h * kDimPadded + v * 8 + 4);
          // Two chains per head: the FMA latency would otherwise serialise the whole row.
          score[j][0] = fmaf(qa.x, k[0], score[j][0]);
          score[j][1] = fmaf(qa.y, k[1], score[j][1]);
          score[j][0] = fmaf(qa.z, k[2], score[j][0]);
          score[j][1] = fmaf(qa.w, k[3], score[j][1]);
          score[j][0] = fmaf(qb.x, k[4], score[j][0]);
          score[j][1] = fmaf(qb.y, k[5], score[j][1]);
          score[j][0] = fmaf(qb.z, k[6], score[j][0]);
          score[j][1] = fmaf(qb.w, k[7], score[j][1]);
        }
      }
      const bool visible = chunk_begin + qk_token < end;
#pragma unroll
      for (int j = 0; j < Traits::kQkHeads; ++j) {
        if (qk_head0 + j < kGroup) {
          score_s[(qk_head0 + j) * kChunk + qk_token] =
              visible ? score[j][0] + score[j][1] : kNegInf;
        }
      }
    }
    __syncthreads();

    // ---- Online softmax, one warp per head.
#pragma unroll
    for (int j = 0; j < Traits::kSoftmaxHeadsPerWarp; ++j) {
      const int h = warp + j * kWarps;
      if (h < kGroup) {
        float s[Traits::kSoftmaxTokensPerLane];
        float chunk_max = kNegInf;
#pragma unroll
        for (int i = 0; i < Traits::kSoftmaxTokensPerLane; ++i) {
          const int t = lane + 32 * i;
          s[i] = t < kChunk ? score_s[h * kChunk + t] : kNegInf;
          chunk_max = fmaxf(chunk_max, s[i]);
        }
        // The chunk holds at least one visible token, so new_max is finite.
        const float new_max = fmaxf(running_max[j], warp_max(chunk_max));
        const float rescale = exp2f(running_max[j] - new_max);  // 0 on the first chunk
        float chunk_sum = 0.f;
#pragma unroll
        for (int i = 0; i < Traits::kSoftmaxTokensPerLane; ++i) {
          const int t = lane + 32 * i;
          const float prob = exp2f(s[i] - new_max);
          chunk_sum += prob;
          if (t < kChunk) prob_s[t * kGroup + h] = prob;
        }
        running_sum[j] = running_sum[j] * rescale + warp_sum(chunk_sum);
        running_max[j] = new_max;
        if (lane == 0) rescale_s[h] = rescale;
      }
    }
    __syncthreads();

    // ---- P·V: acc[h][:] = acc[h][:] * rescale[h] + sum_t p[t][h] * v[t][:].
    {
#pragma unroll
      for (int j = 0; j < Traits::kPvHeads; ++j) {
        const float rescale = rescale_s[pv_head0 + j];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[j][e] *= rescale;
      }
#pragma unroll 4
      for (int i = 0; i < kChunk / Traits::kPvTokenGroups; ++i) {
        const int t = pv_token0 + i * Traits::kPvTokenGroups;
        float v[8];
        unpack8<Element>(v_tile[t * kPitch + pv_vec], v);
        float prob[Traits::kPvHeads];
        const float* prob_row = prob_s + t * kGroup + pv_head0;
        if constexpr (Traits::kPvHeads % 4 == 0) {
#pragma unroll
          for (int j = 0; j < Traits::kPvHeads; j += 4) {
            const float4 p4 = *reinterpret_cast<const float4*>(prob_row + j);
            prob[j] = p4.x;
            prob[j + 1] = p4.y;
            prob[j + 2] = p4.z;
            prob[j + 3] = p4.w;
          }
        } else if constexpr (Traits::kPvHeads == 2) {
          const float2 p2 = *reinterpret_cast<const float2*>(prob_row);
          prob[0] = p2.x;
          prob[1] = p2.y;
        } else {
          prob[0] = prob_row[0];
        }
#pragma unroll
        for (int j = 0; j < Traits::kPvHeads; ++j) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[j][e] += prob[j] * v[e];
        }
      }
    }
  }

  // ---- Epilogue: sum the token subsets through the (now idle) ring, normalise, store.
  cp_async_wait<0>();
  __syncthreads();
  float* reduce_s = reinterpret_cast<float*>(smem);  // [token subset][kGroup][kDimPadded]
#pragma unroll
  for (int j = 0; j < Traits::kPvHeads; ++j) {
    float4* dst = reinterpret_cast<float4*>(reduce_s + (pv_token0 * kGroup + pv_head0 + j) *
                                                           kDimPadded + pv_vec * 8);
    dst[0] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    dst[1] = make_float4(acc[j][4], acc[j][5], acc[j][6], acc[j][7]);
  }
#pragma unroll
  for (int j = 0; j < Traits::kSoftmaxHeadsPerWarp; ++j) {
    const int h = warp + j * kWarps;
    if (h < kGroup && lane == 0) {
      max_s[h] = running_max[j];
      sum_s[h] = running_sum[j];
    }
  }
  __syncthreads();

  for (int i = tid; i < kGroup * kVecs; i += kThreads) {
    const int h = i / kVecs;
    const int v = i % kVecs;
    if (h >= group || v * 8 >= head_dim) continue;
    float total[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int z = 0; z < Traits::kPvTokenGroups; ++z) {
      const float4* src =
          reinterpret_cast<const float4*>(reduce_s + (z * kGroup + h) * kDimPadded + v * 8);
      const float4 a = src[0];
      const float4 b = src[1];
      total[0] += a.x;
      total[1] += a.y;
      total[2] += a.z;
      total[3] += a.w;
      total[4] += b.x;
      total[5] += b.y;
      total[6] += b.z;
      total[7] += b.w;
    }
    // At least one visible key contributed exp2(0) = 1, so the sum is >= 1.
    const float inv_sum = 1.f / sum_s[h];
#pragma unroll
    for (int e = 0; e < 8; ++e) total[e] *= inv_sum;
    const float lse = (max_s[h] + log2f(sum_s[h])) * kLn2;
    store_head_result<Element>(args, seq, split, q_token, head0 + h, v, total, lse);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: merge the splits of every (sequence, head) by log-sum-exp. grid (ceil(num_heads /
// kMergeHeadsPerCta), batch), one warp per head.

template <typename Element>
__global__ void __launch_bounds__(kThreads) decode_merge_kernel(const DecodeArgs args) {
  __shared__ float weights_s[kMergeHeadsPerCta][kMaxSplits];

  wait_for_prerequisite_grid();

  const AttentionParams& p = args.params;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int head = blockIdx.x * kMergeHeadsPerCta + warp;
  const int seq = blockIdx.y;
  if (head >= p.num_heads) return;
  const int q_token = p.cu_seqlens_q[seq];
  if (p.cu_seqlens_q[seq + 1] <= q_token) return;

  const int num_splits = args.num_splits;
  const int64_t row0 = (static_cast<int64_t>(seq) * p.num_heads + head) * num_splits;
  const float* lse_in = args.partial_lse + row0;

  float max_lse = kNegInf;
  for (int s = lane; s < num_splits; s += 32) max_lse = fmaxf(max_lse, lse_in[s]);
  max_lse = warp_max(max_lse);

  auto* out = static_cast<Element*>(p.out) + static_cast<int64_t>(q_token) * p.out_token_stride +
              static_cast<int64_t>(head) * p.out_head_stride;
  float* lse_out = p.lse == nullptr ? nullptr : p.lse + static_cast<int64_t>(q_token) * p.num_heads + head;
  if (max_lse == kNegInf) {  // no key at all
    for (int d = lane * 4; d < p.head_dim; d += 128) *reinterpret_cast<uint2*>(out + d) = make_uint2(0, 0);
    if (lse_out != nullptr && lane == 0) *lse_out = kNegInf;
    return;
  }

  float sum = 0.f;
  for (int s = lane; s < num_splits; s += 32) {
    const float w = expf(lse_in[s] - max_lse);  // 0 for an empty split
    weights_s[warp][s] = w;
    sum += w;
  }
  sum = warp_sum(sum);
  __syncwarp();
  const float inv_sum = 1.f / sum;

  const float* partial = args.partial_out + row0 * p.head_dim;
  for (int d = lane * 4; d < p.head_dim; d += 128) {
    float4 total = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < num_splits; ++s) {
      const float w = weights_s[warp][s];
      if (w == 0.f) continue;  // an empty split wrote no output row
      const float4 o = *reinterpret_cast<const float4*>(partial + static_cast<int64_t>(s) * p.head_dim + d);
      total.x += w * o.x;
      total.y += w * o.y;
      total.z += w * o.z;
      total.w += w * o.w;
    }
    *reinterpret_cast<uint2*>(out + d) =
        make_uint2(Convert<Element>::from_float2(total.x * inv_sum, total.y * inv_sum),
                   Convert<Element>::from_float2(total.z * inv_sum, total.w * inv_sum));
  }
  if (lse_out != nullptr && lane == 0) *lse_out = max_lse + logf(sum);
}

}  // namespace ftengine::kernels::cuda::decode_detail
