// Weights on the backend's device, by checkpoint name. The loader adds tensors one at a time (so
// host memory never holds the whole model twice); a model takes the ones it needs while it is
// built, freeing any it fuses into bigger ones.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "engine/tensor.h"

namespace ftengine {

class WeightStore {
 public:
  void add(const std::string& name, Tensor tensor);
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // Removes and returns the tensor; throws std::invalid_argument naming a missing one.
  Tensor take(const std::string& name);
  std::vector<std::string> names() const;

 private:
  std::map<std::string, Tensor> tensors_;
};

}  // namespace ftengine
