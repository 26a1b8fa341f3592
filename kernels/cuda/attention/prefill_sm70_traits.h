// Traits of the Volta member (V100): mma.sync m8n8k4 (fp16 in, float32 accumulate), no ldmatrix,
// no cp.async, 96 KB of shared memory per block. Its warp-level dataflow is the body of
// prefill_sm70_kernel.h; the tiles, the shared-memory swizzle and the copies follow the sm80 /
// sm75 members.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m8n8k4"): one warp instruction is four
// independent 8x8x4 products, one per quad pair qp = (lane / 4) % 4 (lanes 4qp..4qp+3 and
// 4qp+16..4qp+19); t = lane % 4 + 4 * (lane / 16) is a lane's index within its quad pair.
//   A, row-major:  lane holds row t, k 0..3 (8 contiguous bytes of a Q or P row).
//   B, col-major:  lane holds column t, k 0..3 (8 contiguous bytes of a K row, for Q·Kᵀ).
//   B, row-major:  lane holds k = lane % 4, columns 4 * (lane / 16) + 0..3 (8 contiguous bytes
//                  of a V row, for P·V).
//   C, float32:    lane holds element i at row (lane & 1) + (i & 2) + 4 * (lane / 16), column
//                  (lane & 2) + (i & 1) + (i & 4).
//
// The operand layout (the paper's Volta redesign; here without ldmatrix, each lane loads its
// fragment with one 16-byte ld.shared covering two k4 steps):
// - A shared-memory request of 16 bytes a lane is served a quarter warp (8 lanes) at a time, so a
//   load is conflict-free when each quarter warp's 8 rows fall in 8 different 16-byte bank
//   groups. Tiles keep the sm80 layout, row-major with 16-byte chunk c of row r stored at chunk
//   c ^ (r % 8).
// - The four quad pairs of a warp take different query rows and the same keys: a warp instruction
//   is 32 rows x 8 keys x 4. The hardware row t of quad pair qp is the warp's query row
//   (t % 4) + 4 * (qp % 2) + 8 * (t / 4) + 16 * (qp / 2). A quarter warp (lanes 8j..8j+7: two
//   quad pairs, t = 0..3 or 4..7) then reads 8 consecutive rows, all 8 bank groups. The natural
//   order, row 8 * qp + t, puts rows r and r + 8 in one quarter warp: 2-way conflicts on every Q
//   load, and 16-way ones without the swizzle.
// - K fragments: a quarter warp reads keys t = 0..3 (or 4..7) of an n8 tile, each twice
//   (two quad pairs): a broadcast over 4 distinct rows, again conflict-free.
// - V fragments (B row-major): the k4 steps of an n8 key tile take keys {0, 1, 4, 5} and
//   {2, 3, 6, 7} (the columns a C fragment lane holds, so P needs one exchange between lanes
//   lane and lane ^ 2 instead of a trip through shared memory), and output column n of d-tile
//   2dp + a is dimension 16dp + 8 * (n / 4) + 4a + n % 4, so one 16-byte load gives a lane its
//   B fragments of two d-tiles; a quarter warp reads keys {0, 1, 4, 5} or {2, 3, 6, 7}: four
//   rows with distinct (row % 8), broadcast twice.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/attention/prefill_sm75_traits.h"

namespace ftengine::kernels::cuda {

struct Sm70 : RegisterRoundTripCopy {
  static constexpr int kMinCudaArch = 700;           // mma.m8n8k4
  static constexpr int kMaxSharedBytes = 96 * 1024;  // per block, opted in

  static __device__ __forceinline__ uint32_t shared_address(const void* pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
  }

  static __device__ __forceinline__ void load_shared_16(uint32_t (&r)[4], uint32_t shared) {
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared));
  }

  // d += a * b for the four 8x8x4 products of the quad pairs; B column-major (Q·Kᵀ).
  static __device__ __forceinline__ void mma_884_row_col(float (&d)[8], uint32_t a0, uint32_t a1,
                                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m8n8k4.row.col.f32.f16.f16.f32 {%0, %1, %2, %3, %4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11}, {%0, %1, %2, %3, %4, %5, %6, %7};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7])
        : "r"(a0), "r"(a1), "r"(b0), "r"(b1));
  }
  // The same with B row-major (P·V).
  static __device__ __forceinline__ void mma_884_row_row(float (&d)[8], uint32_t a0, uint32_t a1,
                                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m8n8k4.row.row.f32.f16.f16.f32 {%0, %1, %2, %3, %4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11}, {%0, %1, %2, %3, %4, %5, %6, %7};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7])
        : "r"(a0), "r"(a1), "r"(b0), "r"(b1));
  }

  static __device__ __forceinline__ uint32_t pack_half2(float low, float high) {
    const __half2 pair = __floats2half2_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
};

// 128 query rows (4 warps x 32) x 64 keys, K and V double-buffered: 32 + 64 KB at head_dim 128,
// all of Volta's 96 KB; one CTA of 4 warps per V100 SM then (two at head_dim 64).
template <int kHeadDim_>
struct PrefillSm70Traits
    : PrefillTileShape<__half, kHeadDim_, /*kBlockM=*/128, /*kBlockN=*/64, /*kStages=*/2> {
  using Arch = Sm70;
  static constexpr bool kM8n8k4 = true;  // the body of prefill_sm70_kernel.h

  static constexpr int kNumWarps = 4;
  static constexpr int kNumThreads = kNumWarps * 32;
  static constexpr int kLoadThreads = kNumThreads;  // every thread copies tiles
  static constexpr int kMinBlocksPerSm = 1;
  static constexpr bool kQInRegisters = PrefillSm70Traits::kHeadDim <= 64;
  static constexpr int kRowsPerWarp = PrefillSm70Traits::kBlockM / kNumWarps;
  static_assert(kRowsPerWarp == 32, "the four quad pairs of a warp cover 32 rows");
};

}  // namespace ftengine::kernels::cuda
