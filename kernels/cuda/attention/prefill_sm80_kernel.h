// The FastAttention prefill body (FlashAttention-2 dataflow) over the paged KV cache, for the
// members whose warps hold mma.m16n8k16 fragments (sm80, sm75); prefill_sm70_kernel.h is the
// m8n8k4 body of the Volta member, with the same CTA-level structure.
//
// The CTA-level pieces (row packing, tiling-mask classification, tile loads, the row-wise softmax
// steps, the epilogue's stores) are in prefill_tiles.h; this body holds what the m16n8k16
// fragments decide.
//
// Per tile: S = Q·Kᵀ (mma.sync, float32), online softmax in float32 with exp2 and the scale
// folded into one FMA, P rounded to the element type, O += P·V. K and V tiles are double-buffered
// in shared memory: K(n-1) and V(n-1) are issued with cp.async right after the Q·Kᵀ of tile n and
// land during its softmax and P·V, so one barrier per tile suffices.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention/attention_params.h"
#include "kernels/cuda/attention/prefill_tiles.h"

namespace ftengine::kernels::cuda {

// The body, shared by the m16n8k16-fragment members: sm80 (cp.async, mma.m16n8k16) and sm75
// (register round-trip copies, two mma.m16n8k8 per k16 step). What differs is Traits::Arch.
template <typename Traits, bool kCausal>
__device__ __forceinline__ void prefill_mma_body(const AttentionParams& params) {
  using Arch = typename Traits::Arch;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kRowsPerWarp = Traits::kRowsPerWarp;
  constexpr int kMTiles = Traits::kMTilesPerWarp;  // m16 tiles a warp owns
  constexpr int kNTiles = kBlockN / 8;             // n8 tiles of S
  constexpr int kDTiles = kHeadDim / 8;            // n8 tiles of O
  constexpr int kQkSteps = kHeadDim / 16;          // k16 steps of Q·Kᵀ
  constexpr int kPvSteps = kBlockN / 16;           // k16 steps of P·V
  constexpr float kLog2e = 1.4426950408889634f;

  // 1 KB aligned: the ldmatrix addressing below steps along rows by XOR-ing address bits 5-7.
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
  const int quad_row = lane / 4;  // "group" of the mma fragment layouts
  const int quad_col = lane % 4;  // "t" of the mma fragment layouts

  // First of the rows this thread holds accumulators for: rows + mi * 16 + half * 8.
  const int thread_row0 = cta.m0 + warp * kRowsPerWarp + quad_row;

  PrefillTileLoader<Traits, decltype(cta)> loader(params, cta, tid);

  float acc_o[kMTiles][kDTiles][4];
  // Running max of the scores in log2 units (score * softmax_scale * log2 e), and this thread's
  // partial sum of exp2(score - max); the four lanes of a quad are summed at the end.
  float row_max[kMTiles][2];
  float row_sum[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int dj = 0; dj < kDTiles; ++dj) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mi][dj][e] = 0.f;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_max[mi][half] = -INFINITY;
      row_sum[mi][half] = 0.f;
    }
  }
  const float scale_log2 = params.softmax_scale * kLog2e;

  if (cta.num_kv_tiles > 0) {
    const uint32_t smem_k_address = Arch::shared_address(smem_k);
    const uint32_t smem_v_address = Arch::shared_address(smem_v);
    constexpr uint32_t kStageBytes = Traits::kKvTileElements * sizeof(Element);
    loader.load_q_and_last_kv_tile(smem_q, smem_k_address, smem_v_address);

    // ldmatrix addresses of this lane for k step 0 and m / n tile 0: Q (A) row lane % 16, chunk
    // lane / 16; K (B) row (lane / 16) * 8 + lane % 8, chunk (lane / 8) % 2; V (B, transposed)
    // row ((lane / 8) % 2) * 8 + lane % 8, chunk lane / 16. Logical chunk 2k + c of a row sits
    // at physical chunk (2k + c) ^ (row % 8) = 2k ^ (c ^ row % 8), as 2k and c share no bits:
    // stepping 2k chunks along a row is an XOR of the address with 32k bytes (tile bases are
    // 1 KB aligned), and stepping 16 rows adds a constant. One register per operand, instead
    // of one per (step, tile) that the compiler would hoist out of the loop and spill.
    constexpr uint32_t kRowBytes = kHeadDim * sizeof(Element);
    const uint32_t q_address =
        Arch::shared_address(smem_q + Traits::swizzle(warp * kRowsPerWarp + lane % 16, lane / 16));
    const uint32_t k_address0 =
        smem_k_address + 2 * Traits::swizzle((lane / 16) * 8 + lane % 8, (lane / 8) % 2);
    const uint32_t v_address0 =
        smem_v_address + 2 * Traits::swizzle(((lane / 8) % 2) * 8 + lane % 8, lane / 16);

    uint32_t q_fragments[kMTiles][kQkSteps][4];
    if constexpr (Traits::kQInRegisters) {
      Arch::template cp_async_wait<0>();
      __syncthreads();
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int kk = 0; kk < kQkSteps; ++kk) {
          Arch::ldmatrix_x4(q_fragments[mi][kk], (q_address ^ (kk * 32)) + mi * 16 * kRowBytes);
        }
      }
    }

    int stage = 0;
    auto attend_tile = [&](int tile, auto masked_tag) {
      constexpr bool kMasked = decltype(masked_tag)::value;
      const uint32_t k_address = k_address0 + stage * kStageBytes;
      const uint32_t v_address = v_address0 + stage * kStageBytes;

      // K(tile) and V(tile) have landed, and every warp is done with tile + 1, whose buffers
      // the loads below refill: one barrier per tile.
      Arch::template cp_async_wait<0>();
      __syncthreads();

      // S = Q·Kᵀ for this warp's rows.
      float acc_s[kMTiles][kNTiles][4];
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[mi][nj][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kQkSteps; ++kk) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
          if constexpr (Traits::kQInRegisters) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[mi][e] = q_fragments[mi][kk][e];
          } else {
            Arch::ldmatrix_x4(a[mi], (q_address ^ (kk * 32)) + mi * 16 * kRowBytes);
          }
        }
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t b[4];  // n8 tiles 2np and 2np + 1, k halves low / high
          Arch::ldmatrix_x4(b, (k_address ^ (kk * 32)) + np * 16 * kRowBytes);
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi) {
            Arch::template mma_16816<Element>(acc_s[mi][2 * np], a[mi], b[0], b[1]);
            Arch::template mma_16816<Element>(acc_s[mi][2 * np + 1], a[mi], b[2], b[3]);
          }
        }
      }

      loader.load_next_kv_tile(tile, smem_k_address, smem_v_address, stage);

      if constexpr (kMasked) {
        // Relative to this thread's first key of the tile, so the compare is against a constant.
        const int key0 = tile * kBlockN + quad_col * 2;
        PrefillRowCursor cursor(thread_row0, group);  // rows thread_row0 + 8 * (2 mi + half)
        const PrefillRowCursor step(8, group);
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int visible = cta.visible_keys(cursor.token) - key0;
            cursor.advance(step, group);
#pragma unroll
            for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
              for (int e = 2 * half; e < 2 * half + 2; ++e) {
                if (nj * 8 + (e & 1) >= visible) acc_s[mi][nj][e] = -INFINITY;
              }
            }
          }
        }
      }

      // Online softmax with lazy rescaling (prefill_tiles.h).
      float tile_max[kMTiles][2];
      bool rescale = false;
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float partial[kNTiles];
#pragma unroll
          for (int nj = 0; nj < kNTiles; ++nj) {
            partial[nj] = fmaxf(acc_s[mi][nj][2 * half], acc_s[mi][nj][2 * half + 1]);
          }
          float m = tree_max(partial);
          // The four lanes of a quad hold the same rows.
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
          tile_max[mi][half] = m * scale_log2;  // -inf stays -inf
          // True for a row's first visible keys (max -inf); false while it has none.
          rescale |= tile_max[mi][half] > row_max[mi][half] + kPrefillRescaleThreshold;
        }
      }
      if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const float correction =
                raise_row_max(row_max[mi][half], row_sum[mi][half], tile_max[mi][half]);
