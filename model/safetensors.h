// Reading and writing safetensors files (https://huggingface.co/docs/safetensors): an 8-byte little-
// endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw data.
// Files are memory-mapped; every header is validated against the file before any tensor is touched.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace r1lab::model {

struct SafetensorsEntry {
  core::DType dtype;
  core::Shape shape;
  size_t begin;  // byte offsets into the data section
  size_t end;
};

class SafetensorsFile {
 public:
  // Errors name the file and, where it applies, the tensor.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) > 0; }
  // A zero-copy host view into the mapping (valid while this file is open). CHECKs the name exists.
  core::Tensor tensor(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  size_t data_start_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory: model.safetensors, or shards listed in model.safetensors.index.json.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> open(const std::string& dir);
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  // The file that holds `name`, or nullptr.
  const SafetensorsFile* file_of(const std::string& name) const;
  std::vector<std::string> names() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

// Writes tensors (host, any dtype) in the given order; atomically: a temporary name, fsync, rename.
absl::Status write_safetensors(const std::string& path,
                               const std::vector<std::pair<std::string, core::Tensor>>& tensors,
                               const std::map<std::string, std::string>& metadata = {});

// Writes `contents` to `path` atomically (temporary name, fsync, rename).
absl::Status write_file_atomic(const std::string& path, const std::string& contents);

}  // namespace r1lab::model
