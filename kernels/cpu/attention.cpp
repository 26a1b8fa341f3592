#include "kernels/cpu/attention.h"

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#include "kernels/cpu/blas.h"
#include "kernels/cpu/exp2.h"

namespace ftengine::kernels::cpu {
namespace {


// First level: KV tokens per score block. 256 columns keep the score tile and one K/V block
// in L2 while giving sgemm an N (or K) dimension long enough to amortise its packing.
constexpr int kKvBlockTokens = 256;
// KV tokens per block when a tile holds several KV heads (decode), see run_tile.
constexpr int kMultiHeadKvBlockTokens = 64;
// KV tokens per block on the causal diagonal, see run_tile. Must not exceed the two above.
constexpr int kDiagonalKvBlockTokens = 64;
// Query rows per tile (tokens x heads of a GQA group). sgemm packs its K (or V) operand on every
// call, so each packed key should serve many rows: 512 rows took prefill at S = 4096 from 745 to
// 614 ms against 128 rows (2 AVX-512 cores, head_dim 128). The score tile, 512 x 256 floats,
// still fits a 2 MiB L2 with the Q and output tiles.
constexpr int kTileRows = 512;
// Tiles with at most this many rows per KV head count as decode tiles (see make_plan).
constexpr int kMaxDecodeRowsPerHead = 16;
// Second level: one AVX-512 register of scores; the SIMD loops below work in these units.
constexpr int kSimdFloats = 16;

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

#if defined(__AVX512F__)
// AVX-512 versions of the row loops: gcc 12 compiles the portable ones below to 256-bit vectors
// (its default preference on Intel cores) with the clamps of exp2_nonpositive as masked
// instructions, 44 instructions per 16 scores; these take 13. perf put the softmax at 13% of
// prefill with the portable loops.

// 2^x for 16 lanes, x <= 0, same polynomial as exp2_nonpositive. vscalefps applies the power of
// two, so no exponent bits are assembled by hand; lanes below -126 (-inf included) give exactly
// 0 through the zeroing mask, and lanes at or above it never produce denormals.
inline __m512 exp2_nonpositive(__m512 x) {
  const __m512 whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, whole);  // in [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  const __mmask16 representable = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  return _mm512_maskz_scalef_ps(representable, p, whole);
}

// Lanes of the last, partial register of an n-float row.
inline __mmask16 tail_mask(int n) {
  return static_cast<__mmask16>((1u << (n % kSimdFloats)) - 1u);
}

float row_max(const float* row, int n) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  __m512 lanes = neg_inf;
  int j = 0;
  for (; j + kSimdFloats <= n; j += kSimdFloats) {
    lanes = _mm512_max_ps(lanes, _mm512_loadu_ps(row + j));
  }
  if (j < n) lanes = _mm512_max_ps(lanes, _mm512_mask_loadu_ps(neg_inf, tail_mask(n), row + j));
  return _mm512_reduce_max_ps(lanes);
}

// Turns scores (already in log2 units) into exp2(score - max) in place; returns their sum.
float exp2_shifted_sum(float* row, int n, float max) {
  const __m512 shift = _mm512_set1_ps(max);
  __m512 sum = _mm512_setzero_ps();
  int j = 0;
  for (; j + kSimdFloats <= n; j += kSimdFloats) {
    const __m512 p = exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift));
    _mm512_storeu_ps(row + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  if (j < n) {
    const __mmask16 tail = tail_mask(n);
    const __m512 p = _mm512_maskz_mov_ps(
        tail, exp2_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + j), shift)));
    _mm512_mask_storeu_ps(row + j, tail, p);
    sum = _mm512_add_ps(sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}

// For n rows: running_max = max(running_max, block_max) and, in block_max's place, the
// correction exp2(old running max - new running max) of the row's old state. The correction is 0
// for a row that had no key yet (old max -inf); a row that still has none gets max -inf.
void update_running_max(float* running_max, float* block_max, int n) {
  for (int j = 0; j < n; j += kSimdFloats) {
    const __mmask16 lanes = n - j >= kSimdFloats ? __mmask16{0xffff} : tail_mask(n);
    const __m512 old_max = _mm512_maskz_loadu_ps(lanes, running_max + j);
    const __m512 new_max = _mm512_max_ps(old_max, _mm512_maskz_loadu_ps(lanes, block_max + j));
    _mm512_mask_storeu_ps(running_max + j, lanes, new_max);
    // -inf - x and -inf - -inf (NaN) both fail exp2_nonpositive's x >= -126 test: 0.
    _mm512_mask_storeu_ps(block_max + j, lanes,
                          exp2_nonpositive(_mm512_sub_ps(old_max, new_max)));
  }
}
#else
// The row loops below work on sub-blocks of kSimdFloats scores with per-lane accumulators, so
// that each sub-block lives in registers. (An `omp simd reduction` loop was left scalar by gcc 12
// once inlined into the OpenMP worker: 2x slower prefill.)
float row_max(const float* row, int n) {
  float lanes[kSimdFloats];
  std::fill(lanes, lanes + kSimdFloats, kNegInf);
  int j = 0;
  for (; j + kSimdFloats <= n; j += kSimdFloats) {
#pragma omp simd
    for (int l = 0; l < kSimdFloats; ++l) lanes[l] = std::max(lanes[l], row[j + l]);
  }
  float result = *std::max_element(lanes, lanes + kSimdFloats);
  for (; j < n; ++j) result = std::max(result, row[j]);
  return result;
}

