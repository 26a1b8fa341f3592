// Traits of the Hopper member of the FastAttention family (prefill_sm90_kernel.h): the sm_90a
// instructions it is built from (wgmma, TMA bulk tensor copies, mbarriers, setmaxnreg) and its
// tile shapes. The instructions are written as PTX, as the other members' are (PTX ISA 8.0+,
// "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions", "Tensor Copy").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention/prefill_sm80_traits.h"
#include "kernels/cuda/attention/prefill_tiles.h"

namespace ftengine::kernels::cuda {

// The accumulator operand lists of wgmma: m64nN with float32 accumulation gives each thread N / 2
// registers.
#define FTENGINE_WGMMA_D32                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FTENGINE_WGMMA_D64                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"
#define FTENGINE_WGMMA_ACC8(i)                                                             \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define FTENGINE_WGMMA_ACC32 \
  FTENGINE_WGMMA_ACC8(0), FTENGINE_WGMMA_ACC8(8), FTENGINE_WGMMA_ACC8(16), FTENGINE_WGMMA_ACC8(24)
#define FTENGINE_WGMMA_ACC64                                                              \
  FTENGINE_WGMMA_ACC32, FTENGINE_WGMMA_ACC8(32), FTENGINE_WGMMA_ACC8(40), FTENGINE_WGMMA_ACC8(48), \
      FTENGINE_WGMMA_ACC8(56)

// d (+)= A·B for one warpgroup, A and B both from shared memory (descriptors), K-major:
// S = Q·Kᵀ. scale_d 0 overwrites d.
#define FTENGINE_WGMMA_SS(TYPE)                                                            \
  asm volatile(                                                                            \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                          \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " FTENGINE_WGMMA_D64 \
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                    \
      : FTENGINE_WGMMA_ACC64                                                               \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))
// d += A·B for one warpgroup, A from registers (the mma.m16n8k16 A layout, per warp 16 rows), B
// from shared memory MN-major (transposed): O += P·V with V stored [key][dim]. The trailing
// "1, 1, 1, 1" are scale-d (accumulate: ptxas emits HGMMA ... R24 with it, "RZ, !UPT" for 0),
// scale-a, scale-b and trans-b.
#define FTENGINE_WGMMA_RS(N, TYPE, D_LIST, ACC, A_LIST, DESC)                         \
  asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " D_LIST \
               ", " A_LIST ", " DESC ", 1, 1, 1, 1;\n"                                   \
               : ACC                                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))

// Hopper's own instructions; Sm80's cp.async and pack_pair serve the prologue and the P fragments.
struct Sm90 : Sm80 {
  static constexpr int kMinCudaArch = 900;
  static constexpr int kMaxSharedBytes = 227 * 1024;  // per block on the H100, opted in

  // ---- mbarriers (shared-memory 64-bit barriers with an arrival count and a transaction count)
  static __device__ __forceinline__ void mbarrier_init(uint32_t barrier, int arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(arrivals));
  }
  // Makes the initialisations visible to the async proxy (TMA) before any thread uses them.
  static __device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  static __device__ __forceinline__ void mbarrier_arrive(uint32_t barrier) {
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(barrier)
                 : "memory");
  }
  // One arrival that also announces `bytes` of TMA transfers the phase must wait for.
  static __device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t barrier,
                                                                   uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                     barrier),
                 "r"(bytes)
                 : "memory");
  }
  // Waits until the phase of parity `phase` has completed.
  static __device__ __forceinline__ void mbarrier_wait(uint32_t barrier, int phase) {
    uint32_t done = 0;
    do {
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(barrier), "r"(phase)
          : "memory");
    } while (!done);
  }
  // Orders this thread's generic-proxy writes of shared memory (cp.async, st.shared) before
  // later async-proxy accesses (wgmma reads, TMA writes) of it.
  static __device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }

  // ---- TMA: a 4-D box of the tensor map into shared memory, completing on `barrier`.
  static __device__ __forceinline__ void tma_load_4d(uint32_t shared, const void* tensor_map,
                                                     uint32_t barrier, int c0, int c1, int c2,
                                                     int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(shared),
        "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(barrier), "r"(c0), "r"(c1), "r"(c2),
        "r"(c3)
        : "memory");
  }

  // ---- register budget of a warpgroup (the producer gives registers to the consumers)
  template <int kRegisters>
  static __device__ __forceinline__ void warpgroup_registers_decrease() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
  }
  template <int kRegisters>
  static __device__ __forceinline__ void warpgroup_registers_increase() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
  }

  // Named barrier of `threads` threads (one warpgroup: 128); id 0 is __syncthreads'. arrive
  // counts this thread without waiting.
  static __device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
  }
  static __device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
  }

  // ---- wgmma
  // Descriptor of a 128-byte-swizzled operand in shared memory (PTX "Matrix Descriptor Format"):
  // start address, leading and stride byte offsets (16-byte units), swizzle mode 1 (128 B). The
  // swizzle pattern repeats every 1024 bytes from 1 KB-aligned tiles, so the base offset is 0.
  static __device__ __forceinline__ uint64_t smem_descriptor(uint32_t address,
                                                             uint32_t leading_bytes,
                                                             uint32_t stride_bytes) {
    return static_cast<uint64_t>((address & 0x3FFFF) >> 4) |
           (static_cast<uint64_t>(leading_bytes >> 4) << 16) |
           (static_cast<uint64_t>(stride_bytes >> 4) << 32) | (1ull << 62);
  }
  // Before the first wgmma of a batch: register and shared-memory writes are visible to it.
  static __device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  }
  static __device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  }
  template <int kPending>
  static __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
  }
  // Keeps the compiler from moving reads or writes of accumulators across wgmma's asynchrony.
  template <int kCount>
  static __device__ __forceinline__ void fence_registers(float (&r)[kCount]) {
#pragma unroll
    for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(r[i])::"memory");
  }

  // S (+)= Q·Kᵀ: m64 n128 k16, both operands K-major in shared memory.
  template <typename Element>
  static __device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a,
                                                             uint64_t desc_b, int scale_d) {
    if constexpr (std::is_same_v<Element, __half>) {
      FTENGINE_WGMMA_SS("f16");
    } else {
      FTENGINE_WGMMA_SS("bf16");
    }
  }
  // O += P·V: m64 nN k16, P from registers, V MN-major in shared memory; N = head_dim.
  template <typename Element, int N>
  static __device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4],
                                                  uint64_t desc_b) {
    static_assert(N == 64 || N == 128);
    if constexpr (N == 128) {
      if constexpr (std::is_same_v<Element, __half>) {
        FTENGINE_WGMMA_RS(128, "f16", FTENGINE_WGMMA_D64, FTENGINE_WGMMA_ACC64,
                          "{%64, %65, %66, %67}", "%68");
      } else {
        FTENGINE_WGMMA_RS(128, "bf16", FTENGINE_WGMMA_D64, FTENGINE_WGMMA_ACC64,
                          "{%64, %65, %66, %67}", "%68");
      }
    } else {
      if constexpr (std::is_same_v<Element, __half>) {
        FTENGINE_WGMMA_RS(64, "f16", FTENGINE_WGMMA_D32, FTENGINE_WGMMA_ACC32,
                          "{%32, %33, %34, %35}", "%36");
      } else {
        FTENGINE_WGMMA_RS(64, "bf16", FTENGINE_WGMMA_D32, FTENGINE_WGMMA_ACC32,
                          "{%32, %33, %34, %35}", "%36");
      }
    }
  }
};

