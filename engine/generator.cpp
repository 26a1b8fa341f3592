#include "engine/generator.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace ftengine {

Generator::Generator(Model& model, KvCache& cache, Backend& backend,
                     const GeneratorOptions& options)
    : model_(model), cache_(cache), backend_(backend), options_(options) {
  if (options.max_step_tokens <= 0 || options.max_sequences <= 0) {
    throw std::invalid_argument("max_step_tokens and max_sequences must be positive");
  }
}

void Generator::validate_prompt(const std::vector<int32_t>& prompt, int64_t total_tokens) const {
  const ModelConfig& config = model_.config();
  if (prompt.empty()) throw std::invalid_argument("the prompt has no tokens");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= config.vocab_size) {
      throw std::invalid_argument("token id " + std::to_string(prompt[i]) + " at position " +
                                  std::to_string(i) + " is outside the vocabulary [0, " +
                                  std::to_string(config.vocab_size) + ")");
    }
  }
  if (total_tokens > config.max_position_embeddings) {
    throw std::invalid_argument(std::to_string(total_tokens) + " tokens exceed the context of " +
                                std::to_string(config.max_position_embeddings));
  }
  const KvCacheShape& shape = cache_.shape();
  if (cache_.blocks_for_tokens(total_tokens) > shape.num_blocks) {
    throw std::invalid_argument(
        std::to_string(total_tokens) + " tokens exceed the KV cache of " +
        std::to_string(static_cast<int64_t>(shape.num_blocks) * shape.block_size) + " tokens");
  }
}

int64_t Generator::add_request(std::vector<int32_t> prompt, const RequestOptions& options) {
  if (options.max_new_tokens <= 0) throw std::invalid_argument("max_new_tokens must be positive");
  const std::string sampling_error = kernels::cpu::sampling_config_error(options.sampling);
  if (!sampling_error.empty()) throw std::invalid_argument(sampling_error);
  validate_prompt(prompt, static_cast<int64_t>(prompt.size()) + options.max_new_tokens);
  if (options.prefilled_tokens < 0 ||
      options.prefilled_tokens >= static_cast<int64_t>(prompt.size())) {
    throw std::invalid_argument("prefilled_tokens must be in [0, prompt length)");
  }
  auto sequence = std::make_unique<Sequence>();
  sequence->id = next_id_++;
  sequence->prompt_length = static_cast<int32_t>(prompt.size());
  sequence->tokens = std::move(prompt);
  sequence->options = options;
  sequence->rng.seed(options.seed);
  waiting_.push_back(std::move(sequence));
  return waiting_.back()->id;
}