// Turns scores (already in log2 units) into exp2(score - max) in place; returns their sum.
float exp2_shifted_sum(float* row, int n, float max) {
  float lanes[kSimdFloats] = {};
  int j = 0;
  for (; j + kSimdFloats <= n; j += kSimdFloats) {
#pragma omp simd
    for (int l = 0; l < kSimdFloats; ++l) {
      const float p = exp2_nonpositive(row[j + l] - max);
      row[j + l] = p;
      lanes[l] += p;
    }
  }
  float sum = 0.f;
  for (; j < n; ++j) {
    row[j] = exp2_nonpositive(row[j] - max);
    sum += row[j];
  }
  for (int l = 0; l < kSimdFloats; ++l) sum += lanes[l];
  return sum;
}

// For n rows: running_max = max(running_max, block_max) and, in block_max's place, the
// correction exp2(old running max - new running max) of the row's old state. The correction is 0
// for a row that had no key yet (old max -inf); a row that still has none gets max -inf.
void update_running_max(float* running_max, float* block_max, int n) {
  for (int r = 0; r < n; ++r) {
    const float old_max = running_max[r];
    running_max[r] = std::max(old_max, block_max[r]);
    block_max[r] = old_max == kNegInf ? 0.f : exp2_nonpositive(old_max - running_max[r]);
  }
}

#endif  // __AVX512F__

void scale_row(float* row, int n, float factor) {
#pragma omp simd simdlen(kSimdFloats)
  for (int j = 0; j < n; ++j) row[j] *= factor;
}

// One unit of parallel work: a tile of consecutive query tokens of one sequence, for the query
// heads of `num_kv_heads` consecutive KV heads. Prefill tiles hold one KV head; decode tiles
// (a few rows per head) hold several, see make_plan.
struct WorkItem {
  int32_t seq;
  int32_t first_kv_head;
  int32_t num_kv_heads;
  int32_t first_token;  // within the sequence's queries
  int32_t num_tokens;
  int64_t cost;       // KV tokens the tile walks, times its heads: schedules long tiles first
  int32_t head_copy;  // index of its HeadCopy in the plan; -1: reads q and the cache directly
};

// Prefill tiles read their operands from a contiguous copy of their KV head, made once for all
// tiles of the head. In the cache one head's rows are num_kv_heads * head_dim floats apart (16
// KiB for 32 heads of 128), a page each, and so are a query head's rows in q: sgemm's packing of
// such rows stalls on every row, tile after tile. The copy reads every head of a token at once,
// which the prefetchers follow.
struct HeadCopy {
  int32_t seq;
  int32_t kv_head;
  int64_t kv_tokens;  // keys of the sequence; its last tile walks them all
  int64_t q_rows;     // query tokens times the heads of the group
  // Floats into the copy buffer of [kv_tokens] K rows, [kv_tokens] V rows and [q_rows] query
  // rows ordered like a tile's ([token][query head of the group]); rows of q_ld floats.
  int64_t k_offset;
  int64_t v_offset;
  int64_t q_offset;
};

// Keys [begin, end) of consecutive head copies of one sequence (with the queries at those
// positions): the unit of the parallel copy, small enough that two threads share even the copy
// of a lone head.
struct CopyChunk {
  size_t first_copy;
  size_t end_copy;
  int64_t begin;
  int64_t end;
};

// Head copies made together, then the tiles that read them. Waves bound the copy buffer; each
// ends at a barrier, after which the next may reuse it.
struct Wave {
  size_t first_chunk, end_chunk;  // plan.chunks
  size_t first_item, end_item;    // plan.items, longest first
};

// All work of one call: tiles that read q and the cache directly (decode, and sequences with a
// single tile per head, which would read a copy only once) come first in `items`, then the
// tiles of the waves.
struct WorkPlan {
  std::vector<WorkItem> items;
  size_t direct_items = 0;
  std::vector<HeadCopy> copies;
  std::vector<CopyChunk> chunks;
  std::vector<Wave> waves;
  int64_t copy_buffer_floats = 0;  // the largest wave's copies
};

