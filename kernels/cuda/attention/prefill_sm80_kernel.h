// The FastAttention prefill body (FlashAttention-2 dataflow) over the paged KV cache, for the
// members whose warps hold mma.m16n8k16 fragments (sm80, sm75); prefill_sm70_kernel.h is the
// m8n8k4 body of the Volta member, with the same CTA-level structure.
//
// One CTA owns kBlockM query rows of one sequence and one KV head. A row is a (token, query head)
// pair, token-major: row r is token r / group, head kv_head * group + r % group. Packing the GQA
// group into the rows reads each K/V tile once for all its query heads, and gives a decode token
// (q_len = 1) `group` useful rows instead of one.
//
// The CTA walks its KV tiles from the last to the first. Tiling-mask: a tile is classified from
// positions alone; tiles past the last visible key are never visited (empty), tiles crossing
// the causal diagonal or the sequence end come first and are the only ones that compute a mask
// (partial), the rest run unmasked (full). There is no mask tensor.
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

namespace ftengine::kernels::cuda {

// (token, head within the GQA group) of a tile row, stepped a fixed number of rows at a time: one
// integer division per cursor instead of one per row (a division is ~20 instructions).
struct PrefillRowCursor {
  int token;
  int head;
  __device__ __forceinline__ PrefillRowCursor(int row, int group)
      : token(row / group), head(row - token * group) {}
  // `step` is another cursor: the (tokens, heads) that `rows` rows span.
  __device__ __forceinline__ void advance(const PrefillRowCursor& step, int group) {
    token += step.token;
    head += step.head;
    if (head >= group) {
      head -= group;
      ++token;
    }
  }
};

// The body, shared by the m16n8k16-fragment members: sm80 (cp.async, mma.m16n8k16) and sm75
// (register round-trip copies, two mma.m16n8k8 per k16 step). What differs is Traits::Arch.
template <typename Traits, bool kCausal>
__device__ __forceinline__ void prefill_mma_body(const AttentionParams& params) {
  using Arch = typename Traits::Arch;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNumThreads = Traits::kNumThreads;
  constexpr int kRowsPerWarp = Traits::kRowsPerWarp;
  constexpr int kMTiles = Traits::kMTilesPerWarp;  // m16 tiles a warp owns
  constexpr int kNTiles = kBlockN / 8;             // n8 tiles of S
  constexpr int kDTiles = kHeadDim / 8;            // n8 tiles of O
  constexpr int kQkSteps = kHeadDim / 16;          // k16 steps of Q·Kᵀ
  constexpr int kPvSteps = kBlockN / 16;           // k16 steps of P·V
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kRowsPerLoadPass = kNumThreads / kChunksPerRow;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;

  // 1 KB aligned: the ldmatrix addressing below steps along rows by XOR-ing address bits 5-7.
  extern __shared__ __align__(1024) unsigned char shared_bytes[];
  Element* smem_q = reinterpret_cast<Element*>(shared_bytes);
  Element* smem_k = smem_q + Traits::kQTileElements;
  Element* smem_v = smem_k + Traits::kStages * Traits::kKvTileElements;

  // Query tiles vary fastest in the grid, so the CTAs resident together mostly share a
  // (sequence, KV head) and read its K/V from L2: with the KV head fastest instead, S = 4096 ran
  // at 76% of DRAM bandwidth, FlashAttention-2 at 5%. Within a (sequence, KV head) the longest
  // tiles go first: blockIdx.x counts down from the last query tile, which has the most visible
  // keys under a causal mask, so the short tiles fill the tail of the grid.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int kv_head = blockIdx.y;
  const int seq = blockIdx.z;
  const int group = params.num_heads / params.num_kv_heads;
  const int q_start = params.cu_seqlens_q[seq];
  const int q_len = params.cu_seqlens_q[seq + 1] - q_start;
  const int kv_len = params.seqlens_kv[seq];
  const int num_rows = q_len * group;
  const int m0 = m_block * kBlockM;
  if (m0 >= num_rows) return;  // the grid is sized for max_seqlen_q

  // Query token i sits at position first_position + i.
  const int first_position = kv_len - q_len;
  const int last_row = min(m0 + kBlockM, num_rows) - 1;
  const int visible_end = kCausal ? min(kv_len, first_position + last_row / group + 1) : kv_len;
  const int num_kv_tiles = visible_end > 0 ? (visible_end + kBlockN - 1) / kBlockN : 0;
  // Tiles [0, num_full_tiles) lie inside the sequence and, causal, at or before the tile's
  // earliest query: no row of the tile needs a mask there.
  int num_full_tiles = kv_len / kBlockN;
  if (kCausal) {
    num_full_tiles = min(num_full_tiles, max(0, first_position + m0 / group + 1) / kBlockN);
  }

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int quad_row = lane / 4;  // "group" of the mma fragment layouts
  const int quad_col = lane % 4;  // "t" of the mma fragment layouts

  // First of the rows this thread holds accumulators for: rows + mi * 16 + half * 8.
  const int thread_row0 = m0 + warp * kRowsPerWarp + quad_row;

  // ---- global -> shared loads: thread tid copies 16-byte chunk tid % kChunksPerRow of rows
  // tid / kChunksPerRow + k * kRowsPerLoadPass; a row's chunks come from consecutive threads.
  const int load_chunk = tid % kChunksPerRow;
  const int load_row = tid / kChunksPerRow;
  // Passes step whole multiples of 8 rows, which keeps the swizzle: offset(row + 8k, chunk) =
  // offset(row, chunk) + 8k rows.
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

  // A tile lies in one cache block (block_size % kBlockN == 0): one table entry locates it.
  // Tiles are walked downwards, so the block and the slot of the next tile to load are stepped
  // rather than divided out per tile.
  const int32_t* block_table =
      params.block_table + static_cast<int64_t>(seq) * params.block_table_stride;
  const int64_t kv_head_offset =
      static_cast<int64_t>(kv_head) * params.kv_head_stride + load_chunk * 8;
  const int32_t kv_token_stride = static_cast<int32_t>(params.kv_token_stride);
  // Offsets inside one block fit 32 bits (checked by prefill_sm80_unsupported_reason).
  const int32_t pass_stride = kRowsPerLoadPass * kv_token_stride;
  auto kv_row_source = [&](const void* cache, int cache_block, int slot) {
    return static_cast<const Element*>(cache) +
           static_cast<int64_t>(cache_block) * params.kv_block_stride + kv_head_offset +
           (slot + load_row) * kv_token_stride;
  };
  // Every tile but the sequence's last lies below kv_len: its loads need no bounds checks.
  auto load_full_kv_tile = [&](const void* cache, uint32_t smem, int cache_block, int slot) {
    const Element* source = kv_row_source(cache, cache_block, slot);
#pragma unroll
    for (int pass = 0; pass < kBlockN / kRowsPerLoadPass; ++pass) {
      Arch::cp_async_16(smem + load_offset + pass * kPassBytes, source + pass * pass_stride);
    }
  };

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
  // Scores stay unscaled; softmax_scale * log2(e) enters once in the exp2 argument's FMA.
  const float scale_log2 = params.softmax_scale * kLog2e;

  if (num_kv_tiles > 0) {
    const uint32_t smem_k_address = Arch::shared_address(smem_k);
    const uint32_t smem_v_address = Arch::shared_address(smem_v);
    constexpr uint32_t kStageBytes = Traits::kKvTileElements * sizeof(Element);

    // Prologue (one cp.async group): Q and the last tile, whose rows past kv_len are zero-filled.
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
    // Step to the tile loaded next; its table entry is read a whole tile ahead of its use.
    auto step_down = [&]() {
      if (tile_in_block == 0) {
        tile_in_block = tiles_per_block - 1;
        cache_block = block_table[--table_index];
      } else {
        --tile_in_block;
      }
    };
    if (num_kv_tiles > 1) step_down();

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

      // Issued after the products so they do not wait behind the address arithmetic; they
      // have this tile's softmax and P·V plus the next Q·Kᵀ to land.
      if (tile > 0) {
        const int slot = tile_in_block * kBlockN;
        load_full_kv_tile(params.k_cache, smem_k_address + (stage ^ 1) * kStageBytes, cache_block,
                          slot);
        load_full_kv_tile(params.v_cache, smem_v_address + (stage ^ 1) * kStageBytes, cache_block,
                          slot);
        if (tile > 1) step_down();
      }
      Arch::cp_async_commit();  // possibly empty: keeps the group count uniform

      if constexpr (kMasked) {
        // Relative to this thread's first key of the tile, so the compare is against a constant.
        const int key0 = tile * kBlockN + quad_col * 2;
        PrefillRowCursor cursor(thread_row0, group);  // rows thread_row0 + 8 * (2 mi + half)
        const PrefillRowCursor step(8, group);
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int visible =
                (kCausal ? min(kv_len, first_position + cursor.token + 1) : kv_len) - key0;
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

      // Online softmax with lazy rescaling: the running max moves only when a row's tile max
      // exceeds it by more than kRescaleThreshold (log2 units), so probabilities stay below
      // 2^kRescaleThreshold (safe in float32 sums and in fp16 / bf16 P) and the 128 multiplies
      // rescaling O are skipped for most tiles once the max has settled. The decision is one
      // per warp, so the rescale is a uniform branch.
      constexpr float kRescaleThreshold = 8.f;
      float tile_max[kMTiles][2];
      bool rescale = false;
#pragma unroll
      for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          // A tree, not a chain: with two warps per scheduler the dependent-latency stalls of a
          // 16-deep chain showed up as the top stall reason (ncu, "fixed latency dependency").
          float partial[kNTiles];
#pragma unroll
          for (int nj = 0; nj < kNTiles; ++nj) {
            partial[nj] = fmaxf(acc_s[mi][nj][2 * half], acc_s[mi][nj][2 * half + 1]);
          }
#pragma unroll
          for (int width = kNTiles / 2; width > 0; width /= 2) {
#pragma unroll
            for (int nj = 0; nj < width; ++nj)
              partial[nj] = fmaxf(partial[nj], partial[nj + width]);
          }
          float m = partial[0];
          // The four lanes of a quad hold the same rows.
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
          tile_max[mi][half] = m * scale_log2;  // -inf stays -inf
          // True for a row's first visible keys (max -inf); false while it has none.
          rescale |= tile_max[mi][half] > row_max[mi][half] + kRescaleThreshold;
        }
      }
      if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const float new_max = fmaxf(row_max[mi][half], tile_max[mi][half]);
            // exp2(-inf) = 0 drops nothing: a row's sum and O are 0 until its first key.
            const float correction =
                new_max == -INFINITY ? 1.f : Arch::exp2_approx(row_max[mi][half] - new_max);
            row_max[mi][half] = new_max;
            row_sum[mi][half] *= correction;
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
          // A row still at -inf has only masked scores here: offset 0 keeps -inf - -inf away.
          const float offset = row_max[mi][half] == -INFINITY ? 0.f : row_max[mi][half];
          float partial[kNTiles];
#pragma unroll
          for (int nj = 0; nj < kNTiles; ++nj) {
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              acc_s[mi][nj][e] = Arch::exp2_approx(fmaf(acc_s[mi][nj][e], scale_log2, -offset));
            }
            partial[nj] = acc_s[mi][nj][2 * half] + acc_s[mi][nj][2 * half + 1];
          }
#pragma unroll
          for (int width = kNTiles / 2; width > 0; width /= 2) {
#pragma unroll
            for (int nj = 0; nj < width; ++nj) partial[nj] += partial[nj + width];
          }
          row_sum[mi][half] += partial[0];
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

