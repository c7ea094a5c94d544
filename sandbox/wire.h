// The messages between the Runner and the launcher: a flat map of named byte strings, each written as
// "<name> <length>\n<bytes>\n". Binary-safe (program output need not be UTF-8), no dependencies, so the
// launcher stays small.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace r1lab::sandbox::wire {

using Message = std::map<std::string, std::string>;

inline std::string encode(const Message& m) {
  std::string out;
  for (const auto& [k, v] : m) absl::StrAppend(&out, k, " ", v.size(), "\n", v, "\n");
  return out;
}

inline absl::StatusOr<Message> decode(const std::string& data) {
  Message m;
  size_t pos = 0;
  while (pos < data.size()) {
    const size_t nl = data.find('\n', pos);
    const size_t sp = data.find(' ', pos);
    if (nl == std::string::npos || sp == std::string::npos || sp > nl)
      return absl::DataLossError(absl::StrCat("sandbox message: bad field header at byte ", pos));
    const std::string key = data.substr(pos, sp - pos);
    uint64_t len = 0;
    if (!absl::SimpleAtoi(data.substr(sp + 1, nl - sp - 1), &len) || nl + 1 + len + 1 > data.size() ||
        data[nl + 1 + len] != '\n')
      return absl::DataLossError(absl::StrCat("sandbox message: field '", key, "' is truncated"));
    m[key] = data.substr(nl + 1, len);
    pos = nl + 1 + len + 1;
  }
  return m;
}

// Lists travel NUL-separated (argv, env).
inline std::string join_list(const std::vector<std::string>& v) { return absl::StrJoin(v, std::string(1, '\0')); }
inline std::vector<std::string> split_list(const std::string& s) {
  if (s.empty()) return {};
  return absl::StrSplit(s, '\0');
}

inline int64_t get_int(const Message& m, const std::string& key, int64_t fallback = 0) {
  auto it = m.find(key);
  int64_t v = fallback;
  if (it != m.end() && !absl::SimpleAtoi(it->second, &v)) return fallback;
  return v;
}
inline std::string get(const Message& m, const std::string& key) {
  auto it = m.find(key);
  return it == m.end() ? std::string() : it->second;
}

}  // namespace r1lab::sandbox::wire
