#include "kernels/cpu/attention_kv16.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/attention_merge.h"
#include "kernels/cpu/bfloat16.h"
#include "kernels/cpu/exp2.h"

namespace ftengine::kernels::cpu {
namespace {

// Floats of K (and of V) widened at a time: a chunk of keys of the item's heads, in L2.
constexpr int32_t kChunkFloats = 65536;
constexpr int32_t kMaxChunkKeys = 64;
// Query rows (tokens × query heads) one work item carries; more go to further items.
constexpr int32_t kMaxRows = kKv16MaxQueryGroup;
constexpr int32_t kMaxHeadDim = 256;
// A split is worth its merge only above this many keys.
constexpr int64_t kMinSplitKeys = 512;

template <Kv16Type kType>
inline void widen(const uint16_t* source, float* destination, int32_t count) {
#pragma omp simd
  for (int32_t i = 0; i < count; ++i) {
    destination[i] = kType == Kv16Type::kBFloat16 ? bf16_to_float(source[i])
                                                  : float16_to_float(source[i]);
  }
}

// One unit of parallel work: query tokens [first_token, first_token + tokens) of a sequence,
// the query heads of KV heads [first_kv_head, first_kv_head + kv_heads), against the keys of
// one split. An item takes as many adjacent KV heads as its rows allow: a token's K (or V)
// row of those heads is one contiguous read, where one head alone would read a few hundred
// bytes per token with a page-sized stride, which the CPU's prefetchers do not follow.
struct WorkItem {
  int32_t seq;
  int32_t first_kv_head;
  int32_t kv_heads;
  int32_t first_token;
  int32_t tokens;
  int32_t split;
};

class Kv16Attention {
 public:
  explicit Kv16Attention(const Kv16AttentionParams& p)
      : p_(p), group_(p.num_heads / p.num_kv_heads) {}

  void run() {
    const int threads = p_.num_threads > 0 ? p_.num_threads : omp_get_max_threads();
    const int64_t tokens = p_.cu_seqlens_q[p_.batch];
    const int64_t rows = tokens * p_.num_heads;
    std::vector<WorkItem> items = plan(threads);
    // Every split writes a whole [token][head][dim] partial: splits a sequence does not use
    // (shorter than the longest) stay -inf and the merge skips them.
    const int64_t partial_floats = rows * p_.head_dim;
    std::vector<float> partial_out(static_cast<size_t>(partial_floats) * splits_);
    std::vector<float> partial_lse(static_cast<size_t>(rows) * splits_, kNegInf);

#pragma omp parallel num_threads(threads)
    {
      std::vector<float> scratch(scratch_floats());
#pragma omp for schedule(dynamic, 1)
      for (size_t i = 0; i < items.size(); ++i) {
        const WorkItem& item = items[i];
        float* out = partial_out.data() + item.split * partial_floats;
        float* lse = partial_lse.data() + item.split * rows;
        if (p_.kv_type == Kv16Type::kBFloat16) {
          attend<Kv16Type::kBFloat16>(item, scratch.data(), out, lse);
        } else {
          attend<Kv16Type::kFloat16>(item, scratch.data(), out, lse);
        }
      }
    }
    std::vector<const float*> outs(splits_), lses(splits_);
    for (int s = 0; s < splits_; ++s) {
      outs[s] = partial_out.data() + s * partial_floats;
      lses[s] = partial_lse.data() + s * rows;
    }
    merge_attention_partials(outs.data(), lses.data(), splits_, rows, p_.head_dim, p_.out,
                             p_.lse);
  }

 private:
  // Splits the keys so that every thread has a few items to balance over, but no split is
  // shorter than kMinSplitKeys.
  std::vector<WorkItem> plan(int threads) {
    // Row groups (items per split) of every sequence: tokens and KV heads per item.
    std::vector<WorkItem> groups;
    int64_t longest = 0;
    for (int32_t seq = 0; seq < p_.batch; ++seq) {
      longest = std::max<int64_t>(longest, p_.seqlens_kv[seq]);
      const int32_t q_len = p_.cu_seqlens_q[seq + 1] - p_.cu_seqlens_q[seq];
      const int32_t tokens = std::max(1, std::min(q_len, kMaxRows / group_));
      const int32_t kv_heads = std::max(1, std::min(p_.num_kv_heads, kMaxRows / (tokens * group_)));
      for (int32_t token = 0; token < q_len; token += tokens) {
        for (int32_t head = 0; head < p_.num_kv_heads; head += kv_heads) {
          groups.push_back({seq, head, std::min(kv_heads, p_.num_kv_heads - head), token,
                            std::min(tokens, q_len - token), 0});
        }
      }
    }
    const int64_t count = std::max<int64_t>(static_cast<int64_t>(groups.size()), 1);
    const int64_t wanted = (4 * int64_t{threads} + count - 1) / count;
    splits_ = static_cast<int>(
        std::max<int64_t>(1, std::min(wanted, (longest + kMinSplitKeys - 1) / kMinSplitKeys)));
    std::vector<WorkItem> items;
    for (const WorkItem& group : groups) {
      for (int32_t split = 0; split < splits_; ++split) {
        items.push_back(group);
        items.back().split = split;
      }
    }
    return items;
  }

