// The GPU sampler (sampling.h) in three launches per decode step:
//
//   1. repetition_penalty_kernel (rows x 65536-id slices; only when a history is given): each
//      block marks its slice's history ids in a shared-memory bitmap and penalises each distinct
//      id once, in place, as the CPU sampler does.
//   2. scan_kernel (rows x 4096-token slices): each block reduces its slice to its best
//      (score, id). The score is the logit for greedy rows and for rows that cut (the cut needs
//      the maximum), and logit + T * Gumbel noise for rows that draw from the whole vocabulary:
//      the Gumbel-max draw is that one pass, with no sum and no sort.
//   3. finish_kernel (one block per row): reduces the slices. A row with top-k / top-p finds its
//      cut by radix selection of the threshold logit, by count for top-k and by probability mass
//      for top-p (three passes of 11, 11 and 10 bits of the logit each, no sort), then draws
//      with Gumbel-max among the kept tokens.
//
// Tokens are ordered by (penalised) logit descending, then id ascending: the order of the CPU
// sampler's partial sort, so top-k keeps exactly k tokens and ties at the threshold keep the
// lowest ids. Masses are 64-bit fixed point, so sums are exact and do not depend on the order of
// atomics: a seed and a step give the same token on every run.
#include "kernels/cuda/sampling.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace ftengine::kernels::cuda {

namespace {

constexpr int kPenaltyThreads = 512;
constexpr int32_t kPenaltySliceIds = 1 << 16;  // an 8 KiB bitmap of seen ids per block

// Each thread owns 16 consecutive tokens of a chunk: four float4 loads in flight, and the
// Philox groups of four tokens never straddle two threads.
constexpr int kTokensPerThread = 16;
constexpr int kScanThreads = 256;
constexpr int32_t kScanSliceTokens = kScanThreads * kTokensPerThread;
constexpr int kFinishThreads = 1024;
constexpr int32_t kFinishChunkTokens = kFinishThreads * kTokensPerThread;

constexpr int kRadixBins = 2048;  // digits of 11, 11 and 10 bits of a 32-bit key
constexpr int kRadixPasses = 3;
constexpr int kBinsPerThread = kRadixBins / kFinishThreads;
static_assert(kRadixBins % kFinishThreads == 0, "bins are spread evenly over the threads");

// Fixed-point scale of a token's weight exp((logit - max) / T) <= 1: kMaxSamplingVocab tokens
// of weight 1 sum to 2^63. A weight below 2^-44 of the top token's rounds to 0 and is never
// drawn by a cut row; exp(-40) * 2^43 already rounds to 0, so the exp is skipped below that.
constexpr float kFixedScale = 0x1p43f;
constexpr float kMinScaledLogit = -40.f;

static_assert(static_cast<double>(kMaxSamplingVocab) * kFixedScale <= 0x1p63,
              "fixed-point masses of a whole row must fit 64 bits");

enum class RowMode : int { kGreedy, kSampleAll, kSampleCut };

struct RowConfig {
  RowMode mode;
  float temperature;
  float inverse_temperature;
  int32_t top_k;
  float top_p;
  uint64_t seed;
  uint64_t step;
};

__device__ RowConfig row_config(const SamplingParams& p, int32_t row) {
  RowConfig c;
  c.temperature = p.temperature ? p.temperature[row] : 0.f;
  c.top_k = p.top_k ? p.top_k[row] : 0;
  c.top_p = p.top_p ? p.top_p[row] : 1.f;
  c.seed = p.seeds ? p.seeds[row] : 0;
  c.step = p.steps ? static_cast<uint64_t>(p.steps[row]) : 0;
  c.inverse_temperature = 1.f / c.temperature;
  // A temperature whose inverse overflows leaves the top token alone with any weight, as the
  // CPU sampler's double-precision weights do; top-k 1 keeps the top token alone too.
  const bool greedy =
      !(c.temperature > 0.f) || isinf(c.inverse_temperature) || c.top_k == 1;
  const bool cut = (c.top_k > 0 && c.top_k < p.vocab) || c.top_p < 1.f;
  c.mode = greedy ? RowMode::kGreedy : cut ? RowMode::kSampleCut : RowMode::kSampleAll;
  return c;
}

// NaN logits (a broken model) never win and are never drawn.
__device__ __forceinline__ float sanitised(float logit) { return isnan(logit) ? -INFINITY : logit; }

// Loads tokens [first, first + kTokensPerThread) of a row, sanitised; past the vocabulary: -inf.
__device__ __forceinline__ void load_tokens(const float* row, int32_t vocab, bool aligned,
                                            int32_t first, float (&x)[kTokensPerThread]) {
  if (aligned && first + kTokensPerThread <= vocab) {
    const float4* vectors = reinterpret_cast<const float4*>(row + first);
#pragma unroll
    for (int q = 0; q < kTokensPerThread / 4; ++q) {
      const float4 v = __ldg(vectors + q);
      x[4 * q] = v.x;
      x[4 * q + 1] = v.y;
      x[4 * q + 2] = v.z;
      x[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int t = 0; t < kTokensPerThread; ++t) {
      x[t] = first + t < vocab ? __ldg(row + first + t) : -INFINITY;
    }
  }
#pragma unroll
  for (int t = 0; t < kTokensPerThread; ++t) x[t] = sanitised(x[t]);
}

// An unsigned key with the order of the logit (-0 ties with +0). -inf maps to 0x007fffff; no
// sanitised logit maps to 0, which therefore stands for "no threshold".
__device__ __forceinline__ uint32_t order_key(float logit) {
  uint32_t bits = __float_as_uint(logit);
  if (bits == 0x80000000u) bits = 0;
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

__device__ __forceinline__ float logit_of_key(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? key & 0x7fffffffu : ~key);
}

// Fixed-point weight of a token; equal logits get equal weights, higher logits no lower ones.
__device__ __forceinline__ unsigned long long fixed_weight(float logit, float max_logit,
                                                           float inverse_temperature) {
  const float scaled = (logit - max_logit) * inverse_temperature;
  if (!(scaled > kMinScaledLogit)) return 0;
  return __float2ull_rn(expf(scaled) * kFixedScale);
}

// Philox4x32-10 (Salmon et al., SC'11), the generator of curand's Philox, without its state.
__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, counter.x);
    const uint32_t lo0 = 0xD2511F53u * counter.x;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, counter.z);
    const uint32_t lo1 = 0xCD9E8D57u * counter.z;
    counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
    key.x += 0x9E3779B9u;
    key.y += 0xBB67AE85u;
  }
  return counter;
}

