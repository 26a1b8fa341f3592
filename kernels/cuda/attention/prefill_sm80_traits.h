// Traits of the FastAttention prefill body (prefill_sm80_kernel.h): what an architecture brings
// (its tensor-core, shared-memory and async-copy instructions) and the tile shapes chosen for it.
// The Turing member (prefill_sm75_traits.h) brings another `Arch` struct with the same functions
// to the same body; the Volta member (prefill_sm70_traits.h) has m8n8k4 fragments and its own
// warp-level body.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention/prefill_tiles.h"

namespace ftengine::kernels::cuda {

// Ampere instructions, also the fastest non-wgmma path on Ada and Hopper. Fragment layouts are
// PTX's for mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"): lane = 4 * group + t;
// A holds rows {group, group + 8} x columns {2t, 2t + 1, 2t + 8, 2t + 9}; B holds k rows
// {2t, 2t + 1, 2t + 8, 2t + 9} of column `group`; C holds rows {group, group + 8} x columns
// {2t, 2t + 1}.
struct Sm80 {
  static constexpr int kMinCudaArch = 800;  // cp.async, mma.m16n8k16, bf16 tensor cores
  static constexpr int kMaxSharedBytes = 163 * 1024;  // per block on the A100, opted in

  static __device__ __forceinline__ uint32_t shared_address(const void* pointer) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
  }

  // 16-byte global -> shared copy that bypasses L1 (each K/V byte is read once per CTA). With
  // `valid` false nothing is read and the 16 bytes are zero-filled: rows past a sequence's end
  // come out as zeros, never as the NaN that uninitialised cache slots may hold.
  static __device__ __forceinline__ void cp_async_16(uint32_t shared, const void* global,
                                                     bool valid) {
    const int source_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(global),
                 "r"(source_bytes));
  }
  static __device__ __forceinline__ void cp_async_16(uint32_t shared, const void* global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(global));
  }
  static __device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
  }
  // Waits until at most `kPending` of this thread's committed groups are still in flight.
  template <int kPending>
  static __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
  }

  // Four 8x8 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
  static __device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t shared) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared));
  }
  static __device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t shared) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared));
  }

  // d += a * b with float32 accumulation.
  template <typename Element>
  static __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<Element, __half>) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
  }

  // Two floats rounded to the element type, `low` in the low half (the lower column of a
  // fragment pair).
  template <typename Element>
  static __device__ __forceinline__ uint32_t pack_pair(float low, float high) {
    if constexpr (std::is_same_v<Element, __half>) {
      const __half2 pair = __floats2half2_rn(low, high);
      return *reinterpret_cast<const uint32_t*>(&pair);
    } else {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
      return *reinterpret_cast<const uint32_t*>(&pair);
    }
  }
};

// Tiles for the mma.sync path. 128 query rows x 64 keys with 4 warps is the shape FlashAttention-2
// measured fastest on A100/H100 for head_dim 128 (sm80 path); each warp owns 32 rows, i.e. two
// m16 tiles, so every K/V fragment loaded with ldmatrix feeds two mma instructions — with one
// m16 tile per warp the shared-memory reads (128 B/clock/SM) would limit Hopper's mma.sync rate.
//
// Arch_, Element_ and kBlockN_ vary by member: PrefillSm80Traits below, PrefillSm75Traits in
// prefill_sm75_traits.h (64 KB of shared memory on Turing: 32-key tiles at head_dim 128).
template <typename Arch_, typename Element_, int kHeadDim_, int kBlockN_>
struct PrefillMmaTraits : PrefillTileShape<Element_, kHeadDim_, /*kBlockM=*/128, kBlockN_,
                                           /*kStages=*/2> {
  using Arch = Arch_;
  static_assert(std::is_same_v<Element_, __half> || std::is_same_v<Element_, __nv_bfloat16>);
  static constexpr bool kM8n8k4 = false;  // m16n8k16 fragments: the body of prefill_sm80_kernel.h

  static_assert(kBlockN_ % 32 == 0);
  static constexpr int kNumWarps = 4;
  static constexpr int kNumThreads = kNumWarps * 32;
  static constexpr int kLoadThreads = kNumThreads;  // every thread copies tiles
  // 96 KB of shared memory (head_dim 128) and <= 255 registers a thread: two CTAs per SM, so
  // one CTA's softmax overlaps the other's matrix products.
  static constexpr int kMinBlocksPerSm = 2;
  // Q fragments take kHeadDim / 2 registers a thread; with head_dim 128 they would not fit
  // beside the 128 output accumulators, so Q is re-read from shared memory with ldmatrix.
  static constexpr bool kQInRegisters = PrefillMmaTraits::kHeadDim <= 64;

  static constexpr int kRowsPerWarp = PrefillMmaTraits::kBlockM / kNumWarps;
  static constexpr int kMTilesPerWarp = kRowsPerWarp / 16;
  static_assert(kRowsPerWarp % 16 == 0);
};

template <typename Element, int kHeadDim>
using PrefillSm80Traits = PrefillMmaTraits<Sm80, Element, kHeadDim, 64>;

}  // namespace ftengine::kernels::cuda
