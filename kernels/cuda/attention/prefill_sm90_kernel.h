// The Hopper member of the FastAttention prefill family (sm_90a): the FlashAttention-2 dataflow
// of the other members, with FlashAttention-3's machinery.
//
// Warp specialisation: warpgroup 0 produces, warpgroups 1 and 2 consume. The producer copies Q
// and the CTA's first KV tile (the last visible one, which may cross the sequence's end and so is
// zero-filled row by row) with cp.async, then hands the rest of the tiles to one thread that
// issues TMA bulk tensor copies straight out of the paged cache (a 4-D tensor map over
// [block][slot][kv_head][dim], boxes of 64 slots: cache blocks of any multiple of 64), each
// completing on the stage's "full" mbarrier. The producer
// warpgroup gives its registers to the consumers (setmaxnreg).
//
// Each consumer warpgroup owns 64 of the 128 query rows: per tile, S = Q·Kᵀ with wgmma from
// shared memory (m64n128k16), the online softmax of prefill_tiles.h on the accumulators (whose
// layout per warp is mma.m16n8's), P rounded to the element type stays in registers as wgmma's A
// operand, O += P·V with V read transposed from shared memory (m64nDk16), issued beside the next
// tile's Q·Kᵀ so that the softmax of one tile overlaps the P·V of the previous; K and V stages
// go back to the producer on "empty" mbarriers. The two consumer warpgroups take turns at the
// tensor cores (ping-pong on named barriers), so one's softmax also overlaps the other's matrix
// products.
//
// Tiling-mask, row packing of the GQA group, the grid order and the epilogue are the other
// members' (prefill_tiles.h).
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: the driver entry point is looked up at run time)
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention/attention_params.h"
#include "kernels/cuda/attention/prefill_sm90_traits.h"
#include "kernels/cuda/attention/prefill_tiles.h"

