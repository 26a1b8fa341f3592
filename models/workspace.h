// Step buffers shared by the model files: a buffer keeps the largest size any step needed, and
// each step uses its first rows, so the decode loop allocates nothing.
#pragma once

#include "engine/backend.h"

namespace ftengine::models {

// Rows [0, rows) of a [capacity, cols] buffer that grows (never shrinks) to the largest `rows`.
inline Tensor grown_rows(Backend& backend, Tensor& buffer, int64_t rows, int64_t cols,
                         DType dtype) {
  if (!buffer.defined() || buffer.dim(0) < rows || buffer.dim(1) != cols) {
    buffer = backend.empty({rows, cols}, dtype);
  }
  return buffer.first_rows(rows);
}

}  // namespace ftengine::models
