// The paged KV cache: fixed-size blocks of slots, handed to sequences by a block allocator, with
// a block table per sequence mapping its token positions to blocks.
//
// Layout per layer: k[block][slot][kv_head][head_dim] (v alike). Heads are the innermost-but-one
// axis so a tensor-parallel rank holds its head shard as a cache of fewer heads, and block ids
// are global so a host-memory tier can own a range of them without changing the block tables.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/tensor.h"

namespace ftengine {

class Backend;

struct KvCacheShape {
  int32_t num_layers = 0;
  int32_t num_blocks = 0;
  int32_t block_size = 0;
  int32_t num_kv_heads = 0;  // heads held by this rank
  int32_t head_dim = 0;
};

struct LayerKvCache {
  Tensor k;  // [num_blocks, block_size, num_kv_heads, head_dim]
  Tensor v;
};

class KvCache {
 public:
  KvCache(const KvCacheShape& shape, DType dtype, Backend& backend);

  const KvCacheShape& shape() const { return shape_; }
  const LayerKvCache& layer(int index) const { return layers_.at(index); }
  int64_t bytes() const;

  // Block allocation. allocate() returns false and takes nothing when too few blocks are free.
  int32_t free_blocks() const { return static_cast<int32_t>(free_list_.size()); }
  int32_t blocks_for_tokens(int64_t tokens) const;
  bool allocate(int32_t count, std::vector<int32_t>& blocks);
  void release(std::vector<int32_t>& blocks);

 private:
  KvCacheShape shape_;
  std::vector<LayerKvCache> layers_;
  std::vector<int32_t> free_list_;
};

}  // namespace ftengine
