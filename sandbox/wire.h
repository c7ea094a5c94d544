// The messages between the Runner and the launcher: a flat map of named byte strings, each written as
// "<name> <length>\n<bytes>\n". Binary-safe (program output need not be UTF-8). Standard C++ only: the
// launcher starts for every run, and each shared library it loads costs start-up time.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace r1lab::sandbox::wire {

using Message = std::map<std::string, std::string>;

inline std::string encode(const Message& m) {
  std::string out;
  for (const auto& [k, v] : m) {
    out += k;
    out += ' ';
    out += std::to_string(v.size());
    out += '\n';
    out += v;
    out += '\n';
  }
  return out;
}

// Empty on a malformed message.
inline std::optional<Message> decode(const std::string& data) {
  Message m;
  size_t pos = 0;
  while (pos < data.size()) {
    const size_t nl = data.find('\n', pos);
    const size_t sp = data.find(' ', pos);
    if (nl == std::string::npos || sp == std::string::npos || sp > nl) return std::nullopt;
    const std::string len_text = data.substr(sp + 1, nl - sp - 1);
    char* end = nullptr;
    const unsigned long long len = std::strtoull(len_text.c_str(), &end, 10);
    if (len_text.empty() || *end != '\0' || len > data.size() || nl + 1 + len + 1 > data.size() ||
        data[nl + 1 + len] != '\n')
      return std::nullopt;
    m[data.substr(pos, sp - pos)] = data.substr(nl + 1, len);
    pos = nl + 1 + len + 1;
  }
  return m;
}

inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == sep) {
      out.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  return out;
}

// Lists travel NUL-separated (argv, env).
inline std::string join_list(const std::vector<std::string>& v) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += '\0';
    out += v[i];
  }
  return out;
}
inline std::vector<std::string> split_list(const std::string& s) {
  if (s.empty()) return {};
  return split(s, '\0');
}

// cat("step.", 3, ".status"): strings and integers, concatenated.
inline void append(std::string& s, const std::string& a) { s += a; }
inline void append(std::string& s, const char* a) { s += a; }
inline void append(std::string& s, char a) { s += a; }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline void append(std::string& s, T a) { s += std::to_string(a); }
template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (append(s, a), ...);
  return s;
}

inline std::string get(const Message& m, const std::string& key) {
  auto it = m.find(key);
  return it == m.end() ? std::string() : it->second;
}
inline int64_t get_int(const Message& m, const std::string& key, int64_t fallback = 0) {
  auto it = m.find(key);
  if (it == m.end() || it->second.empty()) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(it->second.c_str(), &end, 10);
  return *end == '\0' ? v : fallback;
}

}  // namespace r1lab::sandbox::wire
