#include "data/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/check.h"
#include "data/tasks.h"
#include "nlohmann/json.hpp"

namespace r1lab::data {
namespace {

using json = nlohmann::json;

std::string printable(unsigned char c) {
  if (c >= 32 && c < 127) return absl::StrCat("'", std::string(1, static_cast<char>(c)), "'");
  return absl::StrCat("byte 0x", absl::Hex(c, absl::kZeroPad2));
}

}  // namespace

absl::StatusOr<Tokenizer> Tokenizer::build(std::vector<Entry> entries) {
  Tokenizer t;
  t.by_char_.assign(256, -1);
  for (size_t i = 0; i < entries.size(); ++i) {
    Entry& e = entries[i];
    const int32_t id = static_cast<int32_t>(i);
    if (e.text.empty()) return absl::InvalidArgumentError(absl::StrCat("tokenizer: token ", id, " is empty"));
    if (e.special) {
      if (e.text == "<|bos|>") t.bos_ = id;
      if (e.text == "<|eos|>") t.eos_ = id;
      if (e.text == "<|pad|>") t.pad_ = id;
    } else if (e.added) {
      t.phrases_.emplace_back(e.text, id);
    } else {
      if (e.text.size() != 1)
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer: vocabulary token ", id, " ('", e.text, "') is not one character"));
      const unsigned char c = static_cast<unsigned char>(e.text[0]);
      if (t.by_char_[c] >= 0)
        return absl::InvalidArgumentError(absl::StrCat("tokenizer: ", printable(c), " appears twice"));
      t.by_char_[c] = id;
    }
    t.tokens_.push_back(e.text);
    t.special_.push_back(e.special);
    t.added_.push_back(e.added);
  }
  if (t.bos_ < 0 || t.eos_ < 0 || t.pad_ < 0)
    return absl::InvalidArgumentError("tokenizer: <|bos|>, <|eos|> and <|pad|> must all be special tokens");
  std::stable_sort(t.phrases_.begin(), t.phrases_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  return t;
}

Tokenizer Tokenizer::builtin() {
  std::vector<Entry> e;
  for (const char* s : {"<|bos|>", "<|eos|>", "<|pad|>"}) e.push_back({s, true, true});
  // The template's fixed text around the question (see r1_zero_prompt), and the tags.
  const std::string marker = "\x01";
  const std::string prompt = r1_zero_prompt(marker);
  const size_t at = prompt.find(marker);
  e.push_back({prompt.substr(0, at), false, true});
  e.push_back({prompt.substr(at + marker.size()), false, true});
  for (const char* s : {"<think>", "</think>", "<answer>", "</answer>"}) e.push_back({s, false, true});
  e.push_back({"\n", false, false});
  for (int c = 32; c < 127; ++c) e.push_back({std::string(1, static_cast<char>(c)), false, false});
  auto t = build(std::move(e));
  CHECK(t.ok()) << t.status().message();
  return *std::move(t);
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::encode(const std::string& text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    bool matched = false;
    for (const auto& [phrase, id] : phrases_) {
      if (text.compare(i, phrase.size(), phrase) == 0) {
        ids.push_back(id);
        i += phrase.size();
        matched = true;
        break;
      }
    }
    if (matched) continue;
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (by_char_[c] < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: ", printable(c), " at offset ", i, " is not in the vocabulary"));
    ids.push_back(by_char_[c]);
    ++i;
  }
  return ids;
}

absl::StatusOr<std::string> Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= size()) return absl::InvalidArgumentError(absl::StrCat("tokenizer: token id ", id, " out of range"));
    if (!special_[static_cast<size_t>(id)]) out += tokens_[static_cast<size_t>(id)];
  }
  return out;
}

std::string Tokenizer::to_json() const {
  json vocab = json::object(), added = json::array();
  for (int32_t id = 0; id < size(); ++id) {
    const size_t i = static_cast<size_t>(id);
    if (added_[i]) {
      added.push_back({{"id", id}, {"content", tokens_[i]}, {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", false}, {"special", static_cast<bool>(special_[i])}});
    } else {
      vocab[tokens_[i]] = id;
    }
  }
  json j = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "(?s)."}}}, {"behavior", "Isolated"}, {"invert", false}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "Fuse"}}},
      {"model", {{"type", "WordLevel"}, {"vocab", vocab}, {"unk_token", "<|pad|>"}}},
  };
  return j.dump(1);
}

absl::StatusOr<Tokenizer> Tokenizer::from_json(const std::string& text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError("tokenizer.json is not a JSON object");
  if (!j.contains("model") || !j["model"].is_object() || !j["model"].contains("vocab") || !j["model"]["vocab"].is_object())
    return absl::InvalidArgumentError("tokenizer.json: model.vocab (an object of token -> id) is missing");
  std::map<int64_t, Entry> by_id;
  auto put = [&](int64_t id, Entry e) -> absl::Status {
    if (id < 0 || id >= (1 << 20)) return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: token id ", id));
    if (by_id.count(id)) return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: token id ", id, " appears twice"));
    by_id[id] = std::move(e);
    return absl::OkStatus();
  };
  for (const auto& [token, id] : j["model"]["vocab"].items()) {
    if (!id.is_number_integer())
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: id of '", token, "' is not an integer"));
    if (auto st = put(id.get<int64_t>(), {token, false, false}); !st.ok()) return st;
  }
  if (j.contains("added_tokens")) {
    if (!j["added_tokens"].is_array()) return absl::InvalidArgumentError("tokenizer.json: added_tokens is not an array");
    for (const json& t : j["added_tokens"]) {
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() || !t.contains("content") ||
          !t["content"].is_string())
        return absl::InvalidArgumentError("tokenizer.json: an added token lacks an integer id or a string content");
      if (auto st = put(t["id"].get<int64_t>(), {t["content"].get<std::string>(), t.value("special", false), true});
          !st.ok())
        return st;
    }
  }
  std::vector<Entry> entries;
  for (auto& [id, e] : by_id) {
    if (id != static_cast<int64_t>(entries.size()))
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: token ids are not contiguous (no id ", entries.size(), ")"));
    entries.push_back(std::move(e));
  }
  return build(std::move(entries));
}

absl::StatusOr<Tokenizer> Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto t = from_json(ss.str());
  if (!t.ok()) return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  return t;
}

absl::Status Tokenizer::save(const std::string& path) const {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << to_json();
    if (!out.flush()) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return absl::InternalError(absl::StrCat("cannot rename ", tmp));
  return absl::OkStatus();
}

}  // namespace r1lab::data
