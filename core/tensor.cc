#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace r1lab::core {

std::shared_ptr<Storage> Storage::host(size_t bytes, bool zeroed) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  CHECK(p != nullptr) << "out of host memory allocating " << bytes << " bytes";
  if (zeroed) std::memset(p, 0, rounded == 0 ? 64 : rounded);
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

Tensor Tensor::empty(Shape shape, DType dtype) {
  auto st = Storage::host(static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype), /*zeroed=*/false);
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

Tensor Tensor::transpose(int d0, int d1) const {
  if (d0 < 0) d0 += dim();
  if (d1 < 0) d1 += dim();
  CHECK(d0 >= 0 && d0 < dim() && d1 >= 0 && d1 < dim()) << "transpose " << d0 << ", " << d1 << " of "
                                                          << shape_str(shape_);
  Shape shape = shape_, strides = strides_;
  std::swap(shape[d0], shape[d1]);
  std::swap(strides[d0], strides[d1]);
  return Tensor(storage_, byte_offset_, std::move(shape), std::move(strides), dtype_);
}

namespace {

// Calls f(linear index into a contiguous result, element offset into this tensor, length, stride) for each
// run of elements along the last dimension (a 0-d tensor is one run of one element).
template <typename F>
void for_each_row(const Shape& shape, const Shape& strides, F f) {
  const int64_t n = shape_numel(shape);
  if (n == 0) return;
  if (shape.empty()) return f(0, 0, 1, 1);
  const int outer_dims = static_cast<int>(shape.size()) - 1;
  const int64_t len = shape.back(), stride = strides.back();
  std::vector<int64_t> idx(static_cast<size_t>(outer_dims), 0);
  int64_t off = 0;
  for (int64_t lin = 0; lin < n; lin += len) {
    f(lin, off, len, stride);
    for (int d = outer_dims - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) {
        off += strides[d];
        break;
      }
      off -= strides[d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
}

// dst[i] = float(src[i * stride]) for i < n.
template <typename T, typename Convert>
void convert_run(float* dst, const char* src, int64_t n, int64_t stride, Convert convert) {
  const T* p = reinterpret_cast<const T*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = convert(p[i * stride]);
}

}  // namespace

Tensor Tensor::to_f32() const {
  CHECK(device() == Device::kCpu) << "to_f32 of a device tensor";
  if (dtype_ == DType::kF32) return clone();
  Tensor out = empty(shape_, DType::kF32);
  float* o = out.data<float>();
  const char* base = static_cast<const char*>(raw());
  const int64_t es = static_cast<int64_t>(dtype_size(dtype_));
  for_each_row(shape_, strides_, [&](int64_t lin, int64_t off, int64_t n, int64_t stride) {
    const char* p = base + off * es;
    switch (dtype_) {
      case DType::kF32: break;
      case DType::kBF16: convert_run<uint16_t>(o + lin, p, n, stride, bf16_to_f32); break;
      case DType::kF16: convert_run<uint16_t>(o + lin, p, n, stride, f16_to_f32); break;
      case DType::kI32: convert_run<int32_t>(o + lin, p, n, stride, [](int32_t v) { return static_cast<float>(v); }); break;
      case DType::kI64: convert_run<int64_t>(o + lin, p, n, stride, [](int64_t v) { return static_cast<float>(v); }); break;
      case DType::kU8:
        convert_run<uint8_t>(o + lin, p, n, stride, [](uint8_t v) { return static_cast<float>(v); });
        break;
    }
  });
  return out;
}

Tensor Tensor::clone() const {
  CHECK(device() == Device::kCpu) << "clone of a device tensor";
  Tensor out = empty(shape_, dtype_);
  const size_t es = dtype_size(dtype_);
  char* o = static_cast<char*>(out.raw());
  const char* base = static_cast<const char*>(raw());
  if (is_contiguous()) {
    if (numel() > 0) std::memcpy(o, base, static_cast<size_t>(numel()) * es);
    return out;
  }
  for_each_row(shape_, strides_, [&](int64_t lin, int64_t off, int64_t n, int64_t stride) {
    const char* p = base + off * static_cast<int64_t>(es);
    if (stride == 1) {
      std::memcpy(o + lin * static_cast<int64_t>(es), p, static_cast<size_t>(n) * es);
    } else {
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(o + (lin + i) * static_cast<int64_t>(es), p + i * stride * static_cast<int64_t>(es), es);
    }
  });
  return out;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return clone();
  Tensor src = to_f32();
  if (dtype == DType::kF32) return src;
  Tensor out = empty(shape_, dtype);
  const float* s = src.data<float>();
  const int64_t n = numel();
  switch (dtype) {
    case DType::kF32: break;
    case DType::kBF16: for (int64_t i = 0; i < n; ++i) out.data<uint16_t>()[i] = f32_to_bf16(s[i]); break;
    case DType::kF16: for (int64_t i = 0; i < n; ++i) out.data<uint16_t>()[i] = f32_to_f16(s[i]); break;
    case DType::kI32: for (int64_t i = 0; i < n; ++i) out.data<int32_t>()[i] = static_cast<int32_t>(s[i]); break;
    case DType::kI64: for (int64_t i = 0; i < n; ++i) out.data<int64_t>()[i] = static_cast<int64_t>(s[i]); break;
    case DType::kU8:
      for (int64_t i = 0; i < n; ++i) out.data<uint8_t>()[i] = static_cast<uint8_t>(s[i]);
      break;
  }
  return out;
}

}  // namespace r1lab::core
