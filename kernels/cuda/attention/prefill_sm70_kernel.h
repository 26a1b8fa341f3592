// The Volta body of the FastAttention prefill family: the CTA-level dataflow of
// prefill_sm80_kernel.h (GQA rows packed into tiles, tiles walked from the last, tiling-mask
// classification, K/V double-buffered, lazy online softmax, O staged in the Q tile) with warps
// that hold mma.m8n8k4 fragments. The fragment and shared-memory layouts are explained in
// prefill_sm70_traits.h.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention/attention_params.h"
#include "kernels/cuda/attention/prefill_sm80_kernel.h"

namespace ftengine::kernels::cuda {

template <typename Traits, bool kCausal>
__device__ __forceinline__ void prefill_sm70_body(const AttentionParams& params) {
  using Arch = typename Traits::Arch;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNumThreads = Traits::kNumThreads;
  constexpr int kRowsPerWarp = Traits::kRowsPerWarp;  // 32: one m8n8k4 instruction's rows
  constexpr int kNTiles = kBlockN / 8;                // n8 key tiles of S
  constexpr int kDTiles = kHeadDim / 8;               // n8 tiles of O
  constexpr int kQkSteps = kHeadDim / 8;              // k8 steps (two k4 products, one load)
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kRowsPerLoadPass = kNumThreads / kChunksPerRow;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;

  extern __shared__ __align__(1024) unsigned char shared_bytes[];
  Element* smem_q = reinterpret_cast<Element*>(shared_bytes);
  Element* smem_k = smem_q + Traits::kQTileElements;
  Element* smem_v = smem_k + Traits::kStages * Traits::kKvTileElements;

  // Grid order, row packing and tile classification as in prefill_sm80_kernel.h.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int kv_head = blockIdx.y;
  const int seq = blockIdx.z;
  const int group = params.num_heads / params.num_kv_heads;
  const int q_start = params.cu_seqlens_q[seq];
  const int q_len = params.cu_seqlens_q[seq + 1] - q_start;
  const int kv_len = params.seqlens_kv[seq];
  const int num_rows = q_len * group;
  const int m0 = m_block * kBlockM;
  if (m0 >= num_rows) return;

  const int first_position = kv_len - q_len;
  const int last_row = min(m0 + kBlockM, num_rows) - 1;
  const int visible_end = kCausal ? min(kv_len, first_position + last_row / group + 1) : kv_len;
  const int num_kv_tiles = visible_end > 0 ? (visible_end + kBlockN - 1) / kBlockN : 0;
  int num_full_tiles = kv_len / kBlockN;
  if (kCausal) {
    num_full_tiles = min(num_full_tiles, max(0, first_position + m0 / group + 1) / kBlockN);
  }

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int quad_pair = (lane / 4) % 4;
  const int high = lane / 16;
  // Warp row of this lane's A fragments (hardware row lane % 4 + 4 * high of its quad pair) and
  // of its accumulator slot 0 (slot 1 is two rows further): see prefill_sm70_traits.h.
  const int pair_rows = 4 * (quad_pair % 2) + 8 * high + 16 * (quad_pair / 2);
  const int fragment_row = lane % 4 + pair_rows;
  const int thread_row0 = m0 + warp * kRowsPerWarp + (lane & 1) + pair_rows;
  const bool odd_pair_lane = (lane & 2) != 0;  // holds columns 2, 3, 6, 7 of each n8 tile

  const int load_chunk = tid % kChunksPerRow;
  const int load_row = tid / kChunksPerRow;
  static_assert(kRowsPerLoadPass % 8 == 0);
  const uint32_t load_offset = 2 * Traits::swizzle(load_row, load_chunk);
  constexpr uint32_t kPassBytes = kRowsPerLoadPass * kHeadDim * sizeof(Element);

  auto load_q = [&]() {
    const Element* q = static_cast<const Element*>(params.q);
    PrefillRowCursor cursor(m0 + load_row, group);
    const PrefillRowCursor step(kRowsPerLoadPass, group);
#pragma unroll
    for (int pass = 0; pass < kBlockM / kRowsPerLoadPass; ++pass) {
      const bool valid = m0 + pass * kRowsPerLoadPass + load_row < num_rows;
      const Element* source =
          valid ? q + static_cast<int64_t>(q_start + cursor.token) * params.q_token_stride +
                      static_cast<int64_t>(kv_head * group + cursor.head) * params.q_head_stride +
                      load_chunk * 8
                : q;
      Arch::cp_async_16(Arch::shared_address(smem_q) + load_offset + pass * kPassBytes, source,
                        valid);
      cursor.advance(step, group);
    }
  };

  const int32_t* block_table =
      params.block_table + static_cast<int64_t>(seq) * params.block_table_stride;
  const int64_t kv_head_offset =
      static_cast<int64_t>(kv_head) * params.kv_head_stride + load_chunk * 8;
  const int32_t kv_token_stride = static_cast<int32_t>(params.kv_token_stride);
  const int32_t pass_stride = kRowsPerLoadPass * kv_token_stride;
  auto kv_row_source = [&](const void* cache, int cache_block, int slot) {
    return static_cast<const Element*>(cache) +
           static_cast<int64_t>(cache_block) * params.kv_block_stride + kv_head_offset +
           (slot + load_row) * kv_token_stride;
  };
  auto load_full_kv_tile = [&](const void* cache, uint32_t smem, int cache_block, int slot) {
    const Element* source = kv_row_source(cache, cache_block, slot);
#pragma unroll
    for (int pass = 0; pass < kBlockN / kRowsPerLoadPass; ++pass) {
      Arch::cp_async_16(smem + load_offset + pass * kPassBytes, source + pass * pass_stride);
    }
  };

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

  if (num_kv_tiles > 0) {
    const uint32_t smem_k_address = Arch::shared_address(smem_k);
    const uint32_t smem_v_address = Arch::shared_address(smem_v);
    constexpr uint32_t kStageBytes = Traits::kKvTileElements * sizeof(Element);

    const int tiles_per_block = params.block_size / kBlockN;
    int table_index = (num_kv_tiles - 1) / tiles_per_block;
    int tile_in_block = num_kv_tiles - 1 - table_index * tiles_per_block;
    int cache_block = block_table[table_index];
    load_q();
    {
      const int n0 = (num_kv_tiles - 1) * kBlockN;
      const Element* k_source = kv_row_source(params.k_cache, cache_block, tile_in_block * kBlockN);
      const Element* v_source = kv_row_source(params.v_cache, cache_block, tile_in_block * kBlockN);
#pragma unroll
      for (int pass = 0; pass < kBlockN / kRowsPerLoadPass; ++pass) {
        const bool valid = n0 + pass * kRowsPerLoadPass + load_row < kv_len;
        const uint32_t offset = load_offset + pass * kPassBytes;
        Arch::cp_async_16(smem_k_address + offset,
                          valid ? k_source + pass * pass_stride : params.k_cache, valid);
        Arch::cp_async_16(smem_v_address + offset,
                          valid ? v_source + pass * pass_stride : params.v_cache, valid);
      }
    }
    Arch::cp_async_commit();
    auto step_down = [&]() {
      if (tile_in_block == 0) {
        tile_in_block = tiles_per_block - 1;
        cache_block = block_table[--table_index];
      } else {
        --tile_in_block;
      }
    };
    if (num_kv_tiles > 1) step_down();

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

      if (tile > 0) {
        const int slot = tile_in_block * kBlockN;
        load_full_kv_tile(params.k_cache, smem_k_address + (stage ^ 1) * kStageBytes, cache_block,
                          slot);
        load_full_kv_tile(params.v_cache, smem_v_address + (stage ^ 1) * kStageBytes, cache_block,
                          slot);
        if (tile > 1) step_down();
      }
      Arch::cp_async_commit();

      if constexpr (kMasked) {
        // Element i of n8 tile nj is key tile * kBlockN + nj * 8 + (lane & 2) + (i & 1) + (i & 4).
        const int key0 = tile * kBlockN + (lane & 2);
        PrefillRowCursor cursor(thread_row0, group);
        const PrefillRowCursor step(2, group);
#pragma unroll
        for (int slot = 0; slot < 2; ++slot) {
          const int visible =
              (kCausal ? min(kv_len, first_position + cursor.token + 1) : kv_len) - key0;
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

      // Online softmax with lazy rescaling, as in prefill_sm80_kernel.h. A row's 64 scores are
      // spread over two lanes (lane and lane ^ 2), 32 each.
      constexpr float kRescaleThreshold = 8.f;
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
#pragma unroll
        for (int width = kNTiles / 2; width > 0; width /= 2) {
#pragma unroll
          for (int nj = 0; nj < width; ++nj) partial[nj] = fmaxf(partial[nj], partial[nj + width]);
        }
        const float m = fmaxf(partial[0], __shfl_xor_sync(0xffffffffu, partial[0], 2));
        tile_max[slot] = m * scale_log2;
        rescale |= tile_max[slot] > row_max[slot] + kRescaleThreshold;
      }
      if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int slot = 0; slot < 2; ++slot) {
          const float new_max = fmaxf(row_max[slot], tile_max[slot]);
          const float correction =
              new_max == -INFINITY ? 1.f : Arch::exp2_approx(row_max[slot] - new_max);
          row_max[slot] = new_max;
          row_sum[slot] *= correction;
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
        const float offset = row_max[slot] == -INFINITY ? 0.f : row_max[slot];
        float partial[kNTiles];
#pragma unroll
        for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int i = 2 * slot + (c & 1) + 4 * (c / 2);
            acc_s[nj][i] = Arch::exp2_approx(fmaf(acc_s[nj][i], scale_log2, -offset));
          }
          partial[nj] = (acc_s[nj][2 * slot] + acc_s[nj][2 * slot + 1]) +
                        (acc_s[nj][2 * slot + 4] + acc_s[nj][2 * slot + 5]);
        }
#pragma unroll
        for (int width = kNTiles / 2; width > 0; width /= 2) {
#pragma unroll
          for (int nj = 0; nj < width; ++nj) partial[nj] += partial[nj + width];
        }
        row_sum[slot] += partial[0];
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

    int tile = num_kv_tiles - 1;
    for (; tile >= num_full_tiles; --tile) attend_tile(tile, std::true_type{});
    for (; tile >= 0; --tile) attend_tile(tile, std::false_type{});
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
    const float inverse = sum > 0.f ? 1.f / sum : 0.f;
    row_lse[slot] = sum > 0.f ? (row_max[slot] + __log2f(sum)) * kLn2 : -INFINITY;
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

  Element* out = static_cast<Element*>(params.out);
  constexpr int kRowsPerStorePass = 32 / kChunksPerRow;
  {
    const int first_r = warp * kRowsPerWarp + lane / kChunksPerRow;
    const int chunk = lane % kChunksPerRow;
    PrefillRowCursor cursor(m0 + first_r, group);
    const PrefillRowCursor step(kRowsPerStorePass, group);
#pragma unroll
    for (int pass = 0; pass < kRowsPerWarp / kRowsPerStorePass; ++pass) {
      const int r = first_r + pass * kRowsPerStorePass;
      if (m0 + r < num_rows) {
        Element* destination =
            out + static_cast<int64_t>(q_start + cursor.token) * params.out_token_stride +
            static_cast<int64_t>(kv_head * group + cursor.head) * params.out_head_stride +
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
      if (thread_row0 + 2 * slot < num_rows) {
        params.lse[static_cast<int64_t>(q_start + cursor.token) * params.num_heads +
                   kv_head * group + cursor.head] = row_lse[slot];
      }
      cursor.advance(step, group);
    }
  }
}

}  // namespace ftengine::kernels::cuda