// Random bits of tokens [4 * group, 4 * group + 4) of a row at a step. The noise of a token
// depends on (seed, step, id) alone, so the whole-vocabulary draw (scan_kernel) and the cut draw
// (finish_kernel) agree: a cut that keeps every token draws the same token.
__device__ __forceinline__ uint4 token_noise_bits(uint64_t seed, uint64_t step, uint32_t group) {
  return philox4x32_10(
      make_uint4(group, 0u, static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32)),
      make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)));
}

// Gumbel noise -log(E), E = -log(u) exponential. E goes through log1p of v = 1 - u, which keeps
// the precision of the largest noise values (small E), the ones that decide rare draws: the
// noise reaches 22.9, so a token weighing under ~1e-11 of the top one is never drawn.
__device__ __forceinline__ float gumbel(uint32_t bits) {
  const float v = fminf((static_cast<float>(bits) + 0.5f) * 0x1p-32f, 0x1.fffffep-1f);
  return -logf(-log1pf(-v));
}

struct Best {
  float score;
  int32_t id;
};

// The higher score; on a tie the lower id, as torch.argmax and the CPU sampler pick.
struct PreferBest {
  __device__ __forceinline__ Best operator()(const Best& a, const Best& b) const {
    return (a.score > b.score || (a.score == b.score && a.id < b.id)) ? a : b;
  }
};

__device__ __forceinline__ Best no_best() { return {-INFINITY, INT_MAX}; }