    int tile = num_kv_tiles - 1;
    for (; tile >= num_full_tiles; --tile) attend_tile(tile, std::true_type{});
    for (; tile >= 0; --tile) attend_tile(tile, std::false_type{});
  }

  // ---- epilogue: normalise, stage this warp's rows of O in its own rows of the Q tile (no
  // other warp reads them), then write 16-byte chunks of whole rows.
  // The warp's last reads of those rows (ldmatrix of Q) are ordered before the writes; without
  // this barrier compute-sanitizer's racecheck reports lane-to-lane hazards.
  __syncwarp();
  float row_lse[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = row_sum[mi][half];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      // A row that saw no key keeps sum 0: zero output and lse -inf, never 0/0.
      const float inverse = sum > 0.f ? 1.f / sum : 0.f;
      row_lse[mi][half] = sum > 0.f ? (row_max[mi][half] + __log2f(sum)) * kLn2 : -INFINITY;
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

  if (params.lse != nullptr && quad_col == 0) {
    PrefillRowCursor cursor(thread_row0, group);  // rows thread_row0 + 8 * (2 mi + half)
    const PrefillRowCursor step(8, group);
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (thread_row0 + mi * 16 + half * 8 < num_rows) {
          params.lse[static_cast<int64_t>(q_start + cursor.token) * params.num_heads +
                     kv_head * group + cursor.head] = row_lse[mi][half];
        }
        cursor.advance(step, group);
      }
    }
  }
}

}  // namespace ftengine::kernels::cuda