namespace ftengine::kernels::cuda {

// The walk's first KV tile (the last visible one) into stage 0, by the producer warpgroup's 128
// threads with cp.async: the tile may cross the sequence's end, and its rows past kv_len are
// zero-filled (the slots may hold NaN; 0 x NaN would reach O through P·V), which TMA cannot do
// short of the tensor's bounds. Rows are looked up one by one, so a tile may span cache blocks.
template <typename Traits, typename Cta>
__device__ __forceinline__ void load_first_kv_tile(const AttentionParams& params, const Cta& cta,
                                                   int tid, uint32_t smem_k, uint32_t smem_v) {
  using Arch = typename Traits::Arch;
  using Element = typename Traits::Element;
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kRowsPerPass = 128 / kChunksPerRow;
  const int chunk = tid % kChunksPerRow;
  const int first_row = tid / kChunksPerRow;
  const int32_t* block_table =
      params.block_table + static_cast<int64_t>(cta.seq) * params.block_table_stride;
  const int64_t head_offset = static_cast<int64_t>(cta.kv_head) * params.kv_head_stride + chunk * 8;
  const int n0 = (cta.num_kv_tiles - 1) * Traits::kBlockN;
#pragma unroll 4
  for (int row = first_row; row < Traits::kBlockN; row += kRowsPerPass) {
    const int key = n0 + row;
    const bool valid = key < cta.kv_len;
    int64_t offset = 0;
    if (valid) {
      offset = static_cast<int64_t>(block_table[key / params.block_size]) * params.kv_block_stride +
               static_cast<int64_t>(key % params.block_size) * params.kv_token_stride + head_offset;
    }
    const uint32_t destination = 2 * Traits::swizzle(row, chunk);
    Arch::cp_async_16(smem_k + destination, static_cast<const Element*>(params.k_cache) + offset,
                      valid);
    Arch::cp_async_16(smem_v + destination, static_cast<const Element*>(params.v_cache) + offset,
                      valid);
  }
}

template <typename Traits, bool kCausal>
__device__ __forceinline__ void prefill_sm90_body(const AttentionParams& params,
                                                  const CUtensorMap* k_map,
                                                  const CUtensorMap* v_map) {
  using Arch = typename Traits::Arch;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNTiles = kBlockN / 8;     // n8 column groups of S
  constexpr int kDTiles = kHeadDim / 8;    // n8 column groups of O
  constexpr int kQkSteps = kHeadDim / 16;  // k16 steps of Q·Kᵀ
  constexpr int kPvSteps = kBlockN / 16;   // k16 steps of P·V
  constexpr uint32_t kPanelBytes = Traits::kPanelBytes;
  constexpr uint32_t kStageBytes = Traits::kKvTileElements * sizeof(Element);
  constexpr float kLog2e = 1.4426950408889634f;

  // 1 KB aligned: wgmma's and TMA's 128-byte swizzle repeats every 1024 bytes from here.
  extern __shared__ __align__(1024) unsigned char shared_bytes[];
  Element* smem_q = reinterpret_cast<Element*>(shared_bytes);
  Element* smem_k = smem_q + Traits::kQTileElements;
  Element* smem_v = smem_k + Traits::kStages * Traits::kKvTileElements;
  // [0]: Q and the first KV tile landed (cp.async); [1 + s], [3 + s]: K, V of stage s landed
  // (TMA); [5 + s], [7 + s]: both consumer warpgroups are done with K, V of stage s. K and V are
  // released apart: K after this tile's Q·Kᵀ, V only after its P·V, which runs a tile later.
  uint64_t* barriers = reinterpret_cast<uint64_t*>(shared_bytes + Traits::kBarrierOffset);

  PrefillCtaTiles<kBlockM, kBlockN, kCausal> cta(params);
  if (cta.m0 >= cta.num_rows) return;
  cta.classify_kv_tiles();
  const int num_tiles = cta.num_kv_tiles;

  const int tid = threadIdx.x;
  const uint32_t smem_q_address = Arch::shared_address(smem_q);
  // The swizzle and the descriptors assume 1 KB alignment: fail loudly, never compute garbage.
  if (smem_q_address % 1024 != 0) __trap();
  const uint32_t smem_k_address = Arch::shared_address(smem_k);
  const uint32_t smem_v_address = Arch::shared_address(smem_v);
  const uint32_t prologue_full = Arch::shared_address(&barriers[0]);
  const auto k_full = [&](int stage) { return Arch::shared_address(&barriers[1 + stage]); };
  const auto v_full = [&](int stage) { return Arch::shared_address(&barriers[3 + stage]); };
  const auto k_empty = [&](int stage) { return Arch::shared_address(&barriers[5 + stage]); };
  const auto v_empty = [&](int stage) { return Arch::shared_address(&barriers[7 + stage]); };
  if (tid == 0) {
    Arch::mbarrier_init(prologue_full, Traits::kLoadThreads);
    for (int stage = 0; stage < 2; ++stage) {
      Arch::mbarrier_init(k_full(stage), 1);
      Arch::mbarrier_init(v_full(stage), 1);
      Arch::mbarrier_init(k_empty(stage), Traits::kNumConsumerThreads);
      Arch::mbarrier_init(v_empty(stage), Traits::kNumConsumerThreads);
    }
    Arch::fence_barrier_init();
  }
  __syncthreads();

  if (tid < 128) {
    // ---- producer warpgroup
    if (num_tiles > 0) {
      const int32_t* block_table =
          params.block_table + static_cast<int64_t>(cta.seq) * params.block_table_stride;
      // K or V of walk position i (tile num_tiles - 1 - i) into stage i % 2 with TMA: the tile is
      // kTmaSlots-row boxes, each inside one cache block, times the head_dim panels.
      const auto load_tile = [&](const CUtensorMap* map, uint32_t smem, uint32_t full, int i) {
        Arch::mbarrier_arrive_expect_tx(full, kStageBytes);
        const int tile_key = (num_tiles - 1 - i) * kBlockN;
#pragma unroll
        for (int box = 0; box < kBlockN / Traits::kTmaSlots; ++box) {
          const int key = tile_key + box * Traits::kTmaSlots;
          const int block = block_table[key / params.block_size];
          const int slot = key % params.block_size;
          const uint32_t offset =
              (i & 1) * kStageBytes + box * Traits::kTmaSlots * Traits::kRowPitchBytes;
#pragma unroll
          for (int panel = 0; panel < Traits::kPanels; ++panel) {
            Arch::tma_load_4d(smem + offset + panel * kPanelBytes, map, full,
                              panel * Traits::kPanelColumns, cta.kv_head, slot, block);
          }
        }
      };

      PrefillTileLoader<Traits, decltype(cta)> loader(params, cta, tid);
      loader.load_q(smem_q);
      load_first_kv_tile<Traits>(params, cta, tid, smem_k_address, smem_v_address);
      Arch::cp_async_commit();
      // The second tile's stage is free from the start: its copies need not wait for the first.
      if (tid == 0 && num_tiles > 1) {
        load_tile(k_map, smem_k_address, k_full(1), 1);
        load_tile(v_map, smem_v_address, v_full(1), 1);
      }
      // cp.async writes through the generic proxy; wgmma reads through the async proxy.
      Arch::template cp_async_wait<0>();
      Arch::fence_proxy_async();
      Arch::mbarrier_arrive(prologue_full);
      Arch::template warpgroup_registers_decrease<Traits::kProducerRegisters>();
      if (tid == 0) {
        // A stage is refilled once both consumers have released what the tile two before left
        // in it.
        for (int i = 2; i < num_tiles; ++i) {
          const int stage = i & 1;
          const int phase = ((i - 2) >> 1) & 1;
          Arch::mbarrier_wait(k_empty(stage), phase);
          load_tile(k_map, smem_k_address, k_full(stage), i);
          Arch::mbarrier_wait(v_empty(stage), phase);
          load_tile(v_map, smem_v_address, v_full(stage), i);
        }
      }
    } else {
      Arch::template warpgroup_registers_decrease<Traits::kProducerRegisters>();
    }
    return;
  }

  // ---- consumer warpgroups
  Arch::template warpgroup_registers_increase<Traits::kConsumerRegisters>();
  const int warpgroup = tid / 128 - 1;  // rows [64 warpgroup, 64 warpgroup + 64) of the tile
  const int warp = (tid / 32) % 4;      // rows 16 warp .. of the warpgroup's
  const int lane = tid % 32;
  const int quad_row = lane / 4;
  const int quad_col = lane % 4;
  const int group = cta.group;
  const int first_tile_row = warpgroup * 64 + warp * 16 + quad_row;  // and + 8
  const int thread_row0 = cta.m0 + first_tile_row;

  float acc_o[kHeadDim / 2];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) acc_o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  const float scale_log2 = params.softmax_scale * kLog2e;