__device__ __forceinline__ const float* row_logits(const SamplingParams& p, int32_t row) {
  return p.logits + static_cast<int64_t>(row) * p.logits_row_stride;
}

__device__ __forceinline__ bool is_aligned16(const float* pointer) {
  return (reinterpret_cast<uintptr_t>(pointer) & 15u) == 0;
}

__global__ void __launch_bounds__(kPenaltyThreads) repetition_penalty_kernel(SamplingParams p) {
  const int32_t row = blockIdx.x;
  const float penalty = p.repetition_penalty[row];
  if (penalty == 1.f) return;

  __shared__ uint32_t seen[kPenaltySliceIds / 32];
  for (int word = threadIdx.x; word < kPenaltySliceIds / 32; word += kPenaltyThreads) {
    seen[word] = 0;
  }
  __syncthreads();

  const int32_t first_id = static_cast<int32_t>(blockIdx.y) * kPenaltySliceIds;
  const int32_t end_id = min(first_id + kPenaltySliceIds, p.vocab);
  float* logits = p.logits + static_cast<int64_t>(row) * p.logits_row_stride;
  const int32_t end = p.history_offsets[row + 1];
  for (int32_t i = p.history_offsets[row] + threadIdx.x; i < end; i += kPenaltyThreads) {
    const int32_t id = p.history[i];
    if (id < first_id || id >= end_id) continue;
    // The first occurrence to set the bit penalises the id; the others leave it alone.
    const uint32_t bit = 1u << (id & 31);
    if (atomicOr(&seen[(id - first_id) >> 5], bit) & bit) continue;
    const float logit = logits[id];
    logits[id] = logit < 0.f ? __fmul_rn(logit, penalty) : __fdiv_rn(logit, penalty);
  }
}

__global__ void __launch_bounds__(kScanThreads) scan_kernel(SamplingParams p, Best* partials) {
  using Reduce = cub::BlockReduce<Best, kScanThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;

  const int32_t row = blockIdx.x;
  const RowConfig config = row_config(p, row);
  const float* logits = row_logits(p, row);
  const int32_t first = static_cast<int32_t>(blockIdx.y) * kScanSliceTokens +
                        static_cast<int32_t>(threadIdx.x) * kTokensPerThread;
  float x[kTokensPerThread];
  load_tokens(logits, p.vocab, is_aligned16(logits), first, x);

  Best best = no_best();
  const PreferBest prefer;
  if (config.mode == RowMode::kSampleAll) {
#pragma unroll
    for (int q = 0; q < kTokensPerThread / 4; ++q) {
      if (first + 4 * q >= p.vocab) break;
      const uint4 bits = token_noise_bits(config.seed, config.step, (first >> 2) + q);
      const uint32_t word[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int32_t id = first + 4 * q + j;
        const float score = fmaf(config.temperature, gumbel(word[j]), x[4 * q + j]);
        if (id < p.vocab) best = prefer(best, Best{score, id});
      }
    }
  } else {
#pragma unroll
    for (int t = 0; t < kTokensPerThread; ++t) {
      if (first + t < p.vocab) best = prefer(best, Best{x[t], first + t});
    }
  }
  best = Reduce(reduce_storage).Reduce(best, prefer);
  if (threadIdx.x == 0) partials[static_cast<int64_t>(row) * gridDim.y + blockIdx.y] = best;
}

using FinishReduce = cub::BlockReduce<Best, kFinishThreads>;
using FinishScan = cub::BlockScan<unsigned long long, kFinishThreads>;
using RankScan = cub::BlockScan<uint32_t, kFinishThreads>;

struct FinishShared {
  uint32_t counts[kRadixBins];
  unsigned long long masses[kRadixBins];
  union {
    typename FinishReduce::TempStorage reduce;
    typename FinishScan::TempStorage scan;
    typename RankScan::TempStorage rank;
  } temp;
  Best best;
  // The bin a select pass settles on, written by the one thread whose bins hold the target.
  uint32_t bin;
  unsigned long long above;   // units in higher bins (of the tokens still in play)
  unsigned long long in_bin;  // units in the bin
};

