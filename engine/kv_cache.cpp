#include "engine/kv_cache.h"

#include <stdexcept>

#include "engine/backend.h"

namespace ftengine {

KvCache::KvCache(const KvCacheShape& shape, DType dtype, Backend& backend) : shape_(shape) {
  if (shape.num_layers <= 0 || shape.num_blocks <= 0 || shape.block_size <= 0 ||
      shape.num_kv_heads <= 0 || shape.head_dim <= 0) {
    throw std::invalid_argument("KV cache dimensions must all be positive");
  }
  const Shape layer_shape = {shape.num_blocks, shape.block_size, shape.num_kv_heads,
                             shape.head_dim};
  layers_.reserve(shape.num_layers);
  for (int32_t i = 0; i < shape.num_layers; ++i) {
    layers_.push_back({backend.zeros(layer_shape, dtype), backend.zeros(layer_shape, dtype)});
  }
  // Hand out low block ids first: pop_back takes from the end.
  free_list_.reserve(shape.num_blocks);
  for (int32_t block = shape.num_blocks - 1; block >= 0; --block) free_list_.push_back(block);
}

int64_t KvCache::bytes() const {
  int64_t total = 0;
  for (const auto& layer : layers_) total += layer.k.nbytes() + layer.v.nbytes();
  return total;
}

int32_t KvCache::blocks_for_tokens(int64_t tokens) const {
  return static_cast<int32_t>((tokens + shape_.block_size - 1) / shape_.block_size);
}

bool KvCache::allocate(int32_t count, std::vector<int32_t>& blocks) {
  if (count > free_blocks()) return false;
  for (int32_t i = 0; i < count; ++i) {
    blocks.push_back(free_list_.back());
    free_list_.pop_back();
  }
  return true;
}

void KvCache::release(std::vector<int32_t>& blocks) {
  free_list_.insert(free_list_.end(), blocks.rbegin(), blocks.rend());
  blocks.clear();
}

}  // namespace ftengine
