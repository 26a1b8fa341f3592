// A dense, contiguous, row-major tensor on one device. Copies share the buffer (like a
// shared_ptr). The only views are ranges of leading-axis rows, which stay contiguous; strided
// accesses (fused QKV, paged KV) live inside kernels with explicit strides.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/allocator.h"
#include "engine/dtype.h"

namespace ftengine {

using Shape = std::vector<int64_t>;

std::string shape_string(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;
  Tensor(Shape shape, DType dtype, Allocator& allocator);

  const Shape& shape() const { return shape_; }
  int64_t dim(int index) const;
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return buffer_ ? buffer_->device : Device::kCpu; }
  bool defined() const { return buffer_ != nullptr; }

  void* raw() const {
    return buffer_ ? static_cast<char*>(buffer_->data) + offset_bytes_ : nullptr;
  }
  template <typename T>
  T* data() const {
    return static_cast<T*>(raw());
  }

  // Same buffer, another shape with the same element count.
  Tensor reshaped(Shape shape) const;
  // Same buffer, the first `rows` rows of the leading axis (workspaces sized for the largest
  // step serve every smaller one without reallocating).
  Tensor first_rows(int64_t rows) const { return row_range(0, rows); }
  // Same buffer, rows [begin, begin + count) of the leading axis (token tiles).
  Tensor row_range(int64_t begin, int64_t count) const;

  std::string describe() const;  // "bfloat16[576, 1536]"

 private:
  struct Buffer {
    Buffer(size_t bytes, Allocator& owner);
    ~Buffer();
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    void* data;
    size_t bytes;
    Device device;
    Allocator& allocator;
  };

  Shape shape_;
  DType dtype_ = DType::kFloat32;
  std::shared_ptr<Buffer> buffer_;
  size_t offset_bytes_ = 0;  // start of this view inside buffer_
};

}  // namespace ftengine