// Budget of one wave's head copies (a head of 4096 tokens of 128 takes 6 MiB with its queries):
// several heads per wave give the threads many tiles to balance between barriers, while the
// buffer stays small next to the cache itself.
constexpr int64_t kWaveCopyBytes = int64_t{32} << 20;
// Tiles per KV head from which the head is copied. The copy costs a pass over the head (read,
// write, read again); each tile then reads contiguous rows instead of 16 KiB-strided ones.
// Measured on 2 cores, prefill 2 / 4 / 8 tiles per head (S = 1024 / 2048 / 4096), OpenBLAS
// (which packs each operand once per call): direct 1.05-1.11x / 1.01-1.04x / 0.90-0.97x torch,
// copied 0.99x / 0.98x / 0.96-0.97x. MKL's kernels read the operands in place on every pass, so
// there even two readers repay the copy: S = 1024 / 2048 direct 0.96-1.01x / 0.80-0.98x, copied
// 1.11-1.15x / 1.05-1.07x.
constexpr int kMinTilesPerHeadCopy = blas::packs_operands ? 8 : 2;
// Key positions per unit of the parallel copy.
constexpr int kCopyChunkTokens = 32;
// Gap after each region of a head copy, 9 cache lines. Regions are whole pages long for usual
// sizes, so without it the copy's writes of one token (a row in every region of every head) all
// fall into the same cache sets.
constexpr int64_t kCopySkewFloats = 9 * 16;

// Memory of the calling thread's calls, kept from call to call: freshly allocated, the head
// copies' tens of MiB would be mapped, page-faulted and zeroed by the kernel on every call,
// which measured ~10% of prefill at S = 1024. Not zeroed here either: every float is written
// before it is read.
float* call_workspace(int64_t floats) {
  thread_local std::unique_ptr<float[]> buffer;
  thread_local int64_t capacity = 0;
  if (capacity < floats) {
    buffer.reset();  // frees the old one first
    capacity = 0;    // stays right if the allocation throws
    buffer.reset(new float[static_cast<size_t>(floats)]);
    capacity = floats;
  }
  return buffer.get();
}

// Scratch of one worker, sized once for the largest tile.
struct WorkerBuffers {
  float* q_tile;   // [rows][q_ld]; queries of a tile that reads q directly
  float* scores;   // [rows][kKvBlockTokens]; scores, then probabilities in place
  float* o_acc;    // [rows][q_ld]; unnormalised output
  float* row_max;  // [rows], log2 units
  float* row_sum;  // [rows]
  float* correction;  // [rows]; per block: block max, then exp2(old max - new max)
};

// A tile's operands in its head copy: its first query row, the head's keys and values.
struct CopiedOperands {
  const float* q;
  const float* k;
  const float* v;
};

class AttentionRunner {
 public:
  AttentionRunner(const AttentionParams& params, int threads)
      : p_(params),
        threads_(threads),
        group_(params.num_heads / params.num_kv_heads),
        head_dim_(params.head_dim),
        q_ld_(round_up(params.head_dim, kSimdFloats)) {}