// One row of a cut, as finish_kernel sees it.
struct RowView {
  const float* logits;
  int32_t vocab;
  bool aligned;
  float max_logit;
  float inverse_temperature;

  __device__ __forceinline__ unsigned long long weight(float logit) const {
    return fixed_weight(logit, max_logit, inverse_temperature);
  }
};

// A prefix of the order (logit descending, id ascending): every token of key > `key`, and the
// first `keep_equal` by id of the `equal_count` tokens of key == `key`. Key 0 (no token's) keeps
// every token with a weight.
struct Cut {
  uint32_t key;
  uint32_t keep_equal;
  uint32_t equal_count;
};

enum class SelectBy : int { kCount, kMass };

// The shortest prefix of the order whose tokens (those of non-zero weight, within `within` when
// restricted) hold `top_k` tokens (kCount) or top_p of their mass (kMass): a radix selection of
// the threshold key, most significant digit first, over histograms in shared memory.
template <SelectBy kBy>
__device__ Cut select_cut(const RowView& row, const RowConfig& config, bool restricted,
                          const Cut& within, FinishShared& sh) {
  const int tid = threadIdx.x;
  // The tokens of the `within` cut's threshold key it keeps (all of one weight) enter as one
  // lump: which of them come first by id only matters to the draw.
  const unsigned long long within_lump =
      restricted ? within.keep_equal * row.weight(logit_of_key(within.key)) : 0;

  uint32_t prefix = 0;
  uint32_t prefix_mask = 0;
  unsigned long long remaining = kBy == SelectBy::kCount ? config.top_k : 0;
  unsigned long long in_bin = 0;
  for (int pass = 0; pass < kRadixPasses; ++pass) {
    const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
    const uint32_t digit_mask = pass == 2 ? 1023u : 2047u;
    for (int b = tid; b < kRadixBins; b += kFinishThreads) {
      if constexpr (kBy == SelectBy::kMass) {
        sh.masses[b] = 0;
      } else {
        sh.counts[b] = 0;
      }
    }
    __syncthreads();
    if (restricted && tid == 0 && (within.key & prefix_mask) == prefix) {
      atomicAdd(&sh.masses[(within.key >> shift) & digit_mask], within_lump);
    }
    for (int32_t chunk = 0; chunk < row.vocab; chunk += kFinishChunkTokens) {
      float x[kTokensPerThread];
      load_tokens(row.logits, row.vocab, row.aligned, chunk + tid * kTokensPerThread, x);
#pragma unroll
      for (int t = 0; t < kTokensPerThread; ++t) {
        const uint32_t key = order_key(x[t]);
        if ((key & prefix_mask) != prefix) continue;
        if (restricted && key <= within.key) continue;
        const unsigned long long weight = row.weight(x[t]);
        if (weight == 0) continue;
        const uint32_t bin = (key >> shift) & digit_mask;
        if constexpr (kBy == SelectBy::kMass) {
          atomicAdd(&sh.masses[bin], weight);
        } else {
          atomicAdd(&sh.counts[bin], 1u);
        }
      }
    }
    __syncthreads();

    // Sums over the bins from the top down: thread t holds the t-th run of kBinsPerThread.
    unsigned long long units[kBinsPerThread];
    unsigned long long units_above[kBinsPerThread];
    unsigned long long total;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      const int bin = kRadixBins - 1 - (kBinsPerThread * tid + j);
      if constexpr (kBy == SelectBy::kMass) {
        units[j] = sh.masses[bin];
      } else {
        units[j] = sh.counts[bin];
      }
    }
    FinishScan(sh.temp.scan).ExclusiveSum(units, units_above, total);
    if (pass == 0) {
      if constexpr (kBy == SelectBy::kCount) {
        if (total <= remaining) return Cut{0, 0, 0};  // top_k holds every token with a weight
      } else {
        // Keep the smallest prefix whose mass reaches top_p of the total, as the CPU sampler's
        // `kept_mass >= top_p * total`; always at least one token.
        const double target = ceil(static_cast<double>(config.top_p) * static_cast<double>(total));
        remaining = target < 1.0 ? 1ull
                    : target >= static_cast<double>(total)
                        ? total
                        : static_cast<unsigned long long>(target);
      }
    }
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (units[j] != 0 && units_above[j] < remaining && remaining <= units_above[j] + units[j]) {
        sh.bin = static_cast<uint32_t>(kRadixBins - 1 - (kBinsPerThread * tid + j));
        sh.above = units_above[j];
        sh.in_bin = units[j];
      }
    }
    __syncthreads();
    remaining -= sh.above;
    in_bin = sh.in_bin;
    prefix |= sh.bin << shift;
    prefix_mask |= digit_mask << shift;
    __syncthreads();
  }

  if constexpr (kBy == SelectBy::kCount) {
    return Cut{prefix, static_cast<uint32_t>(remaining), static_cast<uint32_t>(in_bin)};
  } else {
    const unsigned long long weight = row.weight(logit_of_key(prefix));
    return Cut{prefix, static_cast<uint32_t>((remaining + weight - 1) / weight),
               static_cast<uint32_t>(in_bin / weight)};
  }
}

