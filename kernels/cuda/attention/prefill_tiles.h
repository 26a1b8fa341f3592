// The CTA-level pieces of the FastAttention prefill bodies that do not depend on the warps'
// fragment layout: which query rows a CTA owns and which KV tiles it visits (tiling-mask
// classification), the global -> shared tile loads over the paged cache, the row-wise steps of
// the online softmax, and the epilogue's stores of whole rows. The m16n8k16 body
// (prefill_sm80_kernel.h) and the m8n8k4 body (prefill_sm70_kernel.h) keep only what their
// fragments decide.
//
// One CTA owns kBlockM query rows of one sequence and one KV head. A row is a (token, query head)
// pair, token-major: row r is token r / group, head kv_head * group + r % group. Packing the GQA
// group into the rows reads each K/V tile once for all its query heads, and gives a decode token
// (q_len = 1) `group` useful rows instead of one.
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

// The shared-memory tiles of a member: Q (kBlockM rows), then kStages K and kStages V tiles
// (kBlockN rows each), all row-major [rows][kHeadDim] with the 16-byte chunks of a row permuted
// by XOR with (row % 8): the 8 rows an ldmatrix (or a quarter warp's 16-byte loads on Volta)
// reads at one logical chunk land in 8 different 16-byte bank groups instead of one (an 8-way
// conflict with row strides of 128 or 256 bytes). The traits of each member derive from this.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_>
struct PrefillTileShape {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim % 64 == 0, "rows are swizzled in 128-byte (64-element) groups");
  static constexpr int kBlockM = kBlockM_;  // query rows per CTA: (token, head of the GQA group)
  static constexpr int kBlockN = kBlockN_;  // keys per tile; the cache block size is a multiple
  static constexpr int kStages = kStages_;  // K and V tiles each kStages-buffered

  static constexpr int kChunksPerRow = kHeadDim / 8;
  // Bytes between a row and the next at the same chunk (the Hopper member stores 64-column
  // panels and overrides this and swizzle()).
  static constexpr int kRowPitchBytes = kHeadDim * static_cast<int>(sizeof(Element));
  static __device__ __forceinline__ int swizzle(int row, int chunk) {
    return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
  }

  static constexpr int kQTileElements = kBlockM * kHeadDim;
  static constexpr int kKvTileElements = kBlockN * kHeadDim;
  static constexpr int kSharedBytes =
      (kQTileElements + 2 * kStages * kKvTileElements) * static_cast<int>(sizeof(Element));
};

// The query rows of this CTA and the KV tiles they see. Built in two steps so that a CTA past its
// sequence's rows returns before any key arithmetic: construct, return if m0 >= num_rows, then
// classify_kv_tiles().
//
// Tiling-mask: the CTA walks its KV tiles from the last to the first and classifies them from
// positions alone; tiles past the last visible key are never visited (empty), tiles crossing the
// causal diagonal or the sequence end come first and are the only ones that compute a mask
// (partial), the rest run unmasked (full). There is no mask tensor.
template <int kBlockM, int kBlockN, bool kCausal>
struct PrefillCtaTiles {
  int kv_head;
  int seq;
  int group;
  int q_start;
  int q_len;
  int kv_len;
  int num_rows;
  int m0;
  int first_position;  // query token i sits at position first_position + i
  int num_kv_tiles;    // tiles [0, num_kv_tiles) hold a visible key of some row
  int num_full_tiles;  // tiles [0, num_full_tiles) need no mask for any row

  // Query tiles vary fastest in the grid, so the CTAs resident together mostly share a
  // (sequence, KV head) and read its K/V from L2: with the KV head fastest instead, S = 4096 ran
  // at 76% of DRAM bandwidth, FlashAttention-2 at 5%. Within a (sequence, KV head) the longest
  // tiles go first: blockIdx.x counts down from the last query tile, which has the most visible
  // keys under a causal mask, so the short tiles fill the tail of the grid.
  __device__ __forceinline__ explicit PrefillCtaTiles(const AttentionParams& params) {
    const int m_block = gridDim.x - 1 - blockIdx.x;
    kv_head = blockIdx.y;
    seq = blockIdx.z;
    group = params.num_heads / params.num_kv_heads;
    q_start = params.cu_seqlens_q[seq];
    q_len = params.cu_seqlens_q[seq + 1] - q_start;
    kv_len = params.seqlens_kv[seq];
    num_rows = q_len * group;
    m0 = m_block * kBlockM;  // the grid is sized for max_seqlen_q: m0 may pass num_rows
  }