  size_t scratch_floats() const {
    // Queries, accumulators, K and V chunks, scores, running max and sum.
    return static_cast<size_t>(2 * kMaxRows * p_.head_dim + 2 * kChunkFloats +
                               kMaxRows * kMaxChunkKeys + 2 * kMaxRows);
  }

  template <Kv16Type kType>
  void attend(const WorkItem& item, float* scratch, float* partial_out,
              float* partial_lse) const {
    const int32_t dim = p_.head_dim;
    const int32_t heads = item.kv_heads * group_;  // query heads of the item
    const int32_t rows = item.tokens * heads;      // row = token * heads + head
    const int32_t span = item.kv_heads * dim;      // floats of one key row of the item's heads
    const int32_t chunk_keys = std::max(1, std::min(kMaxChunkKeys, kChunkFloats / span));
    float* const q = scratch;
    float* const acc = q + kMaxRows * dim;
    float* const keys = acc + kMaxRows * dim;
    float* const values = keys + kChunkFloats;
    float* const scores = values + kChunkFloats;
    float* const row_max = scores + kMaxRows * kMaxChunkKeys;
    float* const row_sum = row_max + kMaxRows;

    const int32_t q_start = p_.cu_seqlens_q[item.seq];
    const int32_t q_len = p_.cu_seqlens_q[item.seq + 1] - q_start;
    const int32_t kv_len = p_.seqlens_kv[item.seq];
    // This split's keys: equal slices of the sequence.
    const int64_t per_split = (int64_t{kv_len} + splits_ - 1) / splits_;
    const int64_t begin = std::min<int64_t>(kv_len, item.split * per_split);
    int64_t end = std::min<int64_t>(kv_len, begin + per_split);
    // Causal: the item's last query sees keys up to its own position, no further.
    const int32_t first_position = kv_len - q_len;
    if (p_.causal) {
      end = std::min<int64_t>(end, int64_t{first_position} + item.first_token + item.tokens);
    }

    const float scale = p_.softmax_scale * kLog2e;  // scores in log2 units: exp2 below
    const int64_t first_head = int64_t{item.first_kv_head} * group_;
    for (int32_t r = 0; r < rows; ++r) {
      const int64_t token = q_start + item.first_token + r / heads;
      const float* source = p_.q + (token * p_.num_heads + first_head + r % heads) * dim;
      for (int32_t d = 0; d < dim; ++d) q[r * dim + d] = source[d] * scale;
      std::fill(acc + r * dim, acc + (r + 1) * dim, 0.f);
      row_max[r] = kNegInf;
      row_sum[r] = 0.f;
    }

    for (int64_t chunk = begin; chunk < end; chunk += chunk_keys) {
      const int32_t count = static_cast<int32_t>(std::min<int64_t>(chunk_keys, end - chunk));
      for (int32_t j = 0; j < count; ++j) {
        const int64_t position = chunk + j;
        const int64_t offset =
            p_.block_table[int64_t{item.seq} * p_.block_table_stride + position / p_.block_size] *
                p_.kv_block_stride +
            (position % p_.block_size) * p_.kv_token_stride +
            int64_t{item.first_kv_head} * p_.kv_head_stride;
        // The item's heads are adjacent: one contiguous row each of K and V (head stride dim).
        widen<kType>(p_.k_cache + offset, keys + j * span, span);
        widen<kType>(p_.v_cache + offset, values + j * span, span);
      }
      for (int32_t r = 0; r < rows; ++r) {
        const int64_t visible =
            p_.causal ? int64_t{first_position} + item.first_token + r / heads + 1 : kv_len;
        const int32_t head_offset = (r % heads) / group_ * dim;  // its KV head in the rows
        const float* query = q + r * dim;
        float* score = scores + r * kMaxChunkKeys;
        float chunk_max = kNegInf;
        for (int32_t j = 0; j < count; ++j) {
          float dot = 0.f;
          const float* key = keys + j * span + head_offset;
#pragma omp simd reduction(+ : dot)
          for (int32_t d = 0; d < dim; ++d) dot += query[d] * key[d];
          score[j] = chunk + j < visible ? dot : kNegInf;
          chunk_max = std::max(chunk_max, score[j]);
        }
        if (chunk_max == kNegInf) continue;  // every key of the chunk is masked for this row
        const float new_max = std::max(row_max[r], chunk_max);
        const float correction = exp2_nonpositive(row_max[r] - new_max);
        row_max[r] = new_max;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int32_t j = 0; j < count; ++j) {
          score[j] = exp2_nonpositive(score[j] - new_max);
          sum += score[j];
        }
        row_sum[r] = row_sum[r] * correction + sum;
        float* accumulator = acc + r * dim;
#pragma omp simd
        for (int32_t d = 0; d < dim; ++d) accumulator[d] *= correction;
        for (int32_t j = 0; j < count; ++j) {
          const float weight = score[j];
          const float* value = values + j * span + head_offset;
#pragma omp simd
          for (int32_t d = 0; d < dim; ++d) accumulator[d] += weight * value[d];
        }
      }
    }

