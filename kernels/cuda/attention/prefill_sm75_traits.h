// Traits of the Turing member (T4, RTX 20xx): the sm80 body (prefill_sm80_kernel.h) over Turing's
// instructions. Turing has ldmatrix and mma.m16n8k8 but no cp.async and no bf16 tensor cores,
// and at most 64 KB of shared memory per block.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/attention/prefill_sm80_traits.h"

namespace ftengine::kernels::cuda {

// Global -> shared copies without cp.async (Turing, Volta): a 16-byte load into registers and a
// 16-byte store. The loads are non-volatile and read another state space than the stores, so
// ptxas issues a whole tile's loads before the first store: a warp waits one global latency per
// tile, which the other resident warps cover, and the body's second shared-memory stage (written
// while the first is read) is what double-buffers the tiles. `wait` has nothing to wait for:
// the stores are done when the thread reaches the body's barrier.
struct RegisterRoundTripCopy {
  // With `valid` false the 16 bytes are zeros (rows past a sequence's end), as with cp.async's
  // zero-fill; `global` is still a readable address then (the body passes the tensor's base).
  static __device__ __forceinline__ void cp_async_16(uint32_t shared, const void* global,
                                                     bool valid) {
    uint32_t x, y, z, w;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        : "=r"(x), "=r"(y), "=r"(z), "=r"(w)
        : "l"(global));
    if (!valid) x = y = z = w = 0u;
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(shared), "r"(x), "r"(y),
                 "r"(z), "r"(w)
                 : "memory");
  }
  static __device__ __forceinline__ void cp_async_16(uint32_t shared, const void* global) {
    cp_async_16(shared, global, true);
  }
  static __device__ __forceinline__ void cp_async_commit() {}
  template <int kPending>
  static __device__ __forceinline__ void cp_async_wait() {}
};

// ldmatrix, pack_pair and ex2.approx are Turing instructions too; the copies and the matrix
// product are not.
struct Sm75 : Sm80 {
  static constexpr int kMinCudaArch = 750;  // ldmatrix, mma.m16n8k8
  static constexpr int kMaxSharedBytes = 64 * 1024;  // per block, opted in

  static __device__ __forceinline__ void cp_async_16(uint32_t shared, const void* global,
                                                     bool valid) {
    RegisterRoundTripCopy::cp_async_16(shared, global, valid);
  }
  static __device__ __forceinline__ void cp_async_16(uint32_t shared, const void* global) {
    RegisterRoundTripCopy::cp_async_16(shared, global);
  }
  static __device__ __forceinline__ void cp_async_commit() {}
  template <int kPending>
  static __device__ __forceinline__ void cp_async_wait() {}

  // One k16 step as two m16n8k8 (fp16 only): the m16n8k16 A fragment's registers {a0, a1} are
  // the m16n8k8 fragment of columns 0-7 and {a2, a3} that of columns 8-15; b0 / b1 likewise
  // (PTX ISA, "Matrix Fragments for mma.m16n8k8").
  template <typename Element>
  static __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
    static_assert(std::is_same_v<Element, __half>, "Turing tensor cores have no bf16");
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
  }
};

// 128 query rows as on sm80 (4 warps of two m16 tiles); KV tiles of 64 keys at head_dim 64
// (16 + 32 KB of shared memory) and of 32 keys at head_dim 128 (32 + 32 KB: exactly Turing's
// 64 KB per block).
template <int kHeadDim>
using PrefillSm75Traits = PrefillMmaTraits<Sm75, __half, kHeadDim, kHeadDim == 128 ? 32 : 64>;

}  // namespace ftengine::kernels::cuda
