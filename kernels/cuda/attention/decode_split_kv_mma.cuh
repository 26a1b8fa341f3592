// Split-KV decode on the tensor cores (Ampere and newer): the same CTA / split / merge scheme as
// the CUDA-core kernel in decode_split_kv_kernel.cuh, with both products on mma.sync m16n8k16.
//
// The GQA group (up to 16 query heads of one KV head) is the 16-row A operand, so one MMA scores
// 8 tokens over 16 dims; with 4 query heads 3/4 of each MMA is padding, which costs nothing
// here. Against the CUDA-core kernel (~55 instructions per token: shared-memory operand loads,
// conversions, FMAs, three CTA barriers per chunk) this one issues ~15 per token and has no CTA
// barrier in its loop. On the H100 the two streamed within -7%..+6% of each other at equal split
// counts (and 2.30 against 2.09 TB/s, in two runs, for one 32768-token sequence with 8 KV heads
// in 16 splits): both are held by the memory system, not by issue. This one is the default for
// its headroom where the CUDA-core kernel's FMAs grow (GQA 16 costs it 4x the FMAs of GQA 4).
//
// Every warp is its own pipeline: it owns 16-token sub-chunks w, w + 4, w + 8, ... of the CTA's
// slice, streams them through a private kStages-deep cp.async ring, and keeps its own online
// softmax state in the MMA accumulator layout. The four warps' (max, sum, output) are merged
// through shared memory at the end. Scores and the output accumulate in float32. P enters the
// second MMA as hi + lo, two values of the input dtype (so two MMAs per tile), which keeps P·V
// as accurate as with float32 P: rounding P once, as flash attention does, gave up to 2.3x the
// error of torch's float32 math on the op tests' shapes (a simulation of this kernel's
// arithmetic), past the tests' 2x bound; the extra MMAs are about one instruction per token.
#pragma once

#include "kernels/cuda/attention/decode_split_kv_common.cuh"

namespace ftengine::kernels::cuda::decode_detail {

constexpr int kMmaRows = 16;      // query heads per CTA on the MMA's M dimension
constexpr int kMmaSubChunk = 16;  // tokens a warp scores per step (two n8 tiles)

template <typename Element_, int kHeadDimVecs_, int kStages_>
struct MmaDecodeTraits {
  using Element = Element_;
  static constexpr int kHeadDimVecs = kHeadDimVecs_;  // 16-byte vectors per row, 8, 16 or 32
  static constexpr int kHeadDimPadded = kHeadDimVecs * 8;
  static constexpr int kStages = kStages_;
  static constexpr int kChunkTokens = kWarps * kMmaSubChunk;  // split slices align to this
  static constexpr int kDimSteps = kHeadDimPadded / 16;       // k-steps of Q·Kᵀ, n-pairs of P·V
  static constexpr int kOutTiles = kHeadDimPadded / 8;        // n8 accumulator tiles of P·V

  // Odd pitch in 16-byte units: the 8 rows an ldmatrix phase reads hit 8 different bank quads.
  static constexpr int kRowPitchVecs = kHeadDimVecs + 1;
  static constexpr int kTileVecs = kMmaSubChunk * kRowPitchVecs;  // K or V of one step
  static constexpr int kWarpStageVecs = 2 * kTileVecs;
  static constexpr int kRingBytes = kWarps * kStages * kWarpStageVecs * 16;
  // Epilogue, in the ring: each warp's output rows, then its row maxima and sums.
  static constexpr int kMergeBytes = kWarps * kMmaRows * (kHeadDimPadded + 2) * 4;
  static constexpr int kReusedBytes = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;
  static constexpr int kQueryBytes = kMmaRows * kRowPitchVecs * 16;
  static constexpr int kSmemBytes = kReusedBytes + kQueryBytes;

  // Loads: lane -> (vector lane % kHeadDimVecs, rows lane / kHeadDimVecs + i * kLoadRows).
  static constexpr int kLoadRows = 32 / kHeadDimVecs;
  static constexpr int kLoadsPerLane = kMmaSubChunk / kLoadRows;

