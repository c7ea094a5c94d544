// DeepSeek-R1's language-consistency reward: the fraction of the words of the reasoning written in the
// target language, so that chains of thought stop mixing languages.
//
// Languages are told apart by their Unicode script (ICU): Latin, Han, Hiragana/Katakana, Hangul,
// Cyrillic, Arabic, Devanagari, Greek, Hebrew, Thai, ... A word is a run of letters of one script; in
// scripts written without spaces (Han, kana, Thai) every letter counts as a word. Code (``` fences and
// `inline`) and math ($...$, \(...\), \[...\], LaTeX commands) are left out. Two languages of one
// script (English and French) are not told apart.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "rewards/reward.h"

namespace r1lab::rewards {

// Script classes of a language code ("en", "zh", "ja", "ru", ...) or a script name ("latin", "han",
// "cyrillic", ...); INVALID_ARGUMENT for an unknown one.
absl::StatusOr<std::vector<std::string>> language_scripts(std::string_view language);

struct WordCounts {
  int64_t total = 0;
  std::vector<std::pair<std::string, int64_t>> by_script;  // script class -> words, largest first
};
// Counts the words of prose text by script class, code and math left out. Invalid UTF-8 bytes are
// skipped.
WordCounts count_words(std::string_view text);

// The script class most of the prompt is written in ("latin" for an empty prompt).
std::string dominant_script(std::string_view text);

// value = words in the target scripts / all words of the reasoning (1 when there are no words).
// params: {"language": "en" | "zh" | ... | "auto" (the prompt's dominant script, the default),
//          "scope": "think" (inside <think>...</think>, the whole completion when absent; default) | "all"}.
// Components: "language.words" (the count judged).
class LanguageConsistencyReward final : public RewardFn {
 public:
  static absl::StatusOr<std::unique_ptr<LanguageConsistencyReward>> make(const nlohmann::json& params);
  Score score(const Sample& s) const override;

 private:
  std::optional<std::vector<std::string>> target_;  // nullopt: from the prompt
  bool think_only_ = true;
};

}  // namespace r1lab::rewards
