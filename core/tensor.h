// A small strided tensor: a shape, strides in elements, a dtype and shared storage on the host or a
// device. Views (slice, reshape) share storage; nothing here computes, the Backend does.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"

namespace r1lab::core {

enum class Device : uint8_t { kCpu, kCuda };

// Owns (or, for wrapped memory, only points at) a block of bytes on one device.
class Storage {
 public:
  using Deleter = std::function<void(void*)>;
  Storage(void* data, size_t bytes, Device device, Deleter deleter)
      : data_(data), bytes_(bytes), device_(device), deleter_(std::move(deleter)) {}
  ~Storage() {
    if (deleter_) deleter_(data_);
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  // Host memory, 64-byte aligned: zero-filled, or left as it comes where the caller writes all of it.
  static std::shared_ptr<Storage> host(size_t bytes, bool zeroed = true);

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_;
  size_t bytes_;
  Device device_;
  Deleter deleter_;
};

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, size_t byte_offset, Shape shape, Shape strides, DType dtype);

  // A new zero-filled contiguous host tensor.
  static Tensor zeros(Shape shape, DType dtype = DType::kF32);
  // Host memory left uninitialised: only for a tensor the caller then writes whole.
  static Tensor empty(Shape shape, DType dtype = DType::kF32);
  // A contiguous tensor over storage the caller keeps alive elsewhere (not owned).
  static Tensor wrap(void* data, Shape shape, DType dtype, Device device = Device::kCpu);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::kCpu; }
  int dim() const { return static_cast<int>(shape_.size()); }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t size(int d) const { return shape_[d < 0 ? d + dim() : d]; }
  int64_t stride(int d) const { return strides_[d < 0 ? d + dim() : d]; }
  int64_t numel() const { return shape_numel(shape_); }
  bool is_contiguous() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  // Where the first element lies in the storage (a view over the same storage starts from it).
  size_t byte_offset() const { return byte_offset_; }

  void* raw() const { return static_cast<char*>(storage_->data()) + byte_offset_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(raw());
  }
  float* f32() const {
    CHECK(dtype_ == DType::kF32) << "tensor is " << dtype_name(dtype_) << ", not F32";
    return data<float>();
  }

  // Same storage, new shape; the tensor must be contiguous. One dimension may be -1.
  Tensor view(Shape shape) const;
  // Elements [start, start+len) along dimension d (a strided view).
  Tensor slice(int d, int64_t start, int64_t len) const;
  // A new dimension of size 1 at d.
  Tensor unsqueeze(int d) const;
  // Dimensions of size 1 repeated to `shape` with stride 0 (a broadcast view; read it, never write it).
  Tensor expand(const Shape& shape) const;
  // Index i of dimension d, dropping that dimension.
  Tensor select(int d, int64_t i) const;
  // Index i of dimension 0, dropping that dimension.
  Tensor operator[](int64_t i) const;
  // Dimensions d0 and d1 swapped (a strided view).
  Tensor transpose(int d0, int d1) const;

  // A contiguous host copy in f32 (from any dtype, any strides). Host tensors only.
  Tensor to_f32() const;
  // A contiguous host copy converted to dtype (from f32).
  Tensor to(DType dtype) const;
  // A contiguous host copy.
  Tensor clone() const;

 private:
  std::shared_ptr<Storage> storage_;
  size_t byte_offset_ = 0;
  Shape shape_;
  Shape strides_;
  DType dtype_ = DType::kF32;
};

Shape contiguous_strides(const Shape& shape);

}  // namespace r1lab::core