  // Keys [0, visible_keys(token)) are visible to query token `token`.
  __device__ __forceinline__ int visible_keys(int token) const {
    return kCausal ? min(kv_len, first_position + token + 1) : kv_len;
  }

  __device__ __forceinline__ void classify_kv_tiles() {
    first_position = kv_len - q_len;
    const int last_row = min(m0 + kBlockM, num_rows) - 1;
    const int visible_end = visible_keys(last_row / group);
    num_kv_tiles = visible_end > 0 ? (visible_end + kBlockN - 1) / kBlockN : 0;
    // Full tiles lie inside the sequence and, causal, at or before the tile's earliest query.
    num_full_tiles = kv_len / kBlockN;
    if (kCausal) {
      num_full_tiles = min(num_full_tiles, max(0, first_position + m0 / group + 1) / kBlockN);
    }
  }

  // attend_tile(tile, std::integral_constant<bool, masked>) for the visible tiles from the last
  // to the first: the partial tiles first, then the full ones.
  template <typename AttendTile>
  __device__ __forceinline__ void for_each_kv_tile_backwards(AttendTile&& attend_tile) const {
    int tile = num_kv_tiles - 1;
    for (; tile >= num_full_tiles; --tile) attend_tile(tile, std::true_type{});
    for (; tile >= 0; --tile) attend_tile(tile, std::false_type{});
  }
};

// Global -> shared copies of the Q tile and of the K/V tiles. Thread tid copies 16-byte chunk
// tid % kChunksPerRow of rows tid / kChunksPerRow + k * kRowsPerLoadPass; a row's chunks come
// from consecutive threads. Traits::Arch brings the copy (cp.async or a register round trip).
//
// A KV tile lies in one cache block (block_size % kBlockN == 0): one table entry locates it.
// Tiles are walked downwards, so the block and the slot of the next tile to load are stepped
// rather than divided out per tile.
template <typename Traits, typename Cta>
struct PrefillTileLoader {
  using Arch = typename Traits::Arch;
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kChunksPerRow = Traits::kChunksPerRow;
  // Traits::kLoadThreads threads copy (all of the CTA's, or the Hopper member's producers).
  static constexpr int kRowsPerLoadPass = Traits::kLoadThreads / kChunksPerRow;
  // Passes step whole multiples of 8 rows, which keeps the swizzle: offset(row + 8k, chunk) =
  // offset(row, chunk) + 8k rows.
  static_assert(kRowsPerLoadPass % 8 == 0);
  static constexpr uint32_t kPassBytes = kRowsPerLoadPass * Traits::kRowPitchBytes;

  const AttentionParams& params;
  const Cta& cta;
  const int load_chunk;
  const int load_row;
  const uint32_t load_offset;
  const int32_t* const block_table;
  const int64_t kv_head_offset;
  const int32_t kv_token_stride;
  // Offsets inside one block fit 32 bits (checked by prefill_sm80_unsupported_reason).
  const int32_t pass_stride;
  // The cache block and tile slot of the next tile to load; set by load_q_and_last_kv_tile.
  int tiles_per_block;
  int table_index;
  int tile_in_block;
  int cache_block;

  __device__ __forceinline__ PrefillTileLoader(const AttentionParams& params_, const Cta& cta_,
                                               int tid)
      : params(params_),
        cta(cta_),
        load_chunk(tid % kChunksPerRow),
        load_row(tid / kChunksPerRow),
        load_offset(2 * Traits::swizzle(load_row, load_chunk)),
        block_table(params.block_table + static_cast<int64_t>(cta.seq) * params.block_table_stride),
        kv_head_offset(static_cast<int64_t>(cta.kv_head) * params.kv_head_stride + load_chunk * 8),
        kv_token_stride(static_cast<int32_t>(params.kv_token_stride)),
        pass_stride(kRowsPerLoadPass * kv_token_stride) {}

