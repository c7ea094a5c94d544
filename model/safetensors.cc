#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace r1lab::model {
namespace {

using nlohmann::json;
constexpr size_t kMaxHeader = size_t{100} << 20;  // 100 MiB, as the reference implementation

absl::Status errno_error(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return errno_error(path);
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": truncated (", f->size_, " bytes, no header)"));
  }
  void* m = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) return errno_error(absl::StrCat(path, ": mmap"));
  f->map_ = m;
  const auto* bytes = static_cast<const unsigned char*>(m);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > kMaxHeader || n > f->size_ - 8)
    return absl::DataLossError(absl::StrCat(path, ": header length ", n, " exceeds the file (", f->size_,
                                            " bytes): truncated or not a safetensors file"));
  f->data_start_ = 8 + static_cast<size_t>(n);
  const size_t data_size = f->size_ - f->data_start_;
  json h = json::parse(reinterpret_cast<const char*>(bytes + 8), reinterpret_cast<const char*>(bytes + 8 + n),
                       nullptr, /*allow_exceptions=*/false);
  if (h.is_discarded() || !h.is_object())
    return absl::DataLossError(absl::StrCat(path, ": header is not a JSON object (corrupt file)"));
  std::vector<std::tuple<size_t, size_t, std::string>> ranges;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (!it->is_object()) return absl::DataLossError(absl::StrCat(path, ": __metadata__ is not an object"));
      for (auto m2 = it->begin(); m2 != it->end(); ++m2)
        if (m2->is_string()) f->metadata_[m2.key()] = m2->get<std::string>();
      continue;
    }
    const json& e = *it;
    auto bad = [&](const std::string& why) {
      return absl::DataLossError(absl::StrCat(path, ": tensor '", name, "': ", why));
    };
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
      return bad("entry lacks dtype, shape or data_offsets");
    if (!e["dtype"].is_string()) return bad("dtype is not a string");
    auto dt = core::dtype_from_name(e["dtype"].get<std::string>());
    if (!dt.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "': ", dt.status().message()));
    SafetensorsEntry entry;
    entry.dtype = *dt;
    if (!e["shape"].is_array()) return bad("shape is not an array");
    uint64_t numel = 1;
    for (const json& d : e["shape"]) {
      if (!d.is_number_unsigned()) return bad("shape holds a non-integer or negative size");
      const uint64_t v = d.get<uint64_t>();
      if (v != 0 && numel > (uint64_t{1} << 62) / v) return bad("shape overflows");
      numel *= v;
      entry.shape.push_back(static_cast<int64_t>(v));
    }
    const json& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return bad("data_offsets is not [begin, end]");
    entry.begin = off[0].get<size_t>();
    entry.end = off[1].get<size_t>();
    if (entry.begin > entry.end || entry.end > data_size)
      return bad(absl::StrCat("data [", entry.begin, ", ", entry.end, ") lies outside the ", data_size,
                              "-byte data section (truncated file?)"));
    if (entry.end - entry.begin != numel * core::dtype_size(entry.dtype))
      return bad(absl::StrCat("holds ", entry.end - entry.begin, " bytes but shape ", core::shape_str(entry.shape),
                              " of ", core::dtype_name(entry.dtype), " needs ", numel * core::dtype_size(entry.dtype)));
    if (entry.end > entry.begin) ranges.emplace_back(entry.begin, entry.end, name);
    f->entries_.emplace(name, std::move(entry));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (std::get<0>(ranges[i]) < std::get<1>(ranges[i - 1]))
      return absl::DataLossError(absl::StrCat(path, ": tensors '", std::get<2>(ranges[i - 1]), "' and '",
                                              std::get<2>(ranges[i]), "' overlap in the data section"));
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, size_);
}

core::Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = entries_.find(name);
  CHECK(it != entries_.end()) << path_ << " has no tensor " << name;
  const SafetensorsEntry& e = it->second;
  char* p = static_cast<char*>(map_) + data_start_ + e.begin;
  return core::Tensor::wrap(p, e.shape, e.dtype);
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::open(const std::string& dir) {
  namespace fs = std::filesystem;
  auto ck = std::unique_ptr<Checkpoint>(new Checkpoint());
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  std::vector<std::string> shards;
  if (fs::exists(index)) {
    std::ifstream in(index);
    std::stringstream ss;
    ss << in.rdbuf();
    json j = json::parse(ss.str(), nullptr, false);
    if (j.is_discarded() || !j.contains("weight_map") || !j["weight_map"].is_object())
      return absl::DataLossError(absl::StrCat(index.string(), ": no weight_map object"));
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it->is_string()) return absl::DataLossError(absl::StrCat(index.string(), ": bad entry ", it.key()));
      const std::string shard = it->get<std::string>();
      if (shard.find('/') != std::string::npos || shard.find("..") != std::string::npos)
        return absl::InvalidArgumentError(absl::StrCat(index.string(), ": shard name '", shard, "' leaves the directory"));
      if (std::find(shards.begin(), shards.end(), shard) == shards.end()) shards.push_back(shard);
    }
  } else if (fs::exists(single)) {
    shards.push_back("model.safetensors");
  } else {
    return absl::NotFoundError(absl::StrCat(dir, ": no model.safetensors or model.safetensors.index.json"));
  }
  for (const std::string& s : shards) {
    R1LAB_ASSIGN_OR_RETURN(auto f, SafetensorsFile::open((fs::path(dir) / s).string()));
    for (const auto& [name, _] : f->entries()) {
      if (ck->where_.count(name))
        return absl::DataLossError(absl::StrCat(dir, ": tensor '", name, "' appears in two shards"));
      ck->where_[name] = f.get();
    }
    ck->files_.push_back(std::move(f));
  }
  return ck;
}

const SafetensorsFile* Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? nullptr : it->second;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [n, _] : where_) out.push_back(n);
  return out;
}

absl::Status write_file_atomic(const std::string& path, const std::string& contents) {
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno_error(absl::StrCat(tmp, ": create"));
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t w = ::write(fd, contents.data() + done, contents.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      absl::Status s = errno_error(absl::StrCat(tmp, ": write"));
      ::close(fd);
      ::unlink(tmp.c_str());
      return s;
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    absl::Status s = errno_error(absl::StrCat(tmp, ": fsync/close"));
    ::unlink(tmp.c_str());
    return s;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status s = errno_error(absl::StrCat(path, ": rename"));
    ::unlink(tmp.c_str());
    return s;
  }
  return absl::OkStatus();
}

absl::Status write_safetensors(const std::string& path,
                               const std::vector<std::pair<std::string, core::Tensor>>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  size_t offset = 0;
  std::vector<core::Tensor> contiguous;
  for (const auto& [name, t] : tensors) {
    core::Tensor c = t.is_contiguous() ? t : t.clone();
    const size_t bytes = static_cast<size_t>(c.numel()) * core::dtype_size(c.dtype());
    h[name] = {{"dtype", core::dtype_name(c.dtype())}, {"shape", c.shape()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    contiguous.push_back(std::move(c));
  }
  std::string header = h.dump();
  while ((header.size() + 8) % 8 != 0) header.push_back(' ');  // align the data section to 8 bytes
  std::string out;
  out.reserve(8 + header.size() + offset);
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += header;
  for (const core::Tensor& c : contiguous)
    out.append(static_cast<const char*>(c.raw()), static_cast<size_t>(c.numel()) * core::dtype_size(c.dtype()));
  return write_file_atomic(path, out);
}

}  // namespace r1lab::model
