// The generation loop: requests wait, are admitted when the KV cache can hold them whole, have
// their prompts prefilled in chunks, then decode one token per step — all sequences of a step
// in one packed forward batch. One call of step() is one forward pass and one sampled token per
// sequence that finished its prompt, so Python only sees tokens, never layers.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <random>
#include <vector>

#include "engine/kv_cache.h"
#include "engine/model.h"
#include "kernels/cpu/sampling.h"

namespace ftengine {

struct RequestOptions {
  kernels::cpu::SamplingConfig sampling;
  uint64_t seed = 0;
  int32_t max_new_tokens = 16;
  std::vector<int32_t> stop_token_ids;
  // Benchmarks only: the first prefilled_tokens prompt tokens count as already in the cache
  // (their K/V are whatever the cache blocks hold), to measure decode at contexts whose
  // prefill would take minutes. 0 for every real request.
  int32_t prefilled_tokens = 0;
};

enum class FinishReason : int { kNone = 0, kStopToken = 1, kLength = 2 };

struct TokenEvent {
  int64_t request_id = 0;
  int32_t token = -1;
  FinishReason finish = FinishReason::kNone;
};

struct GeneratorOptions {
  int32_t max_step_tokens = 2048;  // prefill chunk budget of one step, decode tokens included
  int32_t max_sequences = 64;      // sequences decoded together
};

class Generator {
 public:
  Generator(Model& model, KvCache& cache, Backend& backend, const GeneratorOptions& options);

  // Queues a request; throws std::invalid_argument for ids out of the vocabulary, an empty
  // prompt, or a request the whole KV cache could not hold.
  int64_t add_request(std::vector<int32_t> prompt, const RequestOptions& options);
  // One forward pass; returns the token sampled for each sequence that produced one.
  std::vector<TokenEvent> step();
  // Stops a request now (a stop string matched, the caller went away); frees its cache blocks.
  void abort(int64_t request_id);
  bool has_unfinished() const { return !waiting_.empty() || !running_.empty(); }

  // Logits at every position of `prompt` ([len, vocab] float32), through the same chunked
  // prefill path as generation; for scoring and for tests against reference models.
  std::vector<float> prompt_logits(const std::vector<int32_t>& prompt);

 private:
  struct Sequence {
    int64_t id = 0;
    std::vector<int32_t> tokens;  // prompt then generated
    int32_t prompt_length = 0;
    int32_t cached = 0;  // tokens whose K/V are in the cache
    std::vector<int32_t> blocks;
    RequestOptions options;
    std::mt19937_64 rng;
    int32_t generated() const { return static_cast<int32_t>(tokens.size()) - prompt_length; }
  };

  // The new tokens of `sequence` the next step takes, at most `budget`.
  int32_t next_chunk(const Sequence& sequence, int32_t budget) const;
  void validate_prompt(const std::vector<int32_t>& prompt, int64_t total_tokens) const;
  void admit_waiting();
  // Packs chunk[s] new tokens of each sequence into one batch; logits for every token when
  // all_logits, else for the last token of each sequence whose pending tokens are all in.
  ForwardBatch build_batch(const std::vector<Sequence*>& sequences, std::vector<int32_t>& chunk,
                           bool all_logits);
  void finish(Sequence& sequence);
  // Copies the logits to the host and samples there (backends without a device sampler).
  void sample_on_host(const Tensor& logits, const std::vector<Sequence*>& sampled);

  Model& model_;
  KvCache& cache_;
  Backend& backend_;
  GeneratorOptions options_;
  int64_t next_id_ = 0;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  kernels::cpu::SamplingScratch scratch_;
  std::vector<float> host_logits_;
  std::vector<int32_t> sampled_tokens_;  // this step's tokens, one per sampled sequence
};

}  // namespace ftengine