#pragma unroll
            for (int dj = 0; dj < kDTiles; ++dj) {
              acc_o[mi][dj][2 * half] *= correction;
              acc_o[mi][dj][2 * half + 1] *= correction;
            }
          }
        }
      }
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float offset = exp2_offset(row_max[mi][half]);
          float partial[kNTiles];
#pragma unroll
          for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              acc_s[mi][nj][e] = prefill_exp2_approx(fmaf(acc_s[mi][nj][e], scale_log2, -offset));
            }
            partial[nj] = acc_s[mi][nj][2 * half] + acc_s[mi][nj][2 * half + 1];
          }
          row_sum[mi][half] += tree_sum(partial);
        }
      }

      // O += P·V, P as A fragments: the C layout of n8 tiles 2kk and 2kk + 1 is the A layout
      // of k16 step kk. In the same basic block as the exp2s, so ptxas interleaves the two.
#pragma unroll
      for (int kk = 0; kk < kPvSteps; ++kk) {
        uint32_t p[kMTiles][4];
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
          p[mi][0] = Arch::template pack_pair<Element>(acc_s[mi][2 * kk][0], acc_s[mi][2 * kk][1]);
          p[mi][1] = Arch::template pack_pair<Element>(acc_s[mi][2 * kk][2], acc_s[mi][2 * kk][3]);
          p[mi][2] =
              Arch::template pack_pair<Element>(acc_s[mi][2 * kk + 1][0], acc_s[mi][2 * kk + 1][1]);
          p[mi][3] =
              Arch::template pack_pair<Element>(acc_s[mi][2 * kk + 1][2], acc_s[mi][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
          uint32_t b[4];  // n8 tiles 2dp and 2dp + 1, k halves low / high
          Arch::ldmatrix_x4_trans(b, (v_address ^ (dp * 32)) + kk * 16 * kRowBytes);
#pragma unroll
          for (int mi = 0; mi < kMTiles; ++mi) {
            Arch::template mma_16816<Element>(acc_o[mi][2 * dp], p[mi], b[0], b[1]);
            Arch::template mma_16816<Element>(acc_o[mi][2 * dp + 1], p[mi], b[2], b[3]);
          }
        }
      }
      stage ^= 1;
    };

    cta.for_each_kv_tile_backwards(attend_tile);
  }

  // ---- epilogue: normalise, stage this warp's rows of O in its own rows of the Q tile (no
  // other warp reads them), then write 16-byte chunks of whole rows.
  // The warp's last reads of those rows (ldmatrix of Q) are ordered before the writes; without
  // this barrier compute-sanitizer's racecheck reports lane-to-lane hazards.
  __syncwarp();
  float row_lse[kMTiles * 2];  // rows thread_row0 + 8 * (2 mi + half)
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = row_sum[mi][half];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      float inverse;
      finish_row(row_max[mi][half], sum, inverse, row_lse[2 * mi + half]);