  static_assert(kHeadDimPadded % 16 == 0, "whole k-steps");
  static_assert(32 % kHeadDimVecs == 0 && kMmaSubChunk % kLoadRows == 0, "loads tile the step");
  static_assert(kStages >= 2, "a stage in flight while one is consumed");
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
#endif
}

// d += a · b for one m16n8k16 tile, float32 accumulators.
template <typename Element>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// (x, y) as hi + lo pairs of Element: hi rounds, lo rounds what hi missed.
template <typename Element>
__device__ __forceinline__ void split_pair(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = Convert<Element>::from_float2(x, y);
  const float2 rounded = Convert<Element>::to_float2(hi);
  lo = Convert<Element>::from_float2(x - rounded.x, y - rounded.y);
}

// grid and block as SplitCta; fragment names follow the PTX ISA's m16n8k16
// layouts: lane = 4 * group_row + quad_col; an accumulator tile holds rows group_row and
// group_row + 8, columns 2 * quad_col and 2 * quad_col + 1.
template <typename Traits>
__global__ void __launch_bounds__(kThreads) decode_split_kv_mma_kernel(const DecodeArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Traits::Element;
  constexpr int kVecs = Traits::kHeadDimVecs;
  constexpr int kDimPadded = Traits::kHeadDimPadded;
  constexpr int kStages = Traits::kStages;
  constexpr int kPitch = Traits::kRowPitchVecs;

  allow_dependent_launch();

  const AttentionParams& p = args.params;
  SplitCta cta;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int group_row = lane / 4;
  const int quad_col = lane % 4;

  if (!cta.start<Element>(args, Traits::kChunkTokens)) return;
  const int head_dim = cta.head_dim;

  extern __shared__ __align__(16) unsigned char smem[];
  uint4* ring = reinterpret_cast<uint4*>(smem);
  uint4* query_s = reinterpret_cast<uint4*>(smem + Traits::kReusedBytes);  // [16][kPitch]

  // ---- This warp's steps and loads.
  const int num_sub_chunks = (cta.end - cta.begin + kMmaSubChunk - 1) / kMmaSubChunk;
  const int num_steps = num_sub_chunks > warp ? (num_sub_chunks - warp + kWarps - 1) / kWarps : 0;
  uint4* warp_ring = ring + warp * kStages * Traits::kWarpStageVecs;

  const int load_vec = lane % kVecs;
  const int load_row = lane / kVecs;
  const bool load_vec_valid = load_vec * 8 < head_dim;
  const int64_t head_offset = static_cast<int64_t>(cta.kv_head) * p.kv_head_stride + load_vec * 8;
  const auto* k_base = static_cast<const Element*>(p.k_cache) + head_offset;
  const auto* v_base = static_cast<const Element*>(p.v_cache) + head_offset;
  const int32_t* blocks = p.block_table + static_cast<int64_t>(cta.seq) * p.block_table_stride;

  // With blocks_hold_sub_chunks, one block id and the step's first slot stand for every row.
  int block_ids[Traits::kLoadsPerLane];
  int first_slot = 0;
  auto step_first = [&](int step) { return cta.begin + (warp + step * kWarps) * kMmaSubChunk; };
  auto fetch_block_ids = [&](int step) {
    const int first = step_first(step);
    if (args.blocks_hold_sub_chunks) {
      const int block = static_cast<int>(args.block_size.div(first));
      block_ids[0] = __ldg(blocks + block);
      first_slot = first - block * p.block_size;
    } else {
#pragma unroll
      for (int i = 0; i < Traits::kLoadsPerLane; ++i) {
        const int pos = first + load_row + i * Traits::kLoadRows;
        block_ids[i] = pos < cta.end ? __ldg(blocks + args.block_size.div(pos)) : 0;
      }
    }
  };
  auto load_step = [&](int step) {
    const int first = step_first(step);
    uint4* k_tile = warp_ring + (step % kStages) * Traits::kWarpStageVecs;
    uint4* v_tile = k_tile + Traits::kTileVecs;
#pragma unroll
    for (int i = 0; i < Traits::kLoadsPerLane; ++i) {
      const int row = load_row + i * Traits::kLoadRows;
      const int pos = first + row;
      const bool valid = load_vec_valid && pos < cta.end;
      int64_t offset;
      if (args.blocks_hold_sub_chunks) {
        offset = static_cast<int64_t>(block_ids[0]) * p.kv_block_stride +
                 static_cast<int64_t>(first_slot + row) * p.kv_token_stride;
      } else {
        const int slot = pos - static_cast<int>(args.block_size.div(pos)) * p.block_size;
        offset = static_cast<int64_t>(block_ids[i]) * p.kv_block_stride +
                 static_cast<int64_t>(slot) * p.kv_token_stride;
      }
      offset = valid ? offset : 0;
      cp_async_16_or_zero(k_tile + row * kPitch + load_vec, k_base + offset, valid);
      cp_async_16_or_zero(v_tile + row * kPitch + load_vec, v_base + offset, valid);
    }
  };
  start_kv_ring<kStages>(num_steps, fetch_block_ids, load_step);

  // ---- The group's queries as the A operand: 16 rows (heads past the group are zero), raw dtype.
  {
    const auto* q =
        static_cast<const Element*>(p.q) + static_cast<int64_t>(cta.q_token) * p.q_token_stride;
    for (int i = tid; i < kMmaRows * kVecs; i += kThreads) {
      const int row = i / kVecs;
      const int v = i % kVecs;
      uint4 value = make_uint4(0, 0, 0, 0);
      if (row < cta.group && v * 8 < head_dim) {
        value = __ldg(reinterpret_cast<const uint4*>(
            q + static_cast<int64_t>(cta.head0 + row) * p.q_head_stride + v * 8));
      }
      query_s[row * kPitch + v] = value;
    }
  }
  __syncthreads();

  // Running state of rows group_row (index 0) and group_row + 8 (index 1), in log2 units. The
  // sums are this lane's share (its columns); the quad adds them up at the end.
  float running_max[2] = {kNegInf, kNegInf};
  float running_sum[2] = {0.f, 0.f};
  float acc[Traits::kOutTiles][4];
#pragma unroll
  for (int n = 0; n < Traits::kOutTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  // ldmatrix row addresses (16-byte units): lane l feeds row l % 8 of matrix l / 8.
  const int q_fragment = (lane % 16) * kPitch + lane / 16;               // A: rows 0-15, k halves
  const int k_fragment = ((lane / 16) * 8 + lane % 8) * kPitch + (lane / 8) % 2;  // B of 2 n8
  const int v_fragment = (((lane / 8) % 2) * 8 + lane % 8) * kPitch + lane / 16;  // B, transposed

  for (int step = 0; step < num_steps; ++step) {
    cp_async_wait<kStages - 2>();
    // Every lane's copies of this step are visible warp-wide, and every lane is done with the
    // stage the next load reuses.
    __syncwarp();
    // advance_kv_ring's body, written out: through the helper the compiler orders this kernel's
    // address arithmetic differently (PTX compared on sm_80), so it stays inline here.
    {
      const int next = step + kStages - 1;
      if (next < num_steps) {
        load_step(next);
        if (next + 1 < num_steps) fetch_block_ids(next + 1);
      }
      cp_async_commit();
    }
    const uint4* k_tile = warp_ring + (step % kStages) * Traits::kWarpStageVecs;
    const uint4* v_tile = k_tile + Traits::kTileVecs;
    const int first = step_first(step);

    // ---- Scores of 16 heads x 16 tokens: two n8 tiles.
    float score[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < Traits::kDimSteps; ++ks) {
      uint32_t a[4];
      uint32_t b[4];
      ldmatrix_x4(a, query_s + q_fragment + ks * 2);
      ldmatrix_x4(b, k_tile + k_fragment + ks * 2);
      mma_16816<Element>(score[0], a, b[0], b[1]);
      mma_16816<Element>(score[1], a, b[2], b[3]);
    }

    // ---- Online softmax per row; a row's 16 columns live in the 4 lanes of a quad.
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int pos = first + j * 8 + quad_col * 2 + (e & 1);
        score[j][e] = pos < cta.end ? score[j][e] * args.scale_log2 : kNegInf;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], score[j][e]);
      }
    }
    float rescale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      // The step's first token is visible, so the new maximum is finite.
      const float new_max = fmaxf(running_max[r], tile_max[r]);
      rescale[r] = exp2f(running_max[r] - new_max);  // 0 on the first step
      running_max[r] = new_max;
      running_sum[r] *= rescale[r];
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        score[j][e] = exp2f(score[j][e] - running_max[e / 2]);
        running_sum[e / 2] += score[j][e];
      }
    }