  void run() {
    const WorkPlan plan = make_plan();
    if (plan.items.empty()) return;
    const int threads =
        static_cast<int>(std::min<int64_t>(threads_, static_cast<int64_t>(plan.items.size())));

    const int64_t rows = max_tile_rows_;
    const int64_t q_floats = round_up(rows * q_ld_, kSimdFloats);
    const int64_t score_floats = rows * kKvBlockTokens;
    const int64_t stats_floats = round_up(rows, kSimdFloats);
    const int64_t worker_floats = 2 * q_floats + score_floats + 3 * stats_floats;
    // Allocated before the parallel region: an exception thrown inside it would terminate.
    float* const copy_buffer = call_workspace(plan.copy_buffer_floats + worker_floats * threads);
    float* const scratch = copy_buffer + plan.copy_buffer_floats;

    // Every core already runs one of these workers, so each calls BLAS single-threaded. The
    // engine sets this once for the process (blas.h); repeating it here costs nothing and
    // keeps callers without an engine (bindings, tests) off a BLAS thread pool.
    use_single_threaded_blas();
#pragma omp parallel num_threads(threads)
    {
      float* base = scratch + worker_floats * omp_get_thread_num();
      WorkerBuffers buffers{base, base + q_floats, base + q_floats + score_floats,
                            base + 2 * q_floats + score_floats,
                            base + 2 * q_floats + score_floats + stats_floats,
                            base + 2 * q_floats + score_floats + 2 * stats_floats};
      // No barrier after the direct tiles: a thread done with them starts on the copies.
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t i = 0; i < static_cast<int64_t>(plan.direct_items); ++i) {
        run_tile(plan.items[static_cast<size_t>(i)], buffers, nullptr);
      }
      for (const Wave& wave : plan.waves) {
        // The barrier at the end of this loop publishes the copies to every thread.
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = static_cast<int64_t>(wave.first_chunk);
             c < static_cast<int64_t>(wave.end_chunk); ++c) {
          copy_chunk(plan, plan.chunks[static_cast<size_t>(c)], copy_buffer);
        }
        // The barrier at the end of this loop keeps the next wave from overwriting copies that
        // a tile still reads.
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = static_cast<int64_t>(wave.first_item);
             i < static_cast<int64_t>(wave.end_item); ++i) {
          const WorkItem& item = plan.items[static_cast<size_t>(i)];
          const HeadCopy& copy = plan.copies[static_cast<size_t>(item.head_copy)];
          const CopiedOperands operands{
              copy_buffer + copy.q_offset + int64_t{item.first_token} * group_ * q_ld_,
              copy_buffer + copy.k_offset, copy_buffer + copy.v_offset};
          run_tile(item, buffers, &operands);
        }
      }
    }
  }

 private:
  WorkPlan make_plan() {
    // Enough tokens for kTileRows rows, but a decode step (one token) still packs the whole
    // GQA group into one tile so that the products are matrix-matrix, not matrix-vector.
    const int tile_tokens = std::max(1, kTileRows / group_);
    // Decode-sized tiles also take several KV heads and walk the cache token block by token
    // block, reading every head of a token before moving on. One head's rows alone are
    // kv_token_stride apart, a page each, which the prefetchers and the TLB cannot follow:
    // measured 8 GB/s for one head at a time against 13 GB/s for all 32 heads together.
    // The heads are split only as far as needed to give every thread a tile.
    const auto is_small = [&](int64_t q_len) { return q_len * group_ <= kMaxDecodeRowsPerHead; };
    int64_t small_tiles = 0;
    for (int32_t seq = 0; seq < p_.batch; ++seq) {
      const int32_t q_len = p_.cu_seqlens_q[seq + 1] - p_.cu_seqlens_q[seq];
      if (q_len > 0 && is_small(q_len)) small_tiles += 1;
    }
    int32_t head_splits = 1;
    while (small_tiles * head_splits < threads_ && head_splits < p_.num_kv_heads) head_splits *= 2;
    head_splits = std::min(head_splits, p_.num_kv_heads);
    const int32_t heads_per_small_tile = (p_.num_kv_heads + head_splits - 1) / head_splits;

    WorkPlan plan;
    std::vector<WorkItem> copied;  // tiles that read a head copy, head after head
    max_tile_rows_ = 0;
    for (int32_t seq = 0; seq < p_.batch; ++seq) {
      const int32_t q_len = p_.cu_seqlens_q[seq + 1] - p_.cu_seqlens_q[seq];
      const int32_t kv_len = p_.seqlens_kv[seq];
      const int32_t heads_per_tile = is_small(q_len) ? heads_per_small_tile : 1;
      const int64_t tiles_per_head = (q_len + tile_tokens - 1) / tile_tokens;
      // A copy pays off once enough tiles read it.
      const int64_t q_rows = int64_t{q_len} * group_;
      const bool copy_heads =
          heads_per_tile == 1 && tiles_per_head >= kMinTilesPerHeadCopy &&
          head_copy_floats(kv_len, q_rows) * int64_t{sizeof(float)} <= kWaveCopyBytes;
      for (int32_t head = 0; head < p_.num_kv_heads; head += heads_per_tile) {
        const int32_t heads = std::min(heads_per_tile, p_.num_kv_heads - head);
        const int32_t head_copy = copy_heads ? static_cast<int32_t>(plan.copies.size()) : -1;
        if (copy_heads) plan.copies.push_back({seq, head, kv_len, q_rows, 0, 0, 0});
        for (int32_t first = 0; first < q_len; first += tile_tokens) {
          const int32_t count = std::min(tile_tokens, q_len - first);
          const int64_t last_position = kv_len - q_len + first + count - 1;
          const int64_t walk = p_.causal ? last_position + 1 : kv_len;
          max_tile_rows_ = std::max(max_tile_rows_, count * group_ * heads);
          (copy_heads ? copied : plan.items)
              .push_back({seq, head, heads, first, count, walk * heads, head_copy});
        }
      }
    }
    // Longest first, so that dynamic scheduling does not end with one core on a long tile.
    const auto longest_first = [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; };
    std::stable_sort(plan.items.begin(), plan.items.end(), longest_first);
    plan.direct_items = plan.items.size();

    // Waves: consecutive head copies up to the budget, then their tiles, longest first.
    size_t next_tile = 0;
    for (size_t first_copy = 0; first_copy < plan.copies.size();) {
      Wave wave{};
      wave.first_chunk = plan.chunks.size();
      wave.first_item = plan.items.size();
      int64_t offset = 0;
      size_t end_copy = first_copy;
      while (end_copy < plan.copies.size()) {
        HeadCopy& copy = plan.copies[end_copy];
        const int64_t floats = head_copy_floats(copy.kv_tokens, copy.q_rows);
        if (end_copy > first_copy && (offset + floats) * int64_t{sizeof(float)} > kWaveCopyBytes) {
          break;
        }
        copy.k_offset = offset;
        copy.v_offset = copy.k_offset + copy.kv_tokens * q_ld_ + kCopySkewFloats;
        copy.q_offset = copy.v_offset + copy.kv_tokens * q_ld_ + kCopySkewFloats;
        offset += floats;
        ++end_copy;
      }
      // Chunks span the wave's heads of one sequence, which sit side by side in the cache.
      for (size_t run = first_copy; run < end_copy;) {
        size_t run_end = run + 1;
        while (run_end < end_copy && plan.copies[run_end].seq == plan.copies[run].seq) ++run_end;
        const int64_t kv_tokens = plan.copies[run].kv_tokens;
        for (int64_t begin = 0; begin < kv_tokens; begin += kCopyChunkTokens) {
          plan.chunks.push_back(
              {run, run_end, begin, std::min<int64_t>(kv_tokens, begin + kCopyChunkTokens)});
        }
        run = run_end;
      }
      while (next_tile < copied.size() &&
             static_cast<size_t>(copied[next_tile].head_copy) < end_copy) {
        plan.items.push_back(copied[next_tile++]);
      }
      wave.end_chunk = plan.chunks.size();
      wave.end_item = plan.items.size();
      std::stable_sort(plan.items.begin() + static_cast<std::ptrdiff_t>(wave.first_item),
                       plan.items.end(), longest_first);
      plan.waves.push_back(wave);
      plan.copy_buffer_floats = std::max(plan.copy_buffer_floats, offset);
      first_copy = end_copy;
    }
    return plan;
  }

  int64_t head_copy_floats(int64_t kv_tokens, int64_t q_rows) const {
    return (2 * kv_tokens + q_rows) * q_ld_ + 3 * kCopySkewFloats;
  }

  // Copies key positions [chunk.begin, chunk.end) of the chunk's heads into their HeadCopy:
  // keys, values, and the queries of the positions that have one. Each loop reads the heads of
  // a token in the order they lie in memory.
  void copy_chunk(const WorkPlan& plan, const CopyChunk& chunk, float* buffer) const {
    const HeadCopy& first = plan.copies[chunk.first_copy];
    const int32_t* blocks =
        p_.block_table + static_cast<int64_t>(first.seq) * p_.block_table_stride;
    const int64_t q_start = p_.cu_seqlens_q[first.seq];
    const int64_t q_tokens = first.q_rows / group_;
    const int64_t first_query_position = first.kv_tokens - q_tokens;
    const size_t row_bytes = sizeof(float) * static_cast<size_t>(head_dim_);
    for (int64_t t = chunk.begin; t < chunk.end; ++t) {
      const int64_t token_offset =
          static_cast<int64_t>(blocks[t / p_.block_size]) * p_.kv_block_stride +
          (t % p_.block_size) * p_.kv_token_stride;
      for (size_t c = chunk.first_copy; c < chunk.end_copy; ++c) {
        const HeadCopy& copy = plan.copies[c];
        std::memcpy(buffer + copy.k_offset + t * q_ld_,
                    p_.k_cache + token_offset + int64_t{copy.kv_head} * p_.kv_head_stride,
                    row_bytes);
      }
      for (size_t c = chunk.first_copy; c < chunk.end_copy; ++c) {
        const HeadCopy& copy = plan.copies[c];
        std::memcpy(buffer + copy.v_offset + t * q_ld_,
                    p_.v_cache + token_offset + int64_t{copy.kv_head} * p_.kv_head_stride,
                    row_bytes);
      }
      if (t < first_query_position) continue;
      const int64_t query = t - first_query_position;
      const float* q_token = p_.q + (q_start + query) * p_.q_token_stride;
      for (size_t c = chunk.first_copy; c < chunk.end_copy; ++c) {
        const HeadCopy& copy = plan.copies[c];
        float* rows = buffer + copy.q_offset + query * group_ * q_ld_;
        for (int g = 0; g < group_; ++g) {
          const int64_t head = int64_t{copy.kv_head} * group_ + g;
          std::memcpy(rows + g * q_ld_, q_token + head * p_.q_head_stride, row_bytes);
        }
      }
    }
  }

  // Number of KV tokens from `start` readable through one pointer: up to the end of its cache
  // page, extended over following pages while the block table lists physically adjacent blocks
  // (the common case for a freshly allocated cache), capped at `limit`.
  int contiguous_kv_run(const int32_t* blocks, int64_t start, int64_t end, int limit) const {
    const int64_t bs = p_.block_size;
    const bool pages_abut = p_.kv_block_stride == bs * p_.kv_token_stride;
    int64_t page = start / bs;
    int64_t run_end = std::min(end, (page + 1) * bs);
    while (pages_abut && run_end < end && run_end - start < limit &&
           blocks[page + 1] == blocks[page] + 1) {
      ++page;
      run_end = std::min(end, (page + 1) * bs);
    }
    return static_cast<int>(std::min<int64_t>(run_end - start, limit));
  }

  // Rows of a tile are head-major: [kv head of the tile][token][query head of its group].
  // Queries, keys and values come from q and the paged cache, or from the tile's head copy.
  void run_tile(const WorkItem& item, const WorkerBuffers& buf,
                const CopiedOperands* copied) const {
    const int64_t d = head_dim_;
    const int head_rows = item.num_tokens * group_;
    const int rows = head_rows * item.num_kv_heads;
    const int32_t q_start = p_.cu_seqlens_q[item.seq];
    const int32_t q_len = p_.cu_seqlens_q[item.seq + 1] - q_start;
    const int32_t kv_len = p_.seqlens_kv[item.seq];
    // Position of the tile's first query; row r of a head belongs to token r / group_.
    const int64_t first_position = static_cast<int64_t>(kv_len) - q_len + item.first_token;
    const int64_t last_position = first_position + item.num_tokens - 1;
    const int32_t first_head = item.first_kv_head * group_;

    const float* q_rows = buf.q_tile;
    if (copied != nullptr) {
      q_rows = copied->q;
    } else {
      for (int r = 0; r < rows; ++r) {
        const int64_t token = q_start + item.first_token + (r % head_rows) / group_;
        const int32_t head = first_head + (r / head_rows) * group_ + r % group_;
        std::memcpy(buf.q_tile + r * q_ld_,
                    p_.q + token * p_.q_token_stride + head * p_.q_head_stride, sizeof(float) * d);
      }
    }
    // o_acc needs no clearing: each head's first block initialises its rows (attend_block).
    std::fill(buf.row_max, buf.row_max + rows, kNegInf);
    std::fill(buf.row_sum, buf.row_sum + rows, 0.f);

    // Scores come out of the sgemm in log2 units so that the softmax needs exp2 only.
    const float score_scale = p_.softmax_scale * kLog2e;
    // Tiling-mask, empty tiles: with a causal mask no key past the last query is visible, so
    // the walk ends there.
    const int64_t kv_end = p_.causal ? std::min<int64_t>(kv_len, last_position + 1) : kv_len;
    const int32_t* blocks = p_.block_table + static_cast<int64_t>(item.seq) * p_.block_table_stride;
    // With several heads the blocks are shorter so that a block of every head stays in L2
    // while the heads take their turns (32 heads of 128, one core: 64 tokens 12.3 GB/s, 256
    // tokens 11.6 GB/s).
    const int block_limit = item.num_kv_heads > 1 ? kMultiHeadKvBlockTokens : kKvBlockTokens;

    for (int64_t kv_start = 0; kv_start < kv_end;) {
      // Tiling-mask, diagonal: in a block that reaches past the tile's first query, the scores
      // of keys past a row's position are computed and thrown away. Such blocks end at the
      // first query's position and, past it, hold kDiagonalKvBlockTokens keys, so that the
      // waste is a staircase of small triangles instead of one triangle of a whole block.
      int limit = block_limit;
      if (p_.causal && kv_start + limit - 1 > first_position) {
        limit = static_cast<int>(std::clamp<int64_t>(first_position + 1 - kv_start,
                                                     kDiagonalKvBlockTokens, limit));
      }
      const int n = copied != nullptr
                        ? static_cast<int>(std::min<int64_t>(limit, kv_end - kv_start))
                        : contiguous_kv_run(blocks, kv_start, kv_end, limit);
      // Tiling-mask, full tiles: every key is at or before the earliest query. In a partial
      // tile the rows whose token comes before the block's first key see none of it; they are
      // leading rows of each head, left out of both products (half the diagonal block's work).
      const bool full = !p_.causal || kv_start + n - 1 <= first_position;
      const int skipped_rows =
          full ? 0 : static_cast<int>(std::max<int64_t>(0, kv_start - first_position) * group_);
      if (copied != nullptr) {
        attend_block(buf, q_rows, 0, head_rows, skipped_rows, copied->k + kv_start * q_ld_,
                     copied->v + kv_start * q_ld_, q_ld_, n, kv_start, full, first_position,
                     score_scale);
      } else {
        const int64_t token_offset =
            static_cast<int64_t>(blocks[kv_start / p_.block_size]) * p_.kv_block_stride +
            (kv_start % p_.block_size) * p_.kv_token_stride;
        for (int h = 0; h < item.num_kv_heads; ++h) {
          const int64_t offset =
              token_offset + static_cast<int64_t>(item.first_kv_head + h) * p_.kv_head_stride;
          attend_block(buf, q_rows, h * head_rows, head_rows, skipped_rows, p_.k_cache + offset,
                       p_.v_cache + offset, p_.kv_token_stride, n, kv_start, full,
                       first_position, score_scale);
        }
      }
      kv_start += n;
    }

    for (int r = 0; r < rows; ++r) {
      const int64_t token = q_start + item.first_token + (r % head_rows) / group_;
      const int32_t head = first_head + (r / head_rows) * group_ + r % group_;
      float* dst = p_.out + token * p_.out_token_stride + head * p_.out_head_stride;
      const float sum = buf.row_sum[r];
      // A row that saw no key keeps sum 0: zero output and lse -inf, never 0/0.
      const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
      const float* acc = buf.o_acc + r * q_ld_;
#pragma omp simd simdlen(kSimdFloats)
      for (int64_t j = 0; j < d; ++j) dst[j] = acc[j] * inv_sum;
      if (p_.lse != nullptr) {
        p_.lse[token * p_.num_heads + head] =
            sum > 0.f ? (buf.row_max[r] + std::log2(sum)) * kLn2 : kNegInf;
      }
    }
  }

  // Rows [skipped_rows, head_rows) of one KV head's rows, which start at tile row head_row0,
  // attend to n keys starting at position kv_start (rows kv_ld floats apart in k and v): scores,
  // online softmax update, P·V. q_rows holds the tile's queries, rows of q_ld_ floats. The
  // first block (kv_start 0, where every row sees at least key 0, so none is skipped)
  // initialises o_acc by overwriting it, which spares clearing the tile up front.
  void attend_block(const WorkerBuffers& buf, const float* q_rows, int head_row0, int head_rows,
                    int skipped_rows,
                    const float* k, const float* v, int64_t kv_ld, int n, int64_t kv_start,
                    bool full, int64_t first_position, float score_scale) const {
    const int64_t d = head_dim_;
    const int first_row = head_row0 + skipped_rows;
    const int end_row = head_row0 + head_rows;
    const int active_rows = end_row - first_row;
    if (active_rows <= 0) return;
    float* scores = buf.scores + static_cast<int64_t>(first_row) * kKvBlockTokens;
    sgemm(false, true, active_rows, n, d, score_scale, q_rows + first_row * q_ld_, q_ld_, k,
          kv_ld, 0.f, scores, kKvBlockTokens);

    // Partial tiles: the mask is generated from indices, as the count of leading keys a row may
    // see; the masked tail gets probability 0.
    const auto visible_keys = [&](int r) {
      if (full) return n;
      const int64_t position = first_position + (r - head_row0) / group_;
      return static_cast<int>(std::clamp<int64_t>(position - kv_start + 1, 0, n));
    };
    // The online softmax in three passes, so that the per-row bookkeeping (new running max and
    // the factor that rescales the old state) runs 16 rows per instruction instead of as a
    // scalar exp2 per row. Pass 1: each row's block max, kept in buf.correction for now.
    for (int r = first_row; r < end_row; ++r) {
      float* score_row = buf.scores + static_cast<int64_t>(r) * kKvBlockTokens;
      const int visible = visible_keys(r);
      std::fill(score_row + visible, score_row + n, 0.f);
      buf.correction[r] = row_max(score_row, visible);
    }
    // Pass 2: running max and correction exp2(old max - new max) of every row.
    update_running_max(buf.row_max + first_row, buf.correction + first_row, active_rows);
    // Pass 3: probabilities, their sums, and the rescaled accumulators.
    for (int r = first_row; r < end_row; ++r) {
      float* score_row = buf.scores + static_cast<int64_t>(r) * kKvBlockTokens;
      const int visible = visible_keys(r);
      const float new_max = buf.row_max[r];
      if (new_max == kNegInf) {
        // No key visible yet: nothing to accumulate.
        std::fill(score_row, score_row + visible, 0.f);
        continue;
      }
      const float correction = buf.correction[r];
      buf.row_sum[r] = buf.row_sum[r] * correction + exp2_shifted_sum(score_row, visible, new_max);
      // Before the first block the accumulator holds nothing (that block's product overwrites
      // it), so only later blocks rescale it.
      if (kv_start != 0 && correction != 1.f) {
        scale_row(buf.o_acc + r * q_ld_, static_cast<int>(d), correction);
      }
    }

    const float keep_accumulator = kv_start == 0 ? 0.f : 1.f;  // sgemm's beta
    sgemm(false, false, active_rows, d, n, 1.f, scores, kKvBlockTokens, v, kv_ld, keep_accumulator,
          buf.o_acc + first_row * q_ld_, q_ld_);
  }

  const AttentionParams& p_;
  const int threads_;
  const int group_;
  const int64_t head_dim_;
  const int64_t q_ld_;  // row stride of the q and output tiles, padded to whole registers
  int32_t max_tile_rows_ = 0;
};

}  // namespace