  if (num_tiles > 0) {
    // Q rows of this warpgroup; K and V panels of a stage start at the stage's base.
    const uint32_t q_address = smem_q_address + warpgroup * 64 * Traits::kRowPitchBytes;
    Arch::mbarrier_wait(prologue_full, 0);

    // P of the previous tile, rounded to the element type: wgmma's A operand for its P·V.
    uint32_t p[kPvSteps][4];

    // O += P·V of walk position i, issued asynchronously (after wgmma_fence and V's arrival):
    // V MN-major, k16 step kk is keys 16 kk.., 2 KB further; the head_dim panels are
    // kPanelBytes apart (leading byte offset), groups of 8 keys 1 KB apart (stride).
    const auto wait_v = [&](int i) {
      if (i > 0) Arch::mbarrier_wait(v_full(i & 1), ((i - 1) >> 1) & 1);
    };
    const auto issue_pv = [&](int i) {
      const uint32_t v_address = smem_v_address + (i & 1) * kStageBytes;
#pragma unroll
      for (int kk = 0; kk < kPvSteps; ++kk) {
        Arch::template wgmma_rs<Element, kHeadDim>(
            acc_o, p[kk],
            Arch::smem_descriptor(v_address + kk * 16 * Traits::kRowPitchBytes, kPanelBytes,
                                  1024));
      }
      Arch::wgmma_commit();
    };
    // Waits for the P·V of walk position i and hands its V stage back to the producer.
    const auto finish_pv = [&](int i) {
      Arch::template wgmma_wait<0>();
      Arch::fence_registers(acc_o);
      Arch::mbarrier_arrive(v_empty(i & 1));
    };

    // FlashAttention-3's intra-warpgroup overlap: per tile, Q·Kᵀ of this tile and P·V of the
    // previous one are issued together, and this tile's softmax runs on the CUDA cores while
    // the tensor cores finish the P·V. O is rescaled for this tile's max only once that P·V has
    // landed.
    // The walk's first tile has no P·V before it: a compile-time case, since a runtime branch
    // around the wgmmas made ptxas serialise them.
    auto attend_tile = [&](int tile, auto masked_tag, auto first_tag) {
      constexpr bool kMasked = decltype(masked_tag)::value;
      constexpr bool kFirst = decltype(first_tag)::value;
      const int i = num_tiles - 1 - tile;  // position in the walk
      const int stage = i & 1;
      const uint32_t k_address = smem_k_address + stage * kStageBytes;

      // S = Q·Kᵀ: k16 step kk reads 32 bytes further along the rows of panel kk / 4.
      // Nothing but wgmma may write the accumulators between the first wgmma and the wait
      // (ptxas would serialise them): both operand sets are fenced before either batch.
      if constexpr (!kFirst) {
        Arch::mbarrier_wait(k_full(stage), ((i - 1) >> 1) & 1);
        wait_v(i - 1);
      }
      float acc_s[kBlockN / 2];
      Arch::fence_registers(acc_s);
      Arch::fence_registers(acc_o);
      Arch::named_barrier_sync(Traits::kSchedulerBarrier + warpgroup, 256);  // our turn
      Arch::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kQkSteps; ++kk) {
        const uint32_t offset = (kk / 4) * kPanelBytes + (kk % 4) * 32;
        Arch::template wgmma_m64n128k16_ss<Element>(
            acc_s, Arch::smem_descriptor(q_address + offset, 16, 1024),
            Arch::smem_descriptor(k_address + offset, 16, 1024), kk > 0 ? 1 : 0);
      }
      Arch::wgmma_commit();
      if constexpr (!kFirst) issue_pv(i - 1);
      // The other consumer's turn; the second one's last turn is nobody's cue (a named barrier
      // must not be left with arrivals when the CTA exits).
      if (warpgroup == 0 || i + 1 < num_tiles) {
        Arch::named_barrier_arrive(Traits::kSchedulerBarrier + 1 - warpgroup, 256);
      }
      if constexpr (kFirst) {
        Arch::template wgmma_wait<0>();
      } else {
        Arch::template wgmma_wait<1>();  // Q·Kᵀ done; the P·V may still run
      }
      Arch::fence_registers(acc_s);
      Arch::mbarrier_arrive(k_empty(stage));

      if constexpr (kMasked) {
        const int key0 = tile * kBlockN + quad_col * 2;
        PrefillRowCursor cursor(thread_row0, group);  // rows thread_row0 + 8 * half
        const PrefillRowCursor step(8, group);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int visible = cta.visible_keys(cursor.token) - key0;
          cursor.advance(step, group);
#pragma unroll
          for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              if (nj * 8 + (e & 1) >= visible) acc_s[nj * 4 + e] = -INFINITY;
            }
          }
        }
      }

      // Online softmax with lazy rescaling (prefill_tiles.h); the rescale decision is one per
      // warp.
      float tile_max[2];
      bool rescale = false;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // Column groups nj and nj + kNTiles / 2 first: tree_max of 16 was not unrolled.
        float partial[kNTiles / 2];
