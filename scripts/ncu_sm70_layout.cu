// Probe for Nsight Compute (scripts/ncu_sm70_layout.sh runs it): what the Volta member's shared-
// memory layout (prefill_sm70_traits.h) saves in its 16-byte ld.shared fragment loads. The same
// body runs twice on one causal prefill case, once with the real tiles (16-byte chunk c of row r
// at chunk c ^ (r % 8)) and once with plain row-major tiles (chunk c at chunk c); ncu counts the
// shared-memory wavefronts and bank conflicts of each. The body compiles for sm_90 as it does for
// sm_70: mma.m8n8k4 is emulated there (slowly), but the ld.shared instructions, and so their
// bank conflicts, are the same ones.
//
// The probe checks that both layouts give bit-identical outputs (same arithmetic in the same
// order; only addresses differ) and spot-checks rows against a float64 reference, and exits
// non-zero otherwise.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda/attention/prefill_launch.h"

namespace ftengine::kernels::cuda {

// The "before" layout: row-major tiles without the XOR swizzle. The loader, the epilogue and the
// fragment base addresses all go through Traits::swizzle; the body then steps from those bases
// with XORs, which equal additions under this layout (tiles 1 KB aligned, rows of 2^k bytes):
// - Q, K: the base is row * kRowBytes (kRowBytes = 128 or 256), bits 4..7 zero, and kk * 16 for
//   kk < kHeadDim / 8 stays below kRowBytes, so base ^ (kk * 16) = base + 16 * kk = chunk kk.
// - V: the base is row * kRowBytes + 16 * high (high = 0 or 1), bits 5..7 zero, and dp * 32 for
//   dp < kHeadDim / 16 stays below kRowBytes, so base ^ (dp * 32) = base + 32 * dp = chunk
//   2 * dp + high, the chunk the swizzled layout reaches through (2dp + high) ^ (row % 8).
// - Steps of whole rows (n8 tiles, load passes, stages) are additions in both layouts.
template <int kHeadDim>
struct PrefillSm70NaiveTraits : PrefillSm70Traits<kHeadDim> {
  static __device__ __forceinline__ int swizzle(int row, int chunk) {
    return row * kHeadDim + chunk * 8;
  }
};

}  // namespace ftengine::kernels::cuda

