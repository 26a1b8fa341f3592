#include "engine/tensor.h"

#include <stdexcept>

namespace ftengine {

std::string shape_string(const Shape& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

static int64_t element_count(const Shape& shape) {
  int64_t count = 1;
  for (int64_t extent : shape) {
    if (extent < 0) throw std::invalid_argument("negative extent in shape " + shape_string(shape));
    count *= extent;
  }
  return count;
}

Tensor::Buffer::Buffer(size_t size, Allocator& owner)
    : data(owner.allocate(size)), bytes(size), device(owner.device()), allocator(owner) {}

Tensor::Buffer::~Buffer() { allocator.deallocate(data, bytes); }

Tensor::Tensor(Shape shape, DType dtype, Allocator& allocator)
    : shape_(std::move(shape)), dtype_(dtype) {
  buffer_ = std::make_shared<Buffer>(static_cast<size_t>(element_count(shape_)) * dtype_size(dtype),
                                     allocator);
}

int64_t Tensor::dim(int index) const {
  if (index < 0) index += rank();
  if (index < 0 || index >= rank()) throw std::out_of_range("dim index out of range");
  return shape_[index];
}

int64_t Tensor::numel() const { return element_count(shape_); }

Tensor Tensor::reshaped(Shape shape) const {
  if (element_count(shape) != numel()) {
    throw std::invalid_argument("cannot reshape " + describe() + " to " + shape_string(shape));
  }
  Tensor view = *this;
  view.shape_ = std::move(shape);
  return view;
}

Tensor Tensor::row_range(int64_t begin, int64_t count) const {
  if (rank() == 0 || begin < 0 || count < 0 || begin + count > shape_[0]) {
    throw std::invalid_argument("cannot take rows [" + std::to_string(begin) + ", " +
                                std::to_string(begin + count) + ") of " + describe());
  }
  Tensor view = *this;
  const int64_t row_elements = shape_[0] > 0 ? numel() / shape_[0] : 0;
  view.offset_bytes_ += static_cast<size_t>(begin * row_elements) * dtype_size(dtype_);
  view.shape_[0] = count;
  return view;
}

std::string Tensor::describe() const { return dtype_name(dtype_) + shape_string(shape_); }

}  // namespace ftengine