#pragma unroll
        for (int nj = 0; nj < kNTiles / 2; ++nj) {
          const int nk = nj + kNTiles / 2;
          partial[nj] = fmaxf(fmaxf(acc_s[nj * 4 + 2 * half], acc_s[nj * 4 + 2 * half + 1]),
                              fmaxf(acc_s[nk * 4 + 2 * half], acc_s[nk * 4 + 2 * half + 1]));
        }
        float m = tree_max(partial);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        tile_max[half] = m * scale_log2;
        rescale |= tile_max[half] > row_max[half] + kPrefillRescaleThreshold;
      }
      rescale = __any_sync(0xffffffffu, rescale);
      float correction[2] = {1.f, 1.f};
      if (rescale) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          correction[half] = raise_row_max(row_max[half], row_sum[half], tile_max[half]);
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float offset = exp2_offset(row_max[half]);
#pragma unroll
        for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            acc_s[nj * 4 + e] = prefill_exp2_approx(fmaf(acc_s[nj * 4 + e], scale_log2, -offset));
          }
        }
        float partial[kNTiles / 2];
#pragma unroll
        for (int nj = 0; nj < kNTiles / 2; ++nj) {
          const int nk = nj + kNTiles / 2;
          partial[nj] = (acc_s[nj * 4 + 2 * half] + acc_s[nj * 4 + 2 * half + 1]) +
                        (acc_s[nk * 4 + 2 * half] + acc_s[nk * 4 + 2 * half + 1]);
        }
        row_sum[half] += tree_sum(partial);
      }

      if constexpr (!kFirst) finish_pv(i - 1);  // before O is rescaled and P overwritten
      if (rescale) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int dj = 0; dj < kDTiles; ++dj) {
            acc_o[dj * 4 + 2 * half] *= correction[half];
            acc_o[dj * 4 + 2 * half + 1] *= correction[half];
          }
        }
      }

      // P as wgmma's A operand: the accumulator layout of column groups 2kk and 2kk + 1 is the
      // A layout of k16 step kk.