// Gumbel-max among the tokens a cut keeps, in one pass over the row; ranks among the tokens of
// the threshold key come from a block scan per chunk, in id order.
__device__ int32_t draw_within(const RowView& row, const Cut& cut, const RowConfig& config,
                               FinishShared& sh) {
  const int tid = threadIdx.x;
  const bool rank_equal = cut.keep_equal < cut.equal_count;
  const PreferBest prefer;
  uint32_t equal_in_earlier_chunks = 0;
  Best best = no_best();
  for (int32_t chunk = 0; chunk < row.vocab; chunk += kFinishChunkTokens) {
    const int32_t first = chunk + tid * kTokensPerThread;
    float x[kTokensPerThread];
    load_tokens(row.logits, row.vocab, row.aligned, first, x);
    uint32_t kept = 0;
    uint32_t equal = 0;
#pragma unroll
    for (int t = 0; t < kTokensPerThread; ++t) {
      if (first + t >= row.vocab) continue;
      const uint32_t key = order_key(x[t]);
      if (key > cut.key) {
        if (cut.key != 0 || row.weight(x[t]) != 0) kept |= 1u << t;
      } else if (key == cut.key) {
        equal |= 1u << t;
      }
    }
    if (rank_equal) {
      uint32_t rank;
      uint32_t chunk_equal;
      __syncthreads();
      RankScan(sh.temp.rank).ExclusiveSum(static_cast<uint32_t>(__popc(equal)), rank, chunk_equal);
      rank += equal_in_earlier_chunks;
      equal_in_earlier_chunks += chunk_equal;
      for (uint32_t rest = equal; rest != 0; rest &= rest - 1, ++rank) {
        if (rank < cut.keep_equal) kept |= rest & (~rest + 1);
      }
    } else {
      kept |= equal;
    }
#pragma unroll
    for (int q = 0; q < kTokensPerThread / 4; ++q) {
      if (((kept >> (4 * q)) & 15u) == 0) continue;
      const uint4 bits = token_noise_bits(config.seed, config.step, (first >> 2) + q);
      const uint32_t word[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if ((kept >> (4 * q + j)) & 1u) {
          const float score = fmaf(config.temperature, gumbel(word[j]), x[4 * q + j]);
          best = prefer(best, Best{score, first + 4 * q + j});
        }
      }
    }
  }
  __syncthreads();
  best = FinishReduce(sh.temp.reduce).Reduce(best, prefer);
  if (tid == 0) sh.best = best;
  __syncthreads();
  return sh.best.id;
}

