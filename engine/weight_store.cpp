#include "engine/weight_store.h"

#include <stdexcept>

namespace ftengine {

void WeightStore::add(const std::string& name, Tensor tensor) {
  if (!tensors_.emplace(name, std::move(tensor)).second) {
    throw std::invalid_argument("weight " + name + " was added twice");
  }
}

Tensor WeightStore::take(const std::string& name) {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw std::invalid_argument("missing weight " + name);
  Tensor tensor = std::move(it->second);
  tensors_.erase(it);
  return tensor;
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> result;
  for (const auto& entry : tensors_) result.push_back(entry.first);
  return result;
}

}  // namespace ftengine
