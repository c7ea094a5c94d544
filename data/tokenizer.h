// The built-in model's tokenizer: one token per character, plus "added tokens" matched first, longest
// first (the R1 tags and the R1-Zero template's fixed text), as Hugging Face tokenizers treat added
// tokens. A 400-character R1-Zero prompt becomes ~25 tokens, so a tiny model trains on the reasoning,
// not on re-reading the template.
//
// It reads and writes tokenizer.json (a WordLevel model over single characters, the phrases as added
// tokens, <|bos|> <|eos|> <|pad|> as special ones), so the rollout worker decodes with model::Vocabulary
// like any other checkpoint.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace r1lab::data {

class Tokenizer {
 public:
  // The built-in vocabulary: specials, the R1 tags, the R1-Zero template's fixed parts, then printable
  // ASCII and "\n".
  static Tokenizer builtin();
  static absl::StatusOr<Tokenizer> from_json(const std::string& text);
  static absl::StatusOr<Tokenizer> from_file(const std::string& path);
  std::string to_json() const;
  absl::Status save(const std::string& path) const;

  int32_t size() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t bos() const { return bos_; }
  int32_t eos() const { return eos_; }
  int32_t pad() const { return pad_; }

  // Fails on a character the vocabulary lacks (naming it and its offset).
  absl::StatusOr<std::vector<int32_t>> encode(const std::string& text) const;
  // Special tokens decode to nothing; unknown ids fail.
  absl::StatusOr<std::string> decode(const std::vector<int32_t>& ids) const;
  const std::string& token(int32_t id) const { return tokens_.at(static_cast<size_t>(id)); }

 private:
  struct Entry {
    std::string text;
    bool special = false;
    bool added = false;
  };
  static absl::StatusOr<Tokenizer> build(std::vector<Entry> entries);

  std::vector<std::string> tokens_;
  std::vector<bool> special_;
  std::vector<bool> added_;
  std::vector<int32_t> by_char_;                  // 256 entries, -1 where absent
  std::vector<std::pair<std::string, int32_t>> phrases_;  // added non-special tokens, longest first
  int32_t bos_ = -1, eos_ = -1, pad_ = -1;
};

}  // namespace r1lab::data