#undef FTENGINE_WGMMA_SS
#undef FTENGINE_WGMMA_RS
#undef FTENGINE_WGMMA_ACC64
#undef FTENGINE_WGMMA_ACC32
#undef FTENGINE_WGMMA_ACC8
#undef FTENGINE_WGMMA_D64
#undef FTENGINE_WGMMA_D32

// Tiles of the Hopper member, after FlashAttention-3's for head_dim 64 / 128: 128 query rows x
// 128 keys, three warpgroups: one producer (TMA, and the prologue's cp.async) and two consumers of
// 64 rows each (wgmma's M). K and V double-buffered: 160 KB of shared memory at head_dim 128, one
// CTA per SM.
//
// Shared-memory tiles are stored in 64-column panels, [panel][row][64], the 16-byte chunks of a
// row XOR-ed with row % 8: wgmma's canonical 128-byte-swizzled K-major layout (rows 128 bytes
// apart, 1 KB swizzle atoms of 8 rows), which is also what a TMA box of 64 columns with
// CU_TENSOR_MAP_SWIZZLE_128B writes. For V the same bytes are the MN-major (transposed) layout.
template <typename Element_, int kHeadDim_>
struct PrefillSm90Traits : PrefillTileShape<Element_, kHeadDim_, /*kBlockM=*/128, /*kBlockN=*/128,
                                            /*kStages=*/2> {
  using Shape = PrefillTileShape<Element_, kHeadDim_, 128, 128, 2>;
  using Arch = Sm90;
  // The mbarriers live after the tiles, in the dynamic shared memory: with no static shared
  // memory the tiles start at the window's base, 1 KB aligned.
  static constexpr int kBarrierOffset = Shape::kSharedBytes;
  static constexpr int kNumBarriers = 9;
  static constexpr int kSharedBytes = Shape::kSharedBytes + kNumBarriers * 8;
  static_assert(std::is_same_v<Element_, __half> || std::is_same_v<Element_, __nv_bfloat16>);
  static constexpr bool kM8n8k4 = false;

  static constexpr int kNumConsumerWarpgroups = 2;
  static constexpr int kNumConsumerThreads = 128 * kNumConsumerWarpgroups;
  static constexpr int kNumThreads = 128 + kNumConsumerThreads;
  static constexpr int kMinBlocksPerSm = 1;
  // setmaxnreg budgets: 128 x 40 + 256 x 232 = 64512 of the SM's 65536 registers.
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
  // ptxas gives each of the 384 threads 168 registers at launch (65536 / 384, rounded down to a
  // multiple of 8); the consumers' setmaxnreg.inc retries until the producer has given its
  // share back, so budgets beyond the launch pool would hang every CTA.
  static_assert(128 * kProducerRegisters + kNumConsumerThreads * kConsumerRegisters <=
                (65536 / kNumThreads / 8 * 8) * kNumThreads);
  // Named barriers: 1 + w for consumer warpgroup w's epilogue; kSchedulerBarrier + w orders the
  // matrix products of the two consumers (FlashAttention-3's ping-pong): they take turns
  // issuing, so one's softmax runs while the other's wgmmas have the tensor cores.
  static constexpr int kSchedulerBarrier = 3;

  // The loader of prefill_tiles.h runs in the producer warpgroup only.
  static constexpr int kLoadThreads = 128;
  static constexpr int kPanelColumns = 64;
  static constexpr int kRowPitchBytes = kPanelColumns * static_cast<int>(sizeof(Element_));
  static constexpr int kRowsPerTile = PrefillSm90Traits::kBlockN;
  static_assert(PrefillSm90Traits::kBlockM == kRowsPerTile, "Q and K/V tiles share one layout");
  static constexpr uint32_t kPanelBytes = kRowsPerTile * kRowPitchBytes;
  static constexpr int kPanels = kHeadDim_ / kPanelColumns;
  // Slots of one TMA box: a KV tile is kBlockN / kTmaSlots boxes, each inside one cache block,
  // so the cache's block size must be a multiple of this (as the sm80 member's 64-key tile).
  static constexpr int kTmaSlots = 64;

  // Element offset of 16-byte chunk `chunk` (8 elements) of row `row` in a tile.
  static __device__ __forceinline__ int swizzle(int row, int chunk) {
    return (chunk / 8) * (kRowsPerTile * kPanelColumns) + row * kPanelColumns +
           (((chunk % 8) ^ (row & 7)) << 3);
  }
};

}  // namespace ftengine::kernels::cuda