void Generator::admit_waiting() {
  // First come, first served; a request's blocks for prompt and every new token are taken at
  // admission, so a running sequence never waits for memory and nothing is ever preempted.
  while (!waiting_.empty() && static_cast<int32_t>(running_.size()) < options_.max_sequences) {
    Sequence& next = *waiting_.front();
    const int64_t total = static_cast<int64_t>(next.tokens.size()) + next.options.max_new_tokens;
    if (!cache_.allocate(cache_.blocks_for_tokens(total), next.blocks)) break;
    next.cached = next.options.prefilled_tokens;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

int32_t Generator::next_chunk(const Sequence& sequence, int32_t budget) const {
  const int32_t pending = static_cast<int32_t>(sequence.tokens.size()) - sequence.cached;
  int32_t take = std::min(pending, budget);
  // A chunk stops at the host tier: attention splits there (see ForwardBatch).
  const int32_t host_start = cache_.host_tier_start(sequence.blocks);
  if (sequence.cached < host_start) take = std::min(take, host_start - sequence.cached);
  return take;
}

ForwardBatch Generator::build_batch(const std::vector<Sequence*>& sequences,
                                    std::vector<int32_t>& chunk, bool all_logits) {
  ForwardBatch batch;
  const int32_t block_size = cache_.shape().block_size;
  size_t widest = 0;
  for (const Sequence* sequence : sequences) widest = std::max(widest, sequence->blocks.size());
  batch.block_table_stride = static_cast<int32_t>(std::max<size_t>(widest, 1));
  batch.block_size = block_size;
  batch.cu_seqlens_q.push_back(0);
  for (size_t s = 0; s < sequences.size(); ++s) {
    const Sequence& sequence = *sequences[s];
    for (int32_t i = 0; i < chunk[s]; ++i) {
      const int32_t position = sequence.cached + i;
      if (all_logits) batch.logits_rows.push_back(static_cast<int32_t>(batch.num_tokens()));
      batch.token_ids.push_back(sequence.tokens[position]);
      batch.positions.push_back(position);
      batch.slot_mapping.push_back(sequence.blocks[position / block_size] * block_size +
                                   position % block_size);
    }
    const int32_t cached_after = sequence.cached + chunk[s];
    if (!all_logits && cached_after == static_cast<int32_t>(sequence.tokens.size())) {
      batch.logits_rows.push_back(static_cast<int32_t>(batch.num_tokens()) - 1);
    }
    batch.cu_seqlens_q.push_back(static_cast<int32_t>(batch.num_tokens()));
    batch.seqlens_kv.push_back(cached_after);
    if (cache_.shape().host_tier_blocks > 0) {
      batch.host_tier_start.push_back(cache_.host_tier_start(sequence.blocks));
    }
    // Each sequence's row of the table, padded with block 0 (never read past seqlens_kv).
    batch.block_table.insert(batch.block_table.end(), sequence.blocks.begin(),
                             sequence.blocks.end());
    batch.block_table.resize(batch.block_table.size() + batch.block_table_stride -
                             sequence.blocks.size());
  }
  return batch;
}

std::vector<TokenEvent> Generator::step() {
  admit_waiting();
  std::vector<TokenEvent> events;
  if (running_.empty()) return events;

  // Decode tokens first (one each, they keep latency low), then prompt chunks in arrival order
  // with what is left of the step's token budget.
  std::vector<Sequence*> scheduled;
  std::vector<int32_t> chunk;
  int32_t budget = options_.max_step_tokens;
  for (int pass = 0; pass < 2 && budget > 0; ++pass) {
    for (auto& owned : running_) {
      Sequence& sequence = *owned;
      const int32_t pending = static_cast<int32_t>(sequence.tokens.size()) - sequence.cached;
      const bool decoding = pending == 1 && sequence.generated() > 0;
      if (decoding != (pass == 0) || budget == 0) continue;
      const int32_t take = next_chunk(sequence, budget);
      scheduled.push_back(&sequence);
      chunk.push_back(take);
      budget -= take;
    }
  }

  const ForwardBatch batch = build_batch(scheduled, chunk, /*all_logits=*/false);
  const Tensor logits = backend_.run_step(batch, [&] { return model_.forward(batch, cache_); });

  // The sequences whose prompt is now complete get a token, in logits-row order.
  std::vector<Sequence*> sampled;
  std::vector<SamplingRow> rows;
  for (size_t s = 0; s < scheduled.size(); ++s) {
    Sequence& sequence = *scheduled[s];
    sequence.cached += chunk[s];
    if (sequence.cached != static_cast<int32_t>(sequence.tokens.size())) continue;
    sampled.push_back(&sequence);
    rows.push_back({&sequence.options.sampling, sequence.tokens.data(),
                    static_cast<int64_t>(sequence.tokens.size()), sequence.options.seed,
                    sequence.generated()});
  }
  if (!backend_.sample(logits, rows, sampled_tokens_)) sample_on_host(logits, sampled);

  for (size_t r = 0; r < sampled.size(); ++r) {
    Sequence& sequence = *sampled[r];
    const int32_t token = sampled_tokens_[r];
    sequence.tokens.push_back(token);
    TokenEvent event{sequence.id, token, FinishReason::kNone};
    const auto& stops = sequence.options.stop_token_ids;
    if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
      event.finish = FinishReason::kStopToken;
    } else if (sequence.generated() >= sequence.options.max_new_tokens) {
      event.finish = FinishReason::kLength;
    }
    events.push_back(event);
  }
  for (auto it = running_.begin(); it != running_.end();) {
    const Sequence& sequence = **it;
    const bool done = std::any_of(events.begin(), events.end(), [&](const TokenEvent& e) {
      return e.request_id == sequence.id && e.finish != FinishReason::kNone;
    });
    if (done) {
      finish(**it);
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
  return events;
}

void Generator::sample_on_host(const Tensor& logits, const std::vector<Sequence*>& sampled) {
  const int64_t vocab = model_.config().vocab_size;
  host_logits_.resize(static_cast<size_t>(logits.numel()));
  backend_.to_host_f32(logits, host_logits_.data());
  sampled_tokens_.resize(sampled.size());
  for (size_t r = 0; r < sampled.size(); ++r) {
    Sequence& sequence = *sampled[r];
    sampled_tokens_[r] = kernels::cpu::sample_token(
        host_logits_.data() + r * vocab, vocab, sequence.options.sampling,
        sequence.tokens.data(), static_cast<int64_t>(sequence.tokens.size()), sequence.rng,
        scratch_);
  }
}

void Generator::finish(Sequence& sequence) { cache_.release(sequence.blocks); }

void Generator::abort(int64_t request_id) {
  for (auto it = running_.begin(); it != running_.end(); ++it) {
    if ((*it)->id == request_id) {
      finish(**it);
      running_.erase(it);
      return;
    }
  }
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    if ((*it)->id == request_id) {
      waiting_.erase(it);
      return;
    }
  }
}

std::vector<float> Generator::prompt_logits(const std::vector<int32_t>& prompt) {
  validate_prompt(prompt, static_cast<int64_t>(prompt.size()));
  Sequence sequence;
  sequence.tokens = prompt;
  sequence.prompt_length = static_cast<int32_t>(prompt.size());
  if (!cache_.allocate(cache_.blocks_for_tokens(sequence.prompt_length), sequence.blocks)) {
    throw std::runtime_error("the KV cache is busy with running requests; score when idle");
  }
  const int64_t vocab = model_.config().vocab_size;
  std::vector<float> all_logits;
  all_logits.reserve(static_cast<size_t>(sequence.prompt_length * vocab));
  try {
    while (sequence.cached < sequence.prompt_length) {
      std::vector<int32_t> chunk = {next_chunk(sequence, options_.max_step_tokens)};
      const ForwardBatch batch = build_batch({&sequence}, chunk, /*all_logits=*/true);
      const Tensor logits = model_.forward(batch, cache_);
      const size_t offset = all_logits.size();
      all_logits.resize(offset + static_cast<size_t>(logits.numel()));
      backend_.to_host_f32(logits, all_logits.data() + offset);
      sequence.cached += chunk[0];
    }
  } catch (...) {
    cache_.release(sequence.blocks);
    throw;
  }
  cache_.release(sequence.blocks);
  return all_logits;
}

}  // namespace ftengine