#pragma unroll
    for (int n = 0; n < Traits::kOutTiles; ++n) {
      acc[n][0] *= rescale[0];
      acc[n][1] *= rescale[0];
      acc[n][2] *= rescale[1];
      acc[n][3] *= rescale[1];
    }

    // ---- P·V: the two score tiles are exactly the A fragment of one k16 step.
    uint32_t prob_hi[4];
    uint32_t prob_lo[4];
    split_pair<Element>(score[0][0], score[0][1], prob_hi[0], prob_lo[0]);
    split_pair<Element>(score[0][2], score[0][3], prob_hi[1], prob_lo[1]);
    split_pair<Element>(score[1][0], score[1][1], prob_hi[2], prob_lo[2]);
    split_pair<Element>(score[1][2], score[1][3], prob_hi[3], prob_lo[3]);
#pragma unroll
    for (int nd = 0; nd < Traits::kDimSteps; ++nd) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_tile + v_fragment + nd * 2);
      mma_16816<Element>(acc[2 * nd], prob_hi, b[0], b[1]);
      mma_16816<Element>(acc[2 * nd + 1], prob_hi, b[2], b[3]);
      mma_16816<Element>(acc[2 * nd], prob_lo, b[0], b[1]);
      mma_16816<Element>(acc[2 * nd + 1], prob_lo, b[2], b[3]);
    }
  }

  // ---- Epilogue: merge the warps' states through the (now idle) ring, normalise, store.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    running_sum[r] += __shfl_xor_sync(0xffffffffu, running_sum[r], 1);
    running_sum[r] += __shfl_xor_sync(0xffffffffu, running_sum[r], 2);
  }
  cp_async_wait<0>();
  __syncthreads();
  float* out_s = reinterpret_cast<float*>(smem);                 // [warp][16][kDimPadded]
  float* max_s = out_s + kWarps * kMmaRows * kDimPadded;         // [warp][16]
  float* sum_s = max_s + kWarps * kMmaRows;                      // [warp][16]
