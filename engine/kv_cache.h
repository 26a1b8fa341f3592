// The paged KV cache: fixed-size blocks of slots, handed to sequences by a block allocator, with
// a block table per sequence mapping its token positions to blocks.
//
// Layout per layer: k[block][slot][kv_head][head_dim] (v alike). Heads are the innermost-but-one
// axis so a tensor-parallel rank holds its head shard as a cache of fewer heads. Block ids are
// global: on a GPU, the last host_tier_blocks of them may live in pinned host memory (the host
// tier of CPU-GPU cooperative attention) without the block tables knowing.
//
// A sequence's blocks are handed out device blocks first, in ascending id order, so the host
// tier holds a suffix of each sequence's positions: attention splits into a device prefix every
// query of the host part sees whole, and a host part with the usual causal layout.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace ftengine {

class Backend;

struct KvCacheShape {
  int32_t num_layers = 0;
  int32_t num_blocks = 0;       // device and host tier together
  int32_t host_tier_blocks = 0;  // the last ones, in host memory
  int32_t block_size = 0;
  int32_t num_kv_heads = 0;  // heads held by this rank
  int32_t head_dim = 0;
};

struct LayerKvCache {
  Tensor k;  // [num_blocks - host_tier_blocks, block_size, num_kv_heads, head_dim]
  Tensor v;
  // The host tier: block b >= host_first_block is k_host[b - host_first_block]. Undefined
  // tensors when the cache has no host tier.
  Tensor k_host;
  Tensor v_host;
  int32_t host_first_block = 0;
};

class KvCache {
 public:
  KvCache(const KvCacheShape& shape, DType dtype, Backend& backend);

  const KvCacheShape& shape() const { return shape_; }
  const LayerKvCache& layer(int index) const { return layers_.at(index); }
  int64_t bytes() const;

  // Block allocation. allocate() returns false and takes nothing when too few blocks are free;
  // it appends device blocks before host-tier ones, each in ascending order.
  int32_t free_blocks() const {
    return static_cast<int32_t>(free_device_.size() + free_host_.size());
  }
  int32_t blocks_for_tokens(int64_t tokens) const;
  bool allocate(int32_t count, std::vector<int32_t>& blocks);
  void release(std::vector<int32_t>& blocks);

  int32_t host_first_block() const { return shape_.num_blocks - shape_.host_tier_blocks; }
  // The first position of a sequence with these blocks that lives in the host tier (the
  // capacity of its blocks when none does).
  int32_t host_tier_start(const std::vector<int32_t>& blocks) const;

 private:
  KvCacheShape shape_;
  std::vector<LayerKvCache> layers_;
  // Free block ids, the lowest at the back (handed out first).
  std::vector<int32_t> free_device_;
  std::vector<int32_t> free_host_;
};

}  // namespace ftengine
