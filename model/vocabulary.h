// The text of every token id, from a Hugging Face tokenizer.json: what turns sampled ids back into text
// (stop strings, completions' text). Byte-level BPE vocabularies (GPT-2 / DeepSeek-V3 style, decoder
// "ByteLevel") and SentencePiece-style ones ("▁" for spaces, <0xNN> byte-fallback tokens). Special added
// tokens decode to nothing, as transformers' decode(skip_special_tokens=True).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace r1lab::model {

class Vocabulary {
 public:
  static absl::StatusOr<Vocabulary> from_json(const std::string& text);
  static absl::StatusOr<Vocabulary> from_file(const std::string& path);

  int64_t size() const { return static_cast<int64_t>(bytes_.size()); }
  // The bytes of token `id` (UTF-8 text, possibly a partial character); empty for unknown ids.
  const std::string& bytes(int32_t id) const;
  std::string decode(const std::vector<int32_t>& ids) const;

 private:
  std::vector<std::string> bytes_;
};

}  // namespace r1lab::model
