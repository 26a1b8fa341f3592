// The Volta body of the FastAttention prefill family: the CTA-level dataflow of
// prefill_sm80_kernel.h (GQA rows packed into tiles, tiles walked from the last, tiling-mask
// classification, K/V double-buffered, lazy online softmax, O staged in the Q tile; the shared
// pieces in prefill_tiles.h) with warps that hold mma.m8n8k4 fragments. The fragment and shared-memory layouts are explained in
// prefill_sm70_traits.h.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention/attention_params.h"
#include "kernels/cuda/attention/prefill_tiles.h"

namespace ftengine::kernels::cuda {

template <typename Traits, bool kCausal>
__device__ __forceinline__ void prefill_sm70_body(const AttentionParams& params) {
  using Arch = typename Traits::Arch;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kRowsPerWarp = Traits::kRowsPerWarp;  // 32: one m8n8k4 instruction's rows
  constexpr int kNTiles = kBlockN / 8;                // n8 key tiles of S
  constexpr int kDTiles = kHeadDim / 8;               // n8 tiles of O
  constexpr int kQkSteps = kHeadDim / 8;              // k8 steps (two k4 products, one load)
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(1024) unsigned char shared_bytes[];
  Element* smem_q = reinterpret_cast<Element*>(shared_bytes);
  Element* smem_k = smem_q + Traits::kQTileElements;
  Element* smem_v = smem_k + Traits::kStages * Traits::kKvTileElements;

  PrefillCtaTiles<kBlockM, kBlockN, kCausal> cta(params);
  if (cta.m0 >= cta.num_rows) return;
  cta.classify_kv_tiles();
  const int group = cta.group;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int quad_pair = (lane / 4) % 4;
  const int high = lane / 16;
  // Warp row of this lane's A fragments (hardware row lane % 4 + 4 * high of its quad pair) and
  // of its accumulator slot 0 (slot 1 is two rows further): see prefill_sm70_traits.h.
  const int pair_rows = 4 * (quad_pair % 2) + 8 * high + 16 * (quad_pair / 2);
  const int fragment_row = lane % 4 + pair_rows;
  const int thread_row0 = cta.m0 + warp * kRowsPerWarp + (lane & 1) + pair_rows;
  const bool odd_pair_lane = (lane & 2) != 0;  // holds columns 2, 3, 6, 7 of each n8 tile

  PrefillTileLoader<Traits, decltype(cta)> loader(params, cta, tid);

  // acc_o[dj][i]: output d-tile dj in the C layout; row_max / row_sum per accumulator slot.
  float acc_o[kDTiles][8];
  float row_max[2];
  float row_sum[2];
#pragma unroll
  for (int dj = 0; dj < kDTiles; ++dj) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc_o[dj][i] = 0.f;
  }
#pragma unroll
  for (int slot = 0; slot < 2; ++slot) {
    row_max[slot] = -INFINITY;
    row_sum[slot] = 0.f;
  }
  const float scale_log2 = params.softmax_scale * kLog2e;

  if (cta.num_kv_tiles > 0) {
    const uint32_t smem_k_address = Arch::shared_address(smem_k);
    const uint32_t smem_v_address = Arch::shared_address(smem_v);
    constexpr uint32_t kStageBytes = Traits::kKvTileElements * sizeof(Element);
    loader.load_q_and_last_kv_tile(smem_q, smem_k_address, smem_v_address);

    // 16-byte fragment addresses for k8 step 0 / n8 tile 0 / d-pair 0. Tiles are 1 KB aligned
    // and rows 128 or 256 bytes, so stepping k8 steps (chunks) along a row is an XOR with 16
    // bytes per step, and stepping 8 rows adds 8 rows (the swizzle repeats every 8 rows).
    constexpr uint32_t kRowBytes = kHeadDim * sizeof(Element);
    const uint32_t q_address =
        Arch::shared_address(smem_q + Traits::swizzle(warp * kRowsPerWarp + fragment_row, 0));
    const uint32_t k_address0 = smem_k_address + 2 * Traits::swizzle(lane % 4 + 4 * high, 0);
    // V: key (j & 1) + 2 * step + 4 * (j / 2) of an n8 tile for j = lane % 4, dimensions
    // 8 * high + 0..7 of each 16-dimension pair of d-tiles.
    const int v_key0 = (lane & 1) + 4 * ((lane / 2) & 1);
    uint32_t v_address0[2];
#pragma unroll
    for (int step = 0; step < 2; ++step) {
      v_address0[step] = smem_v_address + 2 * Traits::swizzle(v_key0 + 2 * step, high);
    }

    uint32_t q_fragments[kQkSteps][4];
    if constexpr (Traits::kQInRegisters) {
      Arch::template cp_async_wait<0>();
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kQkSteps; ++kk) Arch::load_shared_16(q_fragments[kk], q_address ^ (kk * 16));
    }

