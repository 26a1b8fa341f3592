// Element types the engine stores. Arithmetic on the CPU is always float32; bfloat16 is a
// storage type for weights (half the memory traffic of float32 in the matrix products).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace ftengine {

enum class DType : int { kFloat32, kBFloat16, kFloat16, kInt32 };

inline size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kBFloat16:
    case DType::kFloat16:
      return 2;
  }
  throw std::invalid_argument("unknown dtype");
}

inline std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat16:
      return "float16";
    case DType::kInt32:
      return "int32";
  }
  return "unknown";
}

}  // namespace ftengine
