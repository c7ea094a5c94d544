#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace r1lab::core {

std::shared_ptr<Storage> Storage::host(size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  CHECK(p != nullptr) << "out of host memory allocating " << bytes << " bytes";
  std::memset(p, 0, rounded == 0 ? 64 : rounded);
  return std::make_shared<Storage>(p, bytes, Device::kCpu, [](void* q) { std::free(q); });
}

std::string shape_str(const Shape& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t acc = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    st[i] = acc;
    acc *= shape[i];
  }
  return st;
}

Tensor::Tensor(std::shared_ptr<Storage> storage, size_t byte_offset, Shape shape, Shape strides,
               DType dtype)
    : storage_(std::move(storage)),
      byte_offset_(byte_offset),
      shape_(std::move(shape)),
      strides_(std::move(strides)),
      dtype_(dtype) {}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  auto st = Storage::host(static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype));
  Shape strides = contiguous_strides(shape);
  return Tensor(std::move(st), 0, std::move(shape), std::move(strides), dtype);
}

Tensor Tensor::wrap(void* data, Shape shape, DType dtype, Device device) {
  const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  auto st = std::make_shared<Storage>(data, bytes, device, nullptr);
  Shape strides = contiguous_strides(shape);
  return Tensor(std::move(st), 0, std::move(shape), std::move(strides), dtype);
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_); }

Tensor Tensor::view(Shape shape) const {
  CHECK(is_contiguous()) << "view of a non-contiguous tensor " << shape_str(shape_);
  int64_t known = 1;
  int infer = -1;
  for (int i = 0; i < static_cast<int>(shape.size()); ++i) {
    if (shape[i] == -1) {
      CHECK_EQ(infer, -1) << "two -1 dimensions in view";
      infer = i;
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) shape[infer] = known == 0 ? 0 : numel() / known;
  CHECK_EQ(shape_numel(shape), numel()) << "view " << shape_str(shape) << " of " << shape_str(shape_);
  Shape strides = contiguous_strides(shape);
  return Tensor(storage_, byte_offset_, std::move(shape), std::move(strides), dtype_);
}

Tensor Tensor::slice(int d, int64_t start, int64_t len) const {
  if (d < 0) d += dim();
  CHECK(d >= 0 && d < dim());
  CHECK(start >= 0 && len >= 0 && start + len <= shape_[d])
      << "slice [" << start << ", " << start + len << ") of dim " << d << " of " << shape_str(shape_);
  Shape shape = shape_;
  shape[d] = len;
  return Tensor(storage_, byte_offset_ + static_cast<size_t>(start * strides_[d]) * dtype_size(dtype_),
                std::move(shape), strides_, dtype_);
}

Tensor Tensor::unsqueeze(int d) const {
  if (d < 0) d += dim() + 1;
  CHECK(d >= 0 && d <= dim());
  Shape shape = shape_, strides = strides_;
  const int64_t st = d < dim() ? strides_[d] * shape_[d] : 1;
  shape.insert(shape.begin() + d, 1);
  strides.insert(strides.begin() + d, st);
  return Tensor(storage_, byte_offset_, std::move(shape), std::move(strides), dtype_);
}

Tensor Tensor::expand(const Shape& shape) const {
  CHECK_EQ(shape.size(), shape_.size());
  Shape strides = strides_;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == shape_[i]) continue;
    CHECK_EQ(shape_[i], 1) << "expand " << shape_str(shape_) << " to " << shape_str(shape);
    strides[i] = 0;
  }
  return Tensor(storage_, byte_offset_, shape, std::move(strides), dtype_);
}

Tensor Tensor::select(int d, int64_t i) const {
  if (d < 0) d += dim();
  CHECK(d >= 0 && d < dim() && i >= 0 && i < shape_[d]) << "select " << i << " of dim " << d << " of "
                                                          << shape_str(shape_);
  Shape shape = shape_, strides = strides_;
  shape.erase(shape.begin() + d);
  strides.erase(strides.begin() + d);
  return Tensor(storage_, byte_offset_ + static_cast<size_t>(i * strides_[d]) * dtype_size(dtype_),
                std::move(shape), std::move(strides), dtype_);
}

Tensor Tensor::operator[](int64_t i) const { return select(0, i); }

namespace {

// Calls f(linear index into a contiguous result, element offset into this tensor) for every element.
template <typename F>
void for_each_offset(const Shape& shape, const Shape& strides, F f) {
  const int64_t n = shape_numel(shape);
  if (n == 0) return;
  std::vector<int64_t> idx(shape.size(), 0);
  int64_t off = 0;
  for (int64_t lin = 0; lin < n; ++lin) {
    f(lin, off);
    for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) {
        off += strides[d];
        break;
      }
      off -= strides[d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
}

}  // namespace

Tensor Tensor::to_f32() const {
  CHECK(device() == Device::kCpu) << "to_f32 of a device tensor";
  Tensor out = zeros(shape_, DType::kF32);
  float* o = out.data<float>();
  const char* base = static_cast<const char*>(raw());
  for_each_offset(shape_, strides_, [&](int64_t lin, int64_t off) {
    const char* p = base + off * static_cast<int64_t>(dtype_size(dtype_));
    switch (dtype_) {
      case DType::kF32: std::memcpy(&o[lin], p, 4); break;
      case DType::kBF16: { uint16_t h; std::memcpy(&h, p, 2); o[lin] = bf16_to_f32(h); break; }
      case DType::kF16: { uint16_t h; std::memcpy(&h, p, 2); o[lin] = f16_to_f32(h); break; }
      case DType::kI32: { int32_t v; std::memcpy(&v, p, 4); o[lin] = static_cast<float>(v); break; }
      case DType::kI64: { int64_t v; std::memcpy(&v, p, 8); o[lin] = static_cast<float>(v); break; }
    }
  });
  return out;
}

Tensor Tensor::clone() const {
  CHECK(device() == Device::kCpu) << "clone of a device tensor";
  Tensor out = zeros(shape_, dtype_);
  const size_t es = dtype_size(dtype_);
  char* o = static_cast<char*>(out.raw());
  const char* base = static_cast<const char*>(raw());
  for_each_offset(shape_, strides_, [&](int64_t lin, int64_t off) {
    std::memcpy(o + lin * es, base + off * static_cast<int64_t>(es), es);
  });
  return out;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return clone();
  Tensor src = to_f32();
  Tensor out = zeros(shape_, dtype);
  const float* s = src.data<float>();
  const int64_t n = numel();
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::kF32: out.data<float>()[i] = s[i]; break;
      case DType::kBF16: out.data<uint16_t>()[i] = f32_to_bf16(s[i]); break;
      case DType::kF16: out.data<uint16_t>()[i] = f32_to_f16(s[i]); break;
      case DType::kI32: out.data<int32_t>()[i] = static_cast<int32_t>(s[i]); break;
      case DType::kI64: out.data<int64_t>()[i] = static_cast<int64_t>(s[i]); break;
    }
  }
  return out;
}

}  // namespace r1lab::core