std::string attention_unsupported_reason(const AttentionParams& p) {
  if (p.batch < 0) return "batch must be >= 0, got " + std::to_string(p.batch);
  if (p.num_heads <= 0 || p.num_kv_heads <= 0) {
    return "num_heads and num_kv_heads must be positive, got " + std::to_string(p.num_heads) +
           " and " + std::to_string(p.num_kv_heads);
  }
  if (p.num_heads % p.num_kv_heads != 0) {
    return "num_heads (" + std::to_string(p.num_heads) + ") must be a multiple of num_kv_heads (" +
           std::to_string(p.num_kv_heads) + ")";
  }
  if (p.head_dim <= 0) return "head_dim must be positive, got " + std::to_string(p.head_dim);
  if (p.block_size <= 0) return "block_size must be positive, got " + std::to_string(p.block_size);
  if (p.num_threads < 0) return "num_threads must be >= 0, got " + std::to_string(p.num_threads);
  if (!std::isfinite(p.softmax_scale)) return "softmax_scale must be finite";
  if (p.batch == 0) return "";
  if (p.q == nullptr || p.out == nullptr || p.k_cache == nullptr || p.v_cache == nullptr ||
      p.block_table == nullptr || p.cu_seqlens_q == nullptr || p.seqlens_kv == nullptr) {
    return "q, out, k_cache, v_cache, block_table, cu_seqlens_q and seqlens_kv must be set";
  }
  if (p.kv_token_stride < p.head_dim || p.kv_token_stride > std::numeric_limits<int32_t>::max()) {
    // The stride is the sgemm leading dimension of K and V, a 32-bit BLAS integer.
    return "kv_token_stride must be in [head_dim, 2^31), got " + std::to_string(p.kv_token_stride);
  }
  if (p.cu_seqlens_q[0] != 0) {
    return "cu_seqlens_q[0] must be 0, got " + std::to_string(p.cu_seqlens_q[0]);
  }
  for (int32_t seq = 0; seq < p.batch; ++seq) {
    // 64-bit so that arbitrary caller values cannot overflow the difference.
    const int64_t q_len = static_cast<int64_t>(p.cu_seqlens_q[seq + 1]) - p.cu_seqlens_q[seq];
    const int64_t kv_len = p.seqlens_kv[seq];
    if (q_len < 0) {
      return "cu_seqlens_q must be non-decreasing, but entry " + std::to_string(seq + 1) + " (" +
             std::to_string(p.cu_seqlens_q[seq + 1]) + ") is below entry " + std::to_string(seq) +
             " (" + std::to_string(p.cu_seqlens_q[seq]) + ")";
    }
    // Causal attention places the queries at the last q_len cached positions. Without a mask
    // positions play no part, so a query block may outnumber the keys (the cooperative path's
    // host tier holds an older prefix that every query of the step sees whole).
    if (p.causal && q_len > kv_len) {
      return "sequence " + std::to_string(seq) + " has " + std::to_string(q_len) +
             " queries but only " + std::to_string(kv_len) +
             " KV tokens; with a causal mask its queries must be the last of its cached tokens";
    }
  }
  return "";
}

void attention(const AttentionParams& params) {
  const std::string reason = attention_unsupported_reason(params);
  if (!reason.empty()) throw std::invalid_argument("attention: " + reason);
  const int threads = params.num_threads > 0 ? params.num_threads : omp_get_max_threads();
  AttentionRunner(params, threads).run();
}

}  // namespace ftengine::kernels::cpu