    int stage = 0;
    auto attend_tile = [&](int tile, auto masked_tag) {
      constexpr bool kMasked = decltype(masked_tag)::value;
      const uint32_t k_address = k_address0 + stage * kStageBytes;

      Arch::template cp_async_wait<0>();
      __syncthreads();

      // S = Q·Kᵀ: this warp's 32 rows x 64 keys, acc_s[nj] in the C layout.
      float acc_s[kNTiles][8];
#pragma unroll
      for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
        for (int i = 0; i < 8; ++i) acc_s[nj][i] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kQkSteps; ++kk) {
        uint32_t a[4];
        if constexpr (Traits::kQInRegisters) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[e] = q_fragments[kk][e];
        } else {
          Arch::load_shared_16(a, q_address ^ (kk * 16));
        }
#pragma unroll
        for (int nj = 0; nj < kNTiles; ++nj) {
          uint32_t b[4];
          Arch::load_shared_16(b, (k_address ^ (kk * 16)) + nj * 8 * kRowBytes);
          Arch::mma_884_row_col(acc_s[nj], a[0], a[1], b[0], b[1]);
          Arch::mma_884_row_col(acc_s[nj], a[2], a[3], b[2], b[3]);
        }
      }

      loader.load_next_kv_tile(tile, smem_k_address, smem_v_address, stage);

      if constexpr (kMasked) {
        // Element i of n8 tile nj is key tile * kBlockN + nj * 8 + (lane & 2) + (i & 1) + (i & 4).
        const int key0 = tile * kBlockN + (lane & 2);
        PrefillRowCursor cursor(thread_row0, group);
        const PrefillRowCursor step(2, group);
#pragma unroll
        for (int slot = 0; slot < 2; ++slot) {
          const int visible = cta.visible_keys(cursor.token) - key0;
          cursor.advance(step, group);
#pragma unroll
          for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int i = 2 * slot + (c & 1) + 4 * (c / 2);
              if (nj * 8 + (i & 1) + (i & 4) >= visible) acc_s[nj][i] = -INFINITY;
            }
          }
        }
      }

      // Online softmax with lazy rescaling (prefill_tiles.h). A row's 64 scores are spread over
      // two lanes (lane and lane ^ 2), 32 each.
      float tile_max[2];
      bool rescale = false;
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) {
        float partial[kNTiles];
#pragma unroll
        for (int nj = 0; nj < kNTiles; ++nj) {
          partial[nj] = fmaxf(fmaxf(acc_s[nj][2 * slot], acc_s[nj][2 * slot + 1]),
                              fmaxf(acc_s[nj][2 * slot + 4], acc_s[nj][2 * slot + 5]));
        }
        const float lane_max = tree_max(partial);
        const float m = fmaxf(lane_max, __shfl_xor_sync(0xffffffffu, lane_max, 2));
        tile_max[slot] = m * scale_log2;
        rescale |= tile_max[slot] > row_max[slot] + kPrefillRescaleThreshold;
      }
      if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int slot = 0; slot < 2; ++slot) {
          const float correction = raise_row_max(row_max[slot], row_sum[slot], tile_max[slot]);
#pragma unroll
          for (int dj = 0; dj < kDTiles; ++dj) {
            acc_o[dj][2 * slot] *= correction;
            acc_o[dj][2 * slot + 1] *= correction;
            acc_o[dj][2 * slot + 4] *= correction;
            acc_o[dj][2 * slot + 5] *= correction;
          }
        }
      }
#pragma unroll
      for (int slot = 0; slot < 2; ++slot) {
        const float offset = exp2_offset(row_max[slot]);
        float partial[kNTiles];
#pragma unroll
        for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int i = 2 * slot + (c & 1) + 4 * (c / 2);
            acc_s[nj][i] = prefill_exp2_approx(fmaf(acc_s[nj][i], scale_log2, -offset));
          }
          partial[nj] = (acc_s[nj][2 * slot] + acc_s[nj][2 * slot + 1]) +
                        (acc_s[nj][2 * slot + 4] + acc_s[nj][2 * slot + 5]);
        }
        row_sum[slot] += tree_sum(partial);
      }

      // O += P·V. The A fragment of a k4 step is one row's four keys, held by the lane whose
      // hardware row it is; the C layout leaves a row's keys {0, 1, 4, 5} of an n8 tile in the
      // lane with (lane & 2) == 0 and keys {2, 3, 6, 7} in its partner lane ^ 2, each for both
      // of their rows. One exchange gives each lane its row's keys for both k4 steps.
      const uint32_t v_stage = stage * kStageBytes;
