// What one forward step computes: a packed batch of sequences, each contributing its new tokens
// (a whole prompt, a prefill chunk, or one decode token), and where their keys and values live in
// the paged KV cache. Built on the host by the generator; backends upload what they need.
#pragma once

#include <cstdint>
#include <vector>

namespace ftengine {

struct ForwardBatch {
  std::vector<int32_t> token_ids;     // [tokens], sequences back to back
  std::vector<int32_t> positions;     // [tokens], absolute position of each token
  std::vector<int32_t> slot_mapping;  // [tokens], flat cache slot = block * block_size + offset
  std::vector<int32_t> cu_seqlens_q;  // [sequences + 1], token range of each sequence
  std::vector<int32_t> seqlens_kv;    // [sequences], cached tokens after this step
  std::vector<int32_t> block_table;   // [sequences][block_table_stride], cache blocks in order
  int32_t block_table_stride = 0;
  int32_t block_size = 0;             // slots per cache block
  std::vector<int32_t> logits_rows;   // token rows whose next-token logits are wanted
  // [sequences] when the cache has a host tier: the first position of each sequence held there
  // (its keys from there on live in host memory). A step never straddles it: a sequence's new
  // tokens lie all before it or all at or after it. Empty without a host tier.
  std::vector<int32_t> host_tier_start;

  int64_t num_tokens() const { return static_cast<int64_t>(token_ids.size()); }
  int32_t num_sequences() const { return static_cast<int32_t>(seqlens_kv.size()); }
  // Whether some sequence attends over keys in the host tier this step.
  bool uses_host_tier() const {
    for (size_t s = 0; s < host_tier_start.size(); ++s) {
      if (seqlens_kv[s] > host_tier_start[s]) return true;
    }
    return false;
  }
};

}  // namespace ftengine