#pragma unroll
      for (int dj = 0; dj < kDTiles; ++dj) {
        const int r = warp * kRowsPerWarp + mi * 16 + half * 8 + quad_row;
        *reinterpret_cast<uint32_t*>(smem_q + Traits::swizzle(r, dj) + quad_col * 2) =
            Arch::template pack_pair<Element>(acc_o[mi][dj][2 * half] * inverse,
                                              acc_o[mi][dj][2 * half + 1] * inverse);
      }
    }
  }
  __syncwarp();

  // The rows' 16-byte chunks, written whole from the staged tile, then the rows' lse. These two
  // loops stay in each body: as shared functions the compiler ordered the row cursor's
  // instructions differently.
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

  if (params.lse != nullptr && quad_col == 0) {
    PrefillRowCursor cursor(thread_row0, group);  // rows thread_row0 + 8 * (2 mi + half)
    const PrefillRowCursor step(8, group);
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (thread_row0 + mi * 16 + half * 8 < cta.num_rows) {
          params.lse[static_cast<int64_t>(cta.q_start + cursor.token) * params.num_heads +
                     cta.kv_head * group + cursor.head] = row_lse[2 * mi + half];
        }
        cursor.advance(step, group);
      }
    }
  }
}

}  // namespace ftengine::kernels::cuda
