#include "model/vocabulary.h"

#include <array>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace r1lab::model {
namespace {

using json = nlohmann::json;

// GPT-2's byte <-> printable code point table: printable Latin-1 bytes stand for themselves, the rest
// map to 256, 257, ... in byte order.
std::array<int, 324> unicode_to_byte_table() {
  std::array<int, 324> table;
  table.fill(-1);
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    table[printable ? b : 256 + extra++] = b;
  }
  return table;
}

// Decodes UTF-8 into code points; false on malformed input.
bool utf8_code_points(const std::string& s, std::vector<uint32_t>* out) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out->push_back(cp);
    i += n;
  }
  return true;
}

bool is_byte_level(const json& decoder) {
  if (!decoder.is_object()) return false;
  const std::string type = decoder.value("type", "");
  if (type == "ByteLevel") return true;
  if (type == "Sequence" && decoder.contains("decoders"))
    for (const json& d : decoder["decoders"])
      if (is_byte_level(d)) return true;
  return false;
}

}  // namespace

absl::StatusOr<Vocabulary> Vocabulary::from_json(const std::string& text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("tokenizer.json is not a JSON object");
  if (!j.contains("model") || !j["model"].is_object() || !j["model"].contains("vocab") ||
      !j["model"]["vocab"].is_object())
    return absl::InvalidArgumentError("tokenizer.json: model.vocab (an object of token -> id) is missing");
  const bool byte_level = is_byte_level(j.value("decoder", json()));
  static const std::array<int, 324> from_unicode = unicode_to_byte_table();
  Vocabulary v;
  auto put = [&](int64_t id, std::string bytes) -> absl::Status {
    if (id < 0 || id > (1 << 24)) return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: token id ", id));
    if (id >= v.size()) v.bytes_.resize(static_cast<size_t>(id) + 1);
    v.bytes_[static_cast<size_t>(id)] = std::move(bytes);
    return absl::OkStatus();
  };
  for (const auto& [token, id_json] : j["model"]["vocab"].items()) {
    if (!id_json.is_number_integer())
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: id of token '", token, "' is not an integer"));
    std::string bytes;
    if (byte_level) {
      std::vector<uint32_t> cps;
      if (!utf8_code_points(token, &cps))
        return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: token '", token, "' is not UTF-8"));
      for (uint32_t cp : cps) {
        if (cp >= from_unicode.size() || from_unicode[cp] < 0)
          return absl::InvalidArgumentError(
              absl::StrCat("tokenizer.json: token '", token, "' has a character outside the byte-level alphabet"));
        bytes.push_back(static_cast<char>(from_unicode[cp]));
      }
    } else if (token.size() == 6 && token.rfind("<0x", 0) == 0 && token[5] == '>') {
      bytes.push_back(static_cast<char>(std::stoi(token.substr(3, 2), nullptr, 16)));  // byte fallback
    } else {
      // SentencePiece: "▁" (U+2581) is a space.
      for (size_t i = 0; i < token.size();) {
        if (token.compare(i, 3, "\xE2\x96\x81") == 0) {
          bytes.push_back(' ');
          i += 3;
        } else {
          bytes.push_back(token[i++]);
        }
      }
    }
    auto st = put(id_json.get<int64_t>(), std::move(bytes));
    if (!st.ok()) return st;
  }
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const json& t : j["added_tokens"]) {
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() || !t.contains("content") ||
          !t["content"].is_string())
        return absl::InvalidArgumentError("tokenizer.json: an added token lacks an integer id or a string content");
      auto st = put(t["id"].get<int64_t>(), t.value("special", false) ? "" : t["content"].get<std::string>());
      if (!st.ok()) return st;
    }
  }
  return v;
}

absl::StatusOr<Vocabulary> Vocabulary::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto v = from_json(ss.str());
  if (!v.ok()) return absl::Status(v.status().code(), absl::StrCat(path, ": ", v.status().message()));
  return v;
}

const std::string& Vocabulary::bytes(int32_t id) const {
  static const std::string empty;
  return id >= 0 && id < size() ? bytes_[static_cast<size_t>(id)] : empty;
}

std::string Vocabulary::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += bytes(id);
  return out;
}

}  // namespace r1lab::model