  __device__ __forceinline__ void load_q(Element* smem_q) const {
    const Element* q = static_cast<const Element*>(params.q);
    const int group = cta.group;
    PrefillRowCursor cursor(cta.m0 + load_row, group);
    const PrefillRowCursor step(kRowsPerLoadPass, group);
#pragma unroll
    for (int pass = 0; pass < kBlockM / kRowsPerLoadPass; ++pass) {
      const bool valid = cta.m0 + pass * kRowsPerLoadPass + load_row < cta.num_rows;
      const Element* source =
          valid ? q + static_cast<int64_t>(cta.q_start + cursor.token) * params.q_token_stride +
                      static_cast<int64_t>(cta.kv_head * group + cursor.head) *
                          params.q_head_stride +
                      load_chunk * 8
                : q;
      Arch::cp_async_16(Arch::shared_address(smem_q) + load_offset + pass * kPassBytes, source,
                        valid);
      cursor.advance(step, group);
    }
  }

  __device__ __forceinline__ const Element* kv_row_source(const void* cache, int slot) const {
    return static_cast<const Element*>(cache) +
           static_cast<int64_t>(cache_block) * params.kv_block_stride + kv_head_offset +
           (slot + load_row) * kv_token_stride;
  }

  // Every tile but the sequence's last lies below kv_len: its loads need no bounds checks.
  __device__ __forceinline__ void load_full_kv_tile(const void* cache, uint32_t smem,
                                                    int slot) const {
    const Element* source = kv_row_source(cache, slot);
#pragma unroll
    for (int pass = 0; pass < kBlockN / kRowsPerLoadPass; ++pass) {
      Arch::cp_async_16(smem + load_offset + pass * kPassBytes, source + pass * pass_stride);
    }
  }

  // Step to the tile loaded next; its table entry is read a whole tile ahead of its use.
  __device__ __forceinline__ void step_down() {
    if (tile_in_block == 0) {
      tile_in_block = tiles_per_block - 1;
      cache_block = block_table[--table_index];
    } else {
      --tile_in_block;
    }
  }

  // Prologue (one cp.async group): Q and the last visible tile, whose rows past kv_len are
  // zero-filled.
  __device__ __forceinline__ void load_q_and_last_kv_tile(Element* smem_q, uint32_t smem_k,
                                                          uint32_t smem_v) {
    const int num_kv_tiles = cta.num_kv_tiles;
    tiles_per_block = params.block_size / kBlockN;
    table_index = (num_kv_tiles - 1) / tiles_per_block;
    tile_in_block = num_kv_tiles - 1 - table_index * tiles_per_block;
    cache_block = block_table[table_index];
    load_q(smem_q);
    {
      const int n0 = (num_kv_tiles - 1) * kBlockN;
      const Element* k_source = kv_row_source(params.k_cache, tile_in_block * kBlockN);
      const Element* v_source = kv_row_source(params.v_cache, tile_in_block * kBlockN);
#pragma unroll
      for (int pass = 0; pass < kBlockN / kRowsPerLoadPass; ++pass) {
        const bool valid = n0 + pass * kRowsPerLoadPass + load_row < cta.kv_len;
        const uint32_t offset = load_offset + pass * kPassBytes;
        Arch::cp_async_16(smem_k + offset, valid ? k_source + pass * pass_stride : params.k_cache,
                          valid);
        Arch::cp_async_16(smem_v + offset, valid ? v_source + pass * pass_stride : params.v_cache,
                          valid);
      }
    }
    Arch::cp_async_commit();
    if (num_kv_tiles > 1) step_down();
  }

