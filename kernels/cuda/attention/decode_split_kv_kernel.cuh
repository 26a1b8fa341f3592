// Split-KV decode: the CUDA-core kernel (every architecture from Turing on) and the log-sum-exp
// merge. decode_split_kv_common.cuh holds what both split kernels share, decode_split_kv_mma.cuh
// the tensor-core kernel, decode_split_kv_launch.cuh the launchers; the public entry points are
// in decode_split_kv.h.
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

#include "kernels/cuda/attention/decode_split_kv_common.cuh"

namespace ftengine::kernels::cuda::decode_detail {

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
// Kernel 1: attention of one split; grid and block as SplitCta.

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
  SplitCta cta;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  if (!cta.start<Element>(args, kChunk)) return;
  const int head_dim = cta.head_dim;

  extern __shared__ __align__(16) unsigned char smem[];
  uint4* ring = reinterpret_cast<uint4*>(smem);
  float* query_s = reinterpret_cast<float*>(smem + Traits::kRingBytes);  // [kGroup][kDimPadded]
  float* score_s = query_s + kGroup * kDimPadded;                       // [kGroup][kChunk]
  float* prob_s = score_s + kGroup * kChunk;                            // [kChunk][kGroup]
  float* rescale_s = prob_s + kChunk * kGroup;                          // [kGroup]
  float* max_s = rescale_s + kGroup;                                    // [kGroup]
  float* sum_s = max_s + kGroup;                                        // [kGroup]

  // ---- Loads: this thread's column and its rows of each chunk. The tensor-core kernel sets up
  // its lane's column the same way; a shared column struct changed this kernel's PTX on sm_75
  // (tid and head_dim reuse, param addressing), so both keep their own.
  const int load_vec = tid % kVecs;
  const int load_row = tid / kVecs;
  const bool load_vec_valid = load_vec * 8 < head_dim;
  const int64_t head_offset = static_cast<int64_t>(cta.kv_head) * p.kv_head_stride + load_vec * 8;
  const auto* k_base = static_cast<const Element*>(p.k_cache) + head_offset;
  const auto* v_base = static_cast<const Element*>(p.v_cache) + head_offset;
  const int32_t* blocks = p.block_table + static_cast<int64_t>(cta.seq) * p.block_table_stride;
  const int num_chunks = (cta.end - cta.begin + kChunk - 1) / kChunk;

  int block_ids[Traits::kLoadsPerThread];
  auto fetch_block_ids = [&](int chunk) {
#pragma unroll
    for (int i = 0; i < Traits::kLoadsPerThread; ++i) {
      const int pos = cta.begin + chunk * kChunk + load_row + i * Traits::kLoadRows;
      block_ids[i] = pos < cta.end ? __ldg(blocks + args.block_size.div(pos)) : 0;
    }
  };
  auto load_chunk = [&](int chunk) {
    uint4* k_tile = ring + (chunk % kStages) * (2 * kChunk * kPitch);
    uint4* v_tile = k_tile + kChunk * kPitch;
#pragma unroll
    for (int i = 0; i < Traits::kLoadsPerThread; ++i) {
      const int row = load_row + i * Traits::kLoadRows;
      const int pos = cta.begin + chunk * kChunk + row;
      const bool valid = load_vec_valid && pos < cta.end;
      const int slot = pos - static_cast<int>(args.block_size.div(pos)) * p.block_size;
      const int64_t offset = valid ? static_cast<int64_t>(block_ids[i]) * p.kv_block_stride +
                                         static_cast<int64_t>(slot) * p.kv_token_stride
                                   : 0;
      cp_async_16_or_zero(k_tile + row * kPitch + load_vec, k_base + offset, valid);
      cp_async_16_or_zero(v_tile + row * kPitch + load_vec, v_base + offset, valid);
    }
  };
  start_kv_ring<kStages>(num_chunks, fetch_block_ids, load_chunk);

  // ---- Queries of the group, float32, scaled into log2 units; padding heads / dims are zero.
  {
    const auto* q =
        static_cast<const Element*>(p.q) + static_cast<int64_t>(cta.q_token) * p.q_token_stride;
    for (int i = tid; i < kGroup * kVecs; i += kThreads) {
      const int h = i / kVecs;
      const int v = i % kVecs;
      float values[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (h < cta.group && v * 8 < head_dim) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(
            q + static_cast<int64_t>(cta.head0 + h) * p.q_head_stride + v * 8));
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
    advance_kv_ring<kStages>(chunk, num_chunks, fetch_block_ids, load_chunk);

    const uint4* k_tile = ring + (chunk % kStages) * (2 * kChunk * kPitch);
    const uint4* v_tile = k_tile + kChunk * kPitch;
    const int chunk_begin = cta.begin + chunk * kChunk;

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
      const bool visible = chunk_begin + qk_token < cta.end;
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
    if (h >= cta.group || v * 8 >= head_dim) continue;
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
    store_head_result<Element>(args, cta.seq, cta.split, cta.q_token, cta.head0 + h, v, total,
                               lse);
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
