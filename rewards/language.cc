#include "rewards/language.h"

#include <algorithm>
#include <map>

#include <unicode/uchar.h>
#include <unicode/uscript.h>
#include <unicode/utf8.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace r1lab::rewards {
namespace {

// The class a script belongs to: Japanese kana join Han's neighbours under their own names; scripts
// used by a single language keep their ICU short name.
std::string script_class(UScriptCode sc) {
  switch (sc) {
    case USCRIPT_LATIN:
      return "latin";
    case USCRIPT_HAN:
      return "han";
    case USCRIPT_HIRAGANA:
    case USCRIPT_KATAKANA:
      return "kana";
    case USCRIPT_HANGUL:
      return "hangul";
    case USCRIPT_CYRILLIC:
      return "cyrillic";
    case USCRIPT_ARABIC:
      return "arabic";
    case USCRIPT_DEVANAGARI:
      return "devanagari";
    case USCRIPT_GREEK:
      return "greek";
    case USCRIPT_HEBREW:
      return "hebrew";
    case USCRIPT_THAI:
      return "thai";
    default: {
      std::string name = uscript_getName(sc) ? uscript_getName(sc) : "other";
      absl::AsciiStrToLower(&name);
      return name;
    }
  }
}

bool unspaced(UScriptCode sc) {
  return sc == USCRIPT_HAN || sc == USCRIPT_HIRAGANA || sc == USCRIPT_KATAKANA || sc == USCRIPT_THAI ||
         sc == USCRIPT_LAO || sc == USCRIPT_KHMER || sc == USCRIPT_MYANMAR;
}

// The text with code, math and tags (<think>) replaced by spaces.
std::string prose(std::string_view t) {
  std::string out;
  out.reserve(t.size());
  size_t i = 0;
  auto skip_to = [&](std::string_view close, size_t from) {
    const size_t e = t.find(close, from);
    i = e == std::string_view::npos ? t.size() : e + close.size();
    out.push_back(' ');
  };
  while (i < t.size()) {
    const std::string_view rest = t.substr(i);
    if (rest.substr(0, 3) == "```") {
      skip_to("```", i + 3);
    } else if (rest[0] == '`') {
      skip_to("`", i + 1);
    } else if (rest.substr(0, 2) == "$$") {
      skip_to("$$", i + 2);
    } else if (rest[0] == '$') {
      skip_to("$", i + 1);
    } else if (rest.substr(0, 2) == "\\(") {
      skip_to("\\)", i + 2);
    } else if (rest.substr(0, 2) == "\\[") {
      skip_to("\\]", i + 2);
    } else if (rest[0] == '<' && rest.size() > 2 && rest.find('>') != std::string_view::npos &&
               rest.find('>') < 32 && (absl::ascii_isalpha(static_cast<unsigned char>(rest[1])) || rest[1] == '/')) {
      i += rest.find('>') + 1;  // a tag: <think>, </answer>
      out.push_back(' ');
    } else if (rest[0] == '\\') {  // a LaTeX command outside math: \frac, \alpha
      ++i;
      while (i < t.size() && absl::ascii_isalpha(static_cast<unsigned char>(t[i]))) ++i;
      out.push_back(' ');
    } else {
      out.push_back(t[i++]);
    }
  }
  return out;
}

}  // namespace