    for (int32_t r = 0; r < rows; ++r) {
      const int64_t index =
          (q_start + item.first_token + r / heads) * int64_t{p_.num_heads} + first_head + r % heads;
      const float sum = row_sum[r];
      const float inverse = sum > 0.f ? 1.f / sum : 0.f;
      for (int32_t d = 0; d < dim; ++d) partial_out[index * dim + d] = acc[r * dim + d] * inverse;
      partial_lse[index] = sum > 0.f ? (row_max[r] + std::log2(sum)) * kLn2 : kNegInf;
    }
  }

  const Kv16AttentionParams& p_;
  const int32_t group_;
  int splits_ = 1;
};

}  // namespace

std::string kv16_attention_unsupported_reason(const Kv16AttentionParams& p) {
  if (!p.q || !p.out || !p.lse || !p.k_cache || !p.v_cache) {
    return "q, out, lse, k_cache and v_cache are needed";
  }
  if (!p.block_table || !p.cu_seqlens_q || !p.seqlens_kv) {
    return "block_table, cu_seqlens_q and seqlens_kv are needed";
  }
  if (p.batch < 0) return "batch must not be negative";
  if (p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return "num_heads (" + std::to_string(p.num_heads) + ") must be a positive multiple of " +
           "num_kv_heads (" + std::to_string(p.num_kv_heads) + ")";
  }
  if (p.num_heads / p.num_kv_heads > kKv16MaxQueryGroup) {
    return "at most " + std::to_string(kKv16MaxQueryGroup) + " query heads per KV head, got " +
           std::to_string(p.num_heads / p.num_kv_heads);
  }
  if (p.head_dim <= 0 || p.head_dim > kMaxHeadDim) {
    return "head_dim must be in [1, " + std::to_string(kMaxHeadDim) + "], got " +
           std::to_string(p.head_dim);
  }
  if (p.block_size <= 0) return "block_size must be positive";
  if (p.kv_head_stride != p.head_dim) {
    return "the KV heads of a token must be adjacent (kv_head_stride == head_dim)";
  }
  if (!(p.softmax_scale > 0.f) || !std::isfinite(p.softmax_scale)) {
    return "softmax_scale must be positive and finite";
  }
  for (int32_t seq = 0; seq < p.batch; ++seq) {
    const int32_t q_len = p.cu_seqlens_q[seq + 1] - p.cu_seqlens_q[seq];
    if (q_len < 0) return "cu_seqlens_q must be non-decreasing";
    if (p.seqlens_kv[seq] < 0) return "seqlens_kv must not be negative";
    if (p.causal && q_len > p.seqlens_kv[seq]) {
      return "causal queries must be the last tokens of the cache (sequence " +
             std::to_string(seq) + ": " + std::to_string(q_len) + " queries, " +
             std::to_string(p.seqlens_kv[seq]) + " keys)";
    }
  }
  return "";
}

void kv16_attention(const Kv16AttentionParams& params) {
  const std::string reason = kv16_attention_unsupported_reason(params);
  if (!reason.empty()) throw std::invalid_argument("kv16_attention: " + reason);
  if (params.batch == 0 || params.cu_seqlens_q[params.batch] == 0) return;
  Kv16Attention(params).run();
}

}  // namespace ftengine::kernels::cpu