#pragma unroll
      for (int nj = 0; nj < kNTiles; ++nj) {
        const uint32_t slot0[2] = {Arch::pack_half2(acc_s[nj][0], acc_s[nj][1]),
                                   Arch::pack_half2(acc_s[nj][4], acc_s[nj][5])};
        const uint32_t slot1[2] = {Arch::pack_half2(acc_s[nj][2], acc_s[nj][3]),
                                   Arch::pack_half2(acc_s[nj][6], acc_s[nj][7])};
        uint32_t received[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          received[r] =
              __shfl_xor_sync(0xffffffffu, odd_pair_lane ? slot0[r] : slot1[r], 2);
        }
        uint32_t p[2][2];  // [k4 step][register]
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          p[0][r] = odd_pair_lane ? received[r] : slot0[r];
          p[1][r] = odd_pair_lane ? slot1[r] : received[r];
        }
#pragma unroll
        for (int step = 0; step < 2; ++step) {
          const uint32_t v_address = v_address0[step] + v_stage + nj * 8 * kRowBytes;
#pragma unroll
          for (int dp = 0; dp < kDTiles / 2; ++dp) {
            uint32_t b[4];  // d-tiles 2dp and 2dp + 1
            Arch::load_shared_16(b, v_address ^ (dp * 32));
            Arch::mma_884_row_row(acc_o[2 * dp], p[step][0], p[step][1], b[0], b[1]);
            Arch::mma_884_row_row(acc_o[2 * dp + 1], p[step][0], p[step][1], b[2], b[3]);
          }
        }
      }
      stage ^= 1;
    };

    cta.for_each_kv_tile_backwards(attend_tile);
  }

  // ---- epilogue: normalise, stage this warp's rows of O in its own rows of the Q tile, write
  // 16-byte chunks of whole rows.
  // The warp's last reads of those rows (ldmatrix of Q) are ordered before the writes; without
  // this barrier compute-sanitizer's racecheck reports lane-to-lane hazards.
  __syncwarp();
  float row_lse[2];
#pragma unroll
  for (int slot = 0; slot < 2; ++slot) {
    float sum = row_sum[slot];
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    float inverse;
    finish_row(row_max[slot], sum, inverse, row_lse[slot]);
    const int r = warp * kRowsPerWarp + (lane & 1) + pair_rows + 2 * slot;
#pragma unroll
    for (int dj = 0; dj < kDTiles; ++dj) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // Column (lane & 2) + 4 * half + {0, 1} of d-tile dj = 2dp + a is dimension
        // 16dp + 8 * half + 4a + (lane & 2) + {0, 1}.
        const int i = 2 * slot + 4 * half;
        const int dim = 16 * (dj / 2) + 8 * half + 4 * (dj % 2) + (lane & 2);
        *reinterpret_cast<uint32_t*>(smem_q + Traits::swizzle(r, dim / 8) + dim % 8) =
            Arch::pack_half2(acc_o[dj][i] * inverse, acc_o[dj][i + 1] * inverse);
      }
    }
  }
  __syncwarp();

  // As in prefill_sm80_kernel.h, which says why these two loops are not shared.
  Element* out = static_cast<Element*>(params.out);
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kRowsPerStorePass = 32 / kChunksPerRow;
  {
    const int first_r = warp * kRowsPerWarp + lane / kChunksPerRow;
    const int chunk = lane % kChunksPerRow;
    PrefillRowCursor cursor(cta.m0 + first_r, group);
    const PrefillRowCursor step(kRowsPerStorePass, group);
#pragma unroll
    for (int pass = 0; pass < kRowsPerWarp / kRowsPerStorePass; ++pass) {
      const int r = first_r + pass * kRowsPerStorePass;
      if (cta.m0 + r < cta.num_rows) {
        Element* destination =
            out + static_cast<int64_t>(cta.q_start + cursor.token) * params.out_token_stride +
            static_cast<int64_t>(cta.kv_head * group + cursor.head) * params.out_head_stride +
            chunk * 8;
        *reinterpret_cast<uint4*>(destination) =
            *reinterpret_cast<const uint4*>(smem_q + Traits::swizzle(r, chunk));
      }
      cursor.advance(step, group);
    }
  }

  if (params.lse != nullptr && !odd_pair_lane) {
    PrefillRowCursor cursor(thread_row0, group);
    const PrefillRowCursor step(2, group);
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      if (thread_row0 + 2 * slot < cta.num_rows) {
        params.lse[static_cast<int64_t>(cta.q_start + cursor.token) * params.num_heads +
                   cta.kv_head * group + cursor.head] = row_lse[slot];
      }
      cursor.advance(step, group);
    }
  }
}

}  // namespace ftengine::kernels::cuda