WordCounts count_words(std::string_view text) {
  const std::string p = prose(text);
  std::map<std::string, int64_t> counts;
  WordCounts out;
  UScriptCode current = USCRIPT_INVALID_CODE;  // the script of the word being read
  const auto* s = reinterpret_cast<const uint8_t*>(p.data());
  const int32_t n = static_cast<int32_t>(std::min<size_t>(p.size(), INT32_MAX));
  for (int32_t i = 0; i < n;) {
    UChar32 c;
    U8_NEXT(s, i, n, c);
    if (c < 0 || !u_isalpha(c)) {
      current = USCRIPT_INVALID_CODE;
      continue;
    }
    UErrorCode err = U_ZERO_ERROR;
    const UScriptCode sc = uscript_getScript(c, &err);
    if (U_FAILURE(err) || sc == USCRIPT_COMMON || sc == USCRIPT_INHERITED) continue;
    if (sc != current || unspaced(sc)) {
      ++counts[script_class(sc)];
      ++out.total;
    }
    current = sc;
  }
  for (const auto& [k, v] : counts) out.by_script.emplace_back(k, v);
  std::sort(out.by_script.begin(), out.by_script.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  return out;
}

std::string dominant_script(std::string_view text) {
  const WordCounts c = count_words(text);
  if (c.by_script.empty()) return "latin";
  // Japanese prompts mix kana and Han; kana marks the language.
  for (const auto& [script, n] : c.by_script)
    if (script == "kana" && n * 5 >= c.total) return "kana";
  return c.by_script.front().first;
}

absl::StatusOr<std::vector<std::string>> language_scripts(std::string_view language) {
  std::string l(language);
  absl::AsciiStrToLower(&l);
  static const std::map<std::string, std::vector<std::string>> kLanguages = {
      {"zh", {"han"}},          {"ja", {"han", "kana"}},  {"ko", {"hangul", "han"}}, {"ru", {"cyrillic"}},
      {"uk", {"cyrillic"}},     {"bg", {"cyrillic"}},     {"sr", {"cyrillic"}},      {"ar", {"arabic"}},
      {"fa", {"arabic"}},       {"ur", {"arabic"}},       {"hi", {"devanagari"}},    {"mr", {"devanagari"}},
      {"ne", {"devanagari"}},   {"el", {"greek"}},        {"he", {"hebrew"}},        {"th", {"thai"}},
      {"kana", {"han", "kana"}}, {"hangul", {"hangul", "han"}}};
  if (auto it = kLanguages.find(l); it != kLanguages.end()) return it->second;
  static const std::vector<std::string> kLatin = {"en", "fr", "de", "es", "it", "pt", "nl", "pl", "tr", "vi",
                                                  "id", "sv", "da", "no", "fi", "cs", "ro", "hu", "ms", "sw"};
  if (std::find(kLatin.begin(), kLatin.end(), l) != kLatin.end()) return std::vector<std::string>{"latin"};
  static const std::vector<std::string> kScripts = {"latin", "han", "cyrillic", "arabic", "devanagari",
                                                    "greek", "hebrew", "thai", "bengali", "tamil", "armenian",
                                                    "georgian"};
  if (std::find(kScripts.begin(), kScripts.end(), l) != kScripts.end()) return std::vector<std::string>{l};
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown language '", std::string(language), "' (a code such as en, zh, ja, ko, ru, ar, hi, or a script such as latin)"));
}

absl::StatusOr<std::unique_ptr<LanguageConsistencyReward>> LanguageConsistencyReward::make(const nlohmann::json& p) {
  auto r = std::unique_ptr<LanguageConsistencyReward>(new LanguageConsistencyReward());
  if (p.contains("language")) {
    if (!p["language"].is_string()) return absl::InvalidArgumentError("language: 'language' must be a string");
    const std::string lang = p["language"].get<std::string>();
    if (lang != "auto") {
      auto scripts = language_scripts(lang);
      if (!scripts.ok()) return absl::InvalidArgumentError(absl::StrCat("language: ", scripts.status().message()));
      r->target_ = *scripts;
    }
  }
  if (p.contains("scope")) {
    if (!p["scope"].is_string() || (p["scope"] != "think" && p["scope"] != "all"))
      return absl::InvalidArgumentError("language: 'scope' must be \"think\" or \"all\"");
    r->think_only_ = p["scope"] == "think";
  }
  return r;
}

Score LanguageConsistencyReward::score(const Sample& s) const {
  Score out;
  std::string_view text = s.completion;
  if (think_only_) {
    const size_t open = text.find("<think>");
    if (open != std::string_view::npos) {
      const size_t start = open + 7;
      const size_t close = text.find("</think>", start);
      text = text.substr(start, close == std::string_view::npos ? std::string_view::npos : close - start);
    }
  }
  std::vector<std::string> target;
  if (target_) {
    target = *target_;
  } else {
    auto scripts = language_scripts(dominant_script(s.prompt));
    target = scripts.ok() ? *scripts : std::vector<std::string>{dominant_script(s.prompt)};
  }
  const WordCounts c = count_words(text);
  out.components["language.words"] = static_cast<double>(c.total);
  if (c.total == 0) {
    out.value = 1.0;
    return out;
  }
  int64_t in_target = 0;
  for (const auto& [script, n] : c.by_script)
    if (std::find(target.begin(), target.end(), script) != target.end()) in_target += n;
  out.value = static_cast<double>(in_target) / static_cast<double>(c.total);
  return out;
}

}  // namespace r1lab::rewards