namespace {

using namespace ftengine::kernels::cuda;

#define CHECK_CUDA(call)                                                               \
  do {                                                                                 \
    const cudaError_t error_ = (call);                                                 \
    if (error_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,               \
                   cudaGetErrorString(error_));                                        \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

// One sequence, MHA, causal: every query tile of the grid is busy and most KV tiles are full.
constexpr int kSeqLen = 1024;
constexpr int kNumHeads = 8;
constexpr int kBlockSize = 64;  // a multiple of kBlockN (64)
constexpr int kNumBlocks = kSeqLen / kBlockSize;

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, host.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

std::vector<__half> random_halves(size_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  std::vector<__half> values(count);
  for (__half& value : values) value = __float2half(uniform(rng));
  return values;
}

// Runs both layouts at one head_dim; returns whether their outputs agree with each other and
// with the reference.
template <int kHeadDim>
bool run_case() {
  const size_t token_elements = static_cast<size_t>(kNumHeads) * kHeadDim;
  std::mt19937 rng(kHeadDim);
  const std::vector<__half> q = random_halves(kSeqLen * token_elements, rng);
  const std::vector<__half> k_cache = random_halves(kSeqLen * token_elements, rng);
  const std::vector<__half> v_cache = random_halves(kSeqLen * token_elements, rng);
  // A shuffled table, as a cache that has served other sequences would hold.
  std::vector<int32_t> block_table(kNumBlocks);
  std::iota(block_table.begin(), block_table.end(), 0);
  std::shuffle(block_table.begin(), block_table.end(), rng);

  AttentionParams params;
  params.dtype = ElementType::kFloat16;
  params.q = to_device(q);
  params.q_token_stride = token_elements;
  params.q_head_stride = kHeadDim;
  params.out_token_stride = token_elements;
  params.out_head_stride = kHeadDim;
  params.k_cache = to_device(k_cache);
  params.v_cache = to_device(v_cache);
  params.kv_block_stride = kBlockSize * token_elements;
  params.kv_token_stride = token_elements;
  params.kv_head_stride = kHeadDim;
  params.block_size = kBlockSize;
  params.kv_num_blocks = kNumBlocks;
  params.block_table = to_device(block_table);
  params.block_table_stride = kNumBlocks;
  params.cu_seqlens_q = to_device(std::vector<int32_t>{0, kSeqLen});
  params.seqlens_kv = to_device(std::vector<int32_t>{kSeqLen});
  params.batch = 1;
  params.max_seqlen_q = kSeqLen;
  params.max_seqlen_kv = kSeqLen;
  params.num_heads = kNumHeads;
  params.num_kv_heads = kNumHeads;
  params.head_dim = kHeadDim;
  params.softmax_scale = 1.f / std::sqrt(static_cast<float>(kHeadDim));
  params.causal = true;

  const size_t out_elements = kSeqLen * token_elements;
  __half* out[2];
  for (__half*& buffer : out) CHECK_CUDA(cudaMalloc(&buffer, out_elements * sizeof(__half)));
  auto launch = [&](auto traits_tag, __half* destination) {
    using Traits = decltype(traits_tag);
    params.out = destination;
    launch_prefill<Traits, /*kCausal=*/true>(params, /*stream=*/0);
  };
  // The warm-up pair takes each kernel's first-launch costs (lazy module loading); the script
  // reads the counters of the second launch of each.
  for (int pass = 0; pass < 2; ++pass) {
    launch(PrefillSm70Traits<kHeadDim>{}, out[0]);
    launch(PrefillSm70NaiveTraits<kHeadDim>{}, out[1]);
  }
  CHECK_CUDA(cudaDeviceSynchronize());

  std::vector<__half> swizzled(out_elements), naive(out_elements);
  CHECK_CUDA(cudaMemcpy(swizzled.data(), out[0], out_elements * sizeof(__half),
                        cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(naive.data(), out[1], out_elements * sizeof(__half),
                        cudaMemcpyDeviceToHost));
  bool ok = true;
  float max_difference = 0.f;
  for (size_t i = 0; i < out_elements; ++i) {
    max_difference = std::fmax(max_difference, std::fabs(__half2float(swizzled[i]) -
                                                         __half2float(naive[i])));
  }
  if (std::memcmp(swizzled.data(), naive.data(), out_elements * sizeof(__half)) != 0) {
    std::fprintf(stderr,
                 "head_dim %d: the swizzled and naive layouts differ (max |diff| %g); they run "
                 "the same arithmetic, so one of them addresses the tiles wrongly\n",
                 kHeadDim, max_difference);
    ok = false;
  }

  // Float64 reference for a few (token, head) rows: short, block-crossing and long rows.
  // Tolerance: P is rounded to fp16 in the kernel, the output is fp16.
  float max_error = 0.f;
  for (const int token : {0, 1, 63, 64, 200, 777, kSeqLen - 1}) {
    for (const int head : {0, kNumHeads - 1}) {
      auto key_row = [&](const std::vector<__half>& cache, int key) {
        const int block = block_table[key / kBlockSize];
        return &cache[(static_cast<size_t>(block) * kBlockSize + key % kBlockSize) *
                          token_elements +
                      head * kHeadDim];
      };
      const __half* q_row = &q[token * token_elements + head * kHeadDim];
      std::vector<double> scores(token + 1);
      double max_score = -INFINITY;
      for (int key = 0; key <= token; ++key) {
        const __half* k_row = key_row(k_cache, key);
        double dot = 0;
        for (int d = 0; d < kHeadDim; ++d) dot += __half2float(q_row[d]) * __half2float(k_row[d]);
        scores[key] = dot * params.softmax_scale;
        max_score = std::fmax(max_score, scores[key]);
      }
      double sum = 0;
      for (double& score : scores) sum += (score = std::exp(score - max_score));
      for (int d = 0; d < kHeadDim; ++d) {
        double expected = 0;
        for (int key = 0; key <= token; ++key) {
          expected += scores[key] * __half2float(key_row(v_cache, key)[d]);
        }
        expected /= sum;
        const float got = __half2float(swizzled[token * token_elements + head * kHeadDim + d]);
        const float error = std::fabs(got - static_cast<float>(expected));
        max_error = std::fmax(max_error, error);
        if (!(error <= 2e-3f + 1e-2f * std::fabs(static_cast<float>(expected)))) ok = false;
      }
    }
  }
  std::printf("head_dim %3d: swizzled vs naive max |diff| %g (%s); vs float64 reference max "
              "|error| %g (%s)\n",
              kHeadDim, max_difference, max_difference == 0.f ? "bit-identical" : "DIFFERENT",
              max_error, ok ? "ok" : "FAILED");

  for (__half* buffer : out) CHECK_CUDA(cudaFree(buffer));
  CHECK_CUDA(cudaFree(const_cast<void*>(params.q)));
  CHECK_CUDA(cudaFree(const_cast<void*>(params.k_cache)));
  CHECK_CUDA(cudaFree(const_cast<void*>(params.v_cache)));
  CHECK_CUDA(cudaFree(const_cast<int32_t*>(params.block_table)));
  CHECK_CUDA(cudaFree(const_cast<int32_t*>(params.cu_seqlens_q)));
  CHECK_CUDA(cudaFree(const_cast<int32_t*>(params.seqlens_kv)));
  return ok;
}

}  // namespace

int main() {
  try {
    const bool ok128 = run_case<128>();
    const bool ok64 = run_case<64>();
    if (!ok128 || !ok64) {
      std::fprintf(stderr, "ncu_sm70_layout: FAILED\n");
      return 1;
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "ncu_sm70_layout: %s\n", error.what());
    return 2;
  }
  return 0;
}