#pragma unroll
  for (int n = 0; n < Traits::kOutTiles; ++n) {
    float* row0 = out_s + (warp * kMmaRows + group_row) * kDimPadded + n * 8 + quad_col * 2;
    *reinterpret_cast<float2*>(row0) = make_float2(acc[n][0], acc[n][1]);
    *reinterpret_cast<float2*>(row0 + 8 * kDimPadded) = make_float2(acc[n][2], acc[n][3]);
  }
  if (quad_col == 0) {
    max_s[warp * kMmaRows + group_row] = running_max[0];
    max_s[warp * kMmaRows + group_row + 8] = running_max[1];
    sum_s[warp * kMmaRows + group_row] = running_sum[0];
    sum_s[warp * kMmaRows + group_row + 8] = running_sum[1];
  }
  __syncthreads();

  for (int i = tid; i < kMmaRows * kVecs; i += kThreads) {
    const int h = i / kVecs;
    const int v = i % kVecs;
    if (h >= cta.group || v * 8 >= head_dim) continue;
    // Warp 0 always had a step, so the maximum is finite; a warp without one weighs 0.
    float max_all = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) max_all = fmaxf(max_all, max_s[w * kMmaRows + h]);
    float total[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = exp2f(max_s[w * kMmaRows + h] - max_all);
      sum += weight * sum_s[w * kMmaRows + h];
      const float4* src =
          reinterpret_cast<const float4*>(out_s + (w * kMmaRows + h) * kDimPadded + v * 8);
      const float4 lo = src[0];
      const float4 hi = src[1];
      total[0] += weight * lo.x;
      total[1] += weight * lo.y;
      total[2] += weight * lo.z;
      total[3] += weight * lo.w;
      total[4] += weight * hi.x;
      total[5] += weight * hi.y;
      total[6] += weight * hi.z;
      total[7] += weight * hi.w;
    }
    // The row maximum's own key contributed exp2(0) = 1, so the sum is >= 1.
    const float inv_sum = 1.f / sum;
#pragma unroll
    for (int e = 0; e < 8; ++e) total[e] *= inv_sum;
    const float lse = (max_all + log2f(sum)) * kLn2;
    store_head_result<Element>(args, cta.seq, cta.split, cta.q_token, cta.head0 + h, v, total,
                               lse);
  }
#endif
}

}  // namespace ftengine::kernels::cuda::decode_detail