  // While tile `tile` is being computed from stage `stage` of the K and V buffers (smem_k,
  // smem_v): K(tile - 1) and V(tile - 1) into the other stage. Issued after the tile's Q·Kᵀ so
  // the copies do not wait behind the address arithmetic; they have the tile's softmax and P·V
  // plus the next Q·Kᵀ to land. The stage offset is computed under `tile > 0`: computed outside,
  // as an argument, it changed the generated code.
  __device__ __forceinline__ void load_next_kv_tile(int tile, uint32_t smem_k, uint32_t smem_v,
                                                    int stage) {
    constexpr uint32_t kStageBytes = Traits::kKvTileElements * sizeof(Element);
    if (tile > 0) {
      const int slot = tile_in_block * kBlockN;
      load_full_kv_tile(params.k_cache, smem_k + (stage ^ 1) * kStageBytes, slot);
      load_full_kv_tile(params.v_cache, smem_v + (stage ^ 1) * kStageBytes, slot);
      if (tile > 1) step_down();
    }
    Arch::cp_async_commit();  // possibly empty: keeps the group count uniform
  }
};

// Online softmax, row-wise steps. Scores stay unscaled; softmax_scale * log2(e) enters once in the
// exp2 argument's FMA, and a row's running max is kept in log2 units.

// MUFU.EX2: 2^x with ~2 ulp error, 2^-inf = 0; exp2f would add a denormal-safe slow path.
__device__ __forceinline__ float prefill_exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// A tree, not a chain: with two warps per scheduler the dependent-latency stalls of a 16-deep
// chain showed up as the top stall reason (ncu, "fixed latency dependency").
template <int kCount>
__device__ __forceinline__ float tree_max(float (&partial)[kCount]) {
#pragma unroll
  for (int width = kCount / 2; width > 0; width /= 2) {
#pragma unroll
    for (int i = 0; i < width; ++i) partial[i] = fmaxf(partial[i], partial[i + width]);
  }
  return partial[0];
}
template <int kCount>
__device__ __forceinline__ float tree_sum(float (&partial)[kCount]) {
#pragma unroll
  for (int width = kCount / 2; width > 0; width /= 2) {
#pragma unroll
    for (int i = 0; i < width; ++i) partial[i] += partial[i + width];
  }
  return partial[0];
}

// Lazy rescaling: the running max moves only when a row's tile max exceeds it by more than
// kRescaleThreshold (log2 units), so probabilities stay below 2^kRescaleThreshold (safe in
// float32 sums and in fp16 / bf16 P) and the multiplies rescaling O are skipped for most tiles
// once the max has settled. The decision is one per warp, so the rescale is a uniform branch.
constexpr float kPrefillRescaleThreshold = 8.f;

// Raises a row's max to cover `tile_max`, scales its sum, and returns the factor for its O.
__device__ __forceinline__ float raise_row_max(float& row_max, float& row_sum, float tile_max) {
  const float new_max = fmaxf(row_max, tile_max);
  // exp2(-inf) = 0 drops nothing: a row's sum and O are 0 until its first key.
  const float correction = new_max == -INFINITY ? 1.f : prefill_exp2_approx(row_max - new_max);
  row_max = new_max;
  row_sum *= correction;
  return correction;
}

// What the row's scaled scores are shifted by before exp2. A row still at -inf has only masked
// scores here: offset 0 keeps -inf - -inf away.
__device__ __forceinline__ float exp2_offset(float row_max) {
  return row_max == -INFINITY ? 0.f : row_max;
}

// From a row's max and its whole sum: the factor that normalises its O, and its log-sum-exp
// (natural log). A row that saw no key keeps sum 0: zero output and lse -inf, never 0/0.
// One function for both: as two, the compiler branched on sum > 0 twice.
__device__ __forceinline__ void finish_row(float row_max, float sum, float& inverse,
                                           float& row_lse) {
  constexpr float kLn2 = 0.6931471805599453f;
  inverse = sum > 0.f ? 1.f / sum : 0.f;
  row_lse = sum > 0.f ? (row_max + __log2f(sum)) * kLn2 : -INFINITY;
}

}  // namespace ftengine::kernels::cuda