__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(SamplingParams p, const Best* partials, int32_t splits) {
  __shared__ FinishShared sh;
  const int32_t row = blockIdx.x;
  const RowConfig config = row_config(p, row);

  const PreferBest prefer;
  Best best = no_best();
  for (int32_t s = threadIdx.x; s < splits; s += kFinishThreads) {
    best = prefer(best, partials[static_cast<int64_t>(row) * splits + s]);
  }
  best = FinishReduce(sh.temp.reduce).Reduce(best, prefer);
  if (threadIdx.x == 0) sh.best = best;
  __syncthreads();
  best = sh.best;

  int32_t token = best.id;
  // With an infinite maximum no weight is finite; the CPU sampler then returns its argmax too.
  if (config.mode == RowMode::kSampleCut && isfinite(best.score)) {
    const float* logits = row_logits(p, row);
    const RowView view{logits, p.vocab, is_aligned16(logits), best.score,
                       config.inverse_temperature};
    Cut cut{0, 0, 0};
    if (config.top_k > 0 && config.top_k < p.vocab) {
      cut = select_cut<SelectBy::kCount>(view, config, false, cut, sh);
    }
    if (config.top_p < 1.f) {
      // Top-p applies to the renormalised mass of the top-k tokens, as in transformers.
      cut = select_cut<SelectBy::kMass>(view, config, cut.key != 0, cut, sh);
    }
    token = draw_within(view, cut, config, sh);
  }
  if (threadIdx.x == 0) {
    p.out_ids[row] = token;
    if (p.advance_steps && p.steps) p.steps[row] = static_cast<int64_t>(config.step + 1);
  }
}

int32_t scan_splits(int32_t vocab) { return (vocab + kScanSliceTokens - 1) / kScanSliceTokens; }

void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("sampling: launching ") + kernel + " failed: " +
                             cudaGetErrorString(status));
  }
}

}  // namespace

std::string sampling_params_error(const SamplingParams& params) {
  if (params.rows < 0) return "rows must be >= 0";
  if (params.vocab < 1 || params.vocab > kMaxSamplingVocab) {
    return "vocab must be in [1, " + std::to_string(kMaxSamplingVocab) + "]";
  }
  if (params.logits_row_stride < params.vocab) return "logits_row_stride must be >= vocab";
  if ((params.history == nullptr) != (params.history_offsets == nullptr)) {
    return "history and history_offsets are given together or not at all";
  }
  if (params.rows > 0 && (params.logits == nullptr || params.out_ids == nullptr)) {
    return "logits and out_ids are required";
  }
  return {};
}

size_t sampling_workspace_bytes(int32_t rows, int32_t vocab) {
  if (rows <= 0 || vocab <= 0) return 0;
  return static_cast<size_t>(rows) * scan_splits(vocab) * sizeof(Best);
}

void run_sampling(const SamplingParams& params, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  const std::string error = sampling_params_error(params);
  if (!error.empty()) throw std::invalid_argument("sampling: " + error);
  if (params.rows == 0) return;
  const size_t needed = sampling_workspace_bytes(params.rows, params.vocab);
  if (workspace == nullptr || workspace_bytes < needed ||
      reinterpret_cast<uintptr_t>(workspace) % alignof(Best) != 0) {
    throw std::invalid_argument("sampling: the workspace needs " + std::to_string(needed) +
                                " bytes aligned to " + std::to_string(alignof(Best)));
  }
  Best* partials = static_cast<Best*>(workspace);
  const int32_t splits = scan_splits(params.vocab);

  if (params.repetition_penalty != nullptr && params.history != nullptr) {
    const dim3 grid(params.rows, (params.vocab + kPenaltySliceIds - 1) / kPenaltySliceIds);
    repetition_penalty_kernel<<<grid, kPenaltyThreads, 0, stream>>>(params);
    check_launch("repetition_penalty_kernel");
  }
  scan_kernel<<<dim3(params.rows, splits), kScanThreads, 0, stream>>>(params, partials);
  check_launch("scan_kernel");
  finish_kernel<<<params.rows, kFinishThreads, 0, stream>>>(params, partials, splits);
  check_launch("finish_kernel");
}

}  // namespace ftengine::kernels::cuda