#pragma unroll
      for (int kk = 0; kk < kPvSteps; ++kk) {
        const float* s0 = &acc_s[(2 * kk) * 4];
        const float* s1 = &acc_s[(2 * kk + 1) * 4];
        p[kk][0] = Arch::template pack_pair<Element>(s0[0], s0[1]);
        p[kk][1] = Arch::template pack_pair<Element>(s0[2], s0[3]);
        p[kk][2] = Arch::template pack_pair<Element>(s1[0], s1[1]);
        p[kk][3] = Arch::template pack_pair<Element>(s1[2], s1[3]);
      }
    };

    // The first consumer takes the first turn.
    if (warpgroup == 0) {
      Arch::named_barrier_arrive(Traits::kSchedulerBarrier, 256);
    }
    // From the last visible tile down: partial tiles (masked) first, then full ones.
    int tile = num_tiles - 1;
    if (tile >= cta.num_full_tiles) {
      attend_tile(tile, std::true_type{}, std::true_type{});
    } else {
      attend_tile(tile, std::false_type{}, std::true_type{});
    }
    for (--tile; tile >= cta.num_full_tiles; --tile) {
      attend_tile(tile, std::true_type{}, std::false_type{});
    }
    for (; tile >= 0; --tile) attend_tile(tile, std::false_type{}, std::false_type{});
    wait_v(num_tiles - 1);
    Arch::fence_registers(acc_o);
    Arch::wgmma_fence();
    issue_pv(num_tiles - 1);
    finish_pv(num_tiles - 1);
  }

  // ---- epilogue: normalise, stage the warpgroup's rows of O in its own rows of the Q tile (its
  // wgmmas have completed), then write 16-byte chunks of whole rows.
  float row_lse[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    float inverse;
    finish_row(row_max[half], sum, inverse, row_lse[half]);
#pragma unroll
    for (int dj = 0; dj < kDTiles; ++dj) {
      *reinterpret_cast<uint32_t*>(smem_q + Traits::swizzle(first_tile_row + half * 8, dj) +
                                   quad_col * 2) =
          Arch::template pack_pair<Element>(acc_o[dj * 4 + 2 * half] * inverse,
                                            acc_o[dj * 4 + 2 * half + 1] * inverse);
    }
  }
  Arch::named_barrier_sync(1 + warpgroup, 128);

  Element* out = static_cast<Element*>(params.out);
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kRowsPerStorePass = 128 / kChunksPerRow;
  {
    const int thread = tid % 128;
    const int first_r = warpgroup * 64 + thread / kChunksPerRow;
    const int chunk = thread % kChunksPerRow;
    PrefillRowCursor cursor(cta.m0 + first_r, group);
    const PrefillRowCursor step(kRowsPerStorePass, group);
#pragma unroll
    for (int pass = 0; pass < 64 / kRowsPerStorePass; ++pass) {
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
    PrefillRowCursor cursor(thread_row0, group);
    const PrefillRowCursor step(8, group);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (thread_row0 + half * 8 < cta.num_rows) {
        params.lse[static_cast<int64_t>(cta.q_start + cursor.token) * params.num_heads +
                   cta.kv_head * group + cursor.head] = row_lse[half];
      }
      cursor.advance(step, group);
    }
  }
}

// Only sm_90a has wgmma and setmaxnreg: elsewhere (sm_80 code of the same build) a trap, and
// dispatch never launches it there.
template <typename Traits, bool kCausal>
__global__ void __launch_bounds__(Traits::kNumThreads, Traits::kMinBlocksPerSm)
    prefill_sm90_kernel(const __grid_constant__ AttentionParams params,
                        const __grid_constant__ CUtensorMap k_map,
                        const __grid_constant__ CUtensorMap v_map) {
#if defined(__CUDA_ARCH__)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  prefill_sm90_body<Traits, kCausal>(params, &k_map, &v_map);
#else
  __trap();
#endif
#endif
}

// The tensor map of one cache (k or v) for the Hopper member: 4-D, [block][slot][kv_head][dim]
// innermost last, boxes of 64 columns x 1 head x box_slots slots x 1 block, 128-byte swizzle.
// Defined in prefill_sm90.cu (it needs the driver's cuTensorMapEncodeTiled).
CUtensorMap make_prefill_sm90_kv_map(const AttentionParams& params, const void* cache,
                                     int box_slots);

}  // namespace ftengine::kernels::cuda
