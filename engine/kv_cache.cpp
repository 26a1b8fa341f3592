#include "engine/kv_cache.h"

#include <algorithm>
#include <functional>
#include <stdexcept>

#include "engine/backend.h"

namespace ftengine {

KvCache::KvCache(const KvCacheShape& shape, DType dtype, Backend& backend) : shape_(shape) {
  if (shape.num_layers <= 0 || shape.num_blocks <= 0 || shape.block_size <= 0 ||
      shape.num_kv_heads <= 0 || shape.head_dim <= 0) {
    throw std::invalid_argument("KV cache dimensions must all be positive");
  }
  if (shape.host_tier_blocks < 0 || shape.host_tier_blocks >= shape.num_blocks) {
    throw std::invalid_argument("the host tier must leave at least one KV block on the device");
  }
  const int32_t device_blocks = shape.num_blocks - shape.host_tier_blocks;
  const Shape device_shape = {device_blocks, shape.block_size, shape.num_kv_heads,
                              shape.head_dim};
  const Shape host_shape = {shape.host_tier_blocks, shape.block_size, shape.num_kv_heads,
                            shape.head_dim};
  layers_.reserve(shape.num_layers);
  for (int32_t i = 0; i < shape.num_layers; ++i) {
    LayerKvCache layer;
    layer.k = backend.zeros(device_shape, dtype);
    layer.v = backend.zeros(device_shape, dtype);
    if (shape.host_tier_blocks > 0) {
      layer.k_host = backend.host_tier_zeros(host_shape, dtype);
      layer.v_host = backend.host_tier_zeros(host_shape, dtype);
      layer.host_first_block = device_blocks;
    }
    layers_.push_back(std::move(layer));
  }
  for (int32_t block = device_blocks - 1; block >= 0; --block) free_device_.push_back(block);
  for (int32_t block = shape.num_blocks - 1; block >= device_blocks; --block) {
    free_host_.push_back(block);
  }
}

int64_t KvCache::bytes() const {
  int64_t total = 0;
  for (const auto& layer : layers_) {
    total += layer.k.nbytes() + layer.v.nbytes();
    if (layer.k_host.defined()) total += layer.k_host.nbytes() + layer.v_host.nbytes();
  }
  return total;
}

int32_t KvCache::blocks_for_tokens(int64_t tokens) const {
  return static_cast<int32_t>((tokens + shape_.block_size - 1) / shape_.block_size);
}

bool KvCache::allocate(int32_t count, std::vector<int32_t>& blocks) {
  if (count > free_blocks()) return false;
  const size_t first = blocks.size();
  for (std::vector<int32_t>* tier : {&free_device_, &free_host_}) {
    for (; count > 0 && !tier->empty(); --count) {
      blocks.push_back(tier->back());
      tier->pop_back();
    }
  }
  // Device ids are the low ones: sorted, the host tier holds the sequence's last positions.
  std::sort(blocks.begin() + static_cast<std::ptrdiff_t>(first), blocks.end());
  return true;
}

void KvCache::release(std::vector<int32_t>& blocks) {
  const int32_t host_first = host_first_block();
  for (const int32_t block : blocks) (block < host_first ? free_device_ : free_host_).push_back(block);
  // Keep the lowest ids at the back, so a sequence gets ascending, mostly adjacent blocks.
  std::sort(free_device_.begin(), free_device_.end(), std::greater<>());
  std::sort(free_host_.begin(), free_host_.end(), std::greater<>());
  blocks.clear();
}

int32_t KvCache::host_tier_start(const std::vector<int32_t>& blocks) const {
  // A sequence's blocks come from one allocate() call, in ascending order.
  const auto host = std::lower_bound(blocks.begin(), blocks.end(), host_first_block());
  return static_cast<int32_t>(host - blocks.begin()) * shape_.block_size;
}

}  // namespace ftengine
