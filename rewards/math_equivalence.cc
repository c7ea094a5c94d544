#include "rewards/math_equivalence.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>

#include "absl/strings/ascii.h"
#include "absl/strings/str_replace.h"
#include "rewards/math_expr.h"
#include "rewards/rules.h"

namespace r1lab::rewards {
namespace {

// Answers longer than this are not parsed (a real answer is short; a runaway one is wrong). Gold
// answers are not limited.
constexpr size_t kMaxAnswer = 8192;

// std::string_view helpers (this Abseil's string_view is its own type).
bool starts(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends(std::string_view s, std::string_view p) { return s.size() >= p.size() && s.substr(s.size() - p.size()) == p; }
bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (absl::ascii_tolower(static_cast<unsigned char>(a[i])) != absl::ascii_tolower(static_cast<unsigned char>(b[i])))
      return false;
  return true;
}
template <typename... T>
std::string cat(const T&... parts) {
  std::string out;
  (out.append(std::string_view(parts)), ...);
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && absl::ascii_isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && absl::ascii_isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// The index just past the brace group that opens at s[open] ('{'), or npos when it is not closed.
size_t close_brace(std::string_view s, size_t open) {
  int depth = 0;
  for (size_t i = open; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
      ++i;
      continue;
    }
    if (s[i] == '{') ++depth;
    if (s[i] == '}' && --depth == 0) return i + 1;
  }
  return std::string_view::npos;
}

// Words that are units (or counted things) when they follow a number; dropped from answers.
constexpr std::string_view kUnits[] = {
    "cm", "mm", "km", "m", "meter", "meters", "metre", "metres", "centimeter", "centimeters", "kilometer",
    "kilometers", "millimeter", "millimeters", "in", "inch", "inches", "ft", "feet", "foot", "yd", "yard",
    "yards", "mile", "miles", "mph", "kmh", "sec", "second", "seconds", "min", "minute", "minutes", "hr",
    "hrs", "hour", "hours", "day", "days", "week", "weeks", "month", "months", "year", "years", "dollar",
    "dollars", "cent", "cents", "g", "gram", "grams", "kg", "kilogram", "kilograms", "lb", "lbs", "pound",
    "pounds", "oz", "ounce", "ounces", "l", "liter", "liters", "litre", "litres", "ml", "gallon", "gallons",
    "degree", "degrees", "deg", "unit", "units", "sq", "square", "cubic", "cu", "per", "people", "persons",
    "students", "ways", "times", "apples", "cookies", "marbles", "pages", "points", "items", "usd", "euros",
    "euro", "rupees", "yuan", "sqft", "mi"};

bool is_unit(std::string_view w) {
  std::string lower(w);
  absl::AsciiStrToLower(&lower);
  return std::find(std::begin(kUnits), std::end(kUnits), lower) != std::end(kUnits);
}

// Whether a \text{} content is only units ("cm", " square units", "miles per hour").
bool is_unit_phrase(std::string_view t) {
  bool any = false;
  size_t i = 0;
  while (i < t.size()) {
    if (!is_alpha(t[i])) {
      if (t[i] != ' ' && t[i] != '^' && !is_digit(t[i]) && t[i] != '{' && t[i] != '}' && t[i] != '.' && t[i] != '/')
        return false;
      ++i;
      continue;
    }
    size_t j = i;
    while (j < t.size() && is_alpha(t[j])) ++j;
    if (!is_unit(t.substr(i, j - i))) return false;
    any = true;
    i = j;
  }
  return any;
}

constexpr std::string_view kTextCommands[] = {"\\text",   "\\textbf",     "\\textit", "\\textrm",  "\\mathrm",
                                              "\\mathbf", "\\mathit",     "\\mbox",   "\\textnormal",
                                              "\\operatorname", "\\mathsf", "\\textsf", "\\rm", "\\mathtt"};

// Replaces \text{...} and its kin: units vanish, "and"/"or" separate answers, letters or math stay,
// anything else becomes an opaque \atom{word}.
std::string replace_text_commands(std::string s) {
  for (int guard = 0; guard < 64; ++guard) {
    size_t best = std::string::npos, cmd_len = 0;
    for (std::string_view cmd : kTextCommands) {
      size_t at = s.find(cmd);
      while (at != std::string::npos) {
        const size_t after = at + cmd.size();
        if (after < s.size() && (s[after] == '{' || s[after] == ' ') && !(after < s.size() && is_alpha(s[after]))) break;
        at = s.find(cmd, at + 1);
      }
      if (at != std::string::npos && (best == std::string::npos || at < best || (at == best && cmd.size() > cmd_len))) {
        best = at;
        cmd_len = cmd.size();
      }
    }
    if (best == std::string::npos) break;
    size_t open = best + cmd_len;
    while (open < s.size() && s[open] == ' ') ++open;
    if (open >= s.size() || s[open] != '{') {
      s.erase(best, cmd_len);
      continue;
    }
    size_t close = close_brace(s, open);
    if (close == std::string::npos) {
      s.erase(best, open + 1 - best);
      continue;
    }
    std::string content(trim(std::string_view(s).substr(open + 1, close - open - 2)));
    std::string lower = content;
    absl::AsciiStrToLower(&lower);
    std::string repl;
    if (content.empty() || is_unit_phrase(content)) {
      repl = " ";
      // \text{ cm}^2: the unit's exponent goes too.
      size_t after = close;
      if (after + 1 < s.size() && s[after] == '^' && is_digit(s[after + 1])) {
        close = after + 2;
      } else if (after + 3 < s.size() && s[after] == '^' && s[after + 1] == '{' && is_digit(s[after + 2]) &&
                 s[after + 3] == '}') {
        close = after + 4;
      }
    } else if (lower == "and" || lower == "or" || lower == ",") {
      repl = lower == "," ? "," : " and ";
    } else if (lower == "percent" || lower == "%") {
      repl = "%";
    } else if (content.size() <= 2 || std::all_of(content.begin(), content.end(), [](char c) {
                 return !is_alpha(c);
               })) {
      repl = content;  // \mathbf{v}, \mathrm{d}, \text{(A)}
    } else {
      // An opaque word: compared as written, case and spacing aside.
      std::string word;
      for (char c : lower)
        if (c != ' ' && c != '{' && c != '}' && c != '\\') word.push_back(c);
      repl = cat("\\atom{", word, "}");
    }
    s.replace(best, close - best, repl);
  }
  return s;
}

// Drops unit words (with ^2 / ^3) from the end: "125 miles", "15 cm^2", "4 square feet".
void strip_trailing_units(std::string& s) {
  for (int guard = 0; guard < 8; ++guard) {
    std::string_view t = trim(s);
    size_t end = t.size();
    // An exponent on the unit: ^2, ^{2}.
    size_t e = end;
    if (e >= 2 && is_digit(t[e - 1]) && t[e - 2] == '^') e -= 2;
    if (e >= 4 && t[e - 1] == '}' && is_digit(t[e - 2]) && t[e - 3] == '{' && t[e - 4] == '^') e -= 4;
    size_t b = e;
    while (b > 0 && is_alpha(t[b - 1])) --b;
    if (b == e || b == 0) return;
    const char before = t[b - 1];
    if (!(before == ' ' || is_digit(before) || before == '}' || before == ')')) return;
    const std::string_view word = t.substr(b, e - b);
    if (!is_unit(word)) return;
    // A lone letter after a digit with no space is a variable (2m could be 2·m), except m and cm.
    if (word.size() == 1 && before != ' ') return;
    s = std::string(trim(t.substr(0, b)));
  }
}

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return is_digit(c); });
}

// 7,425,000 / 7 425 000 / 1,000.99 -> digits only (a whole answer that is one grouped number).
void strip_thousands(std::string& s) {
  std::string_view t = s;
  std::string_view sign;
  if (!t.empty() && t[0] == '-') {
    sign = t.substr(0, 1);
    t.remove_prefix(1);
  }
  for (char sep : {',', ' '}) {
    if (t.find(sep) == std::string_view::npos) continue;
    std::string_view frac;
    std::string_view whole = t;
    if (const size_t dot = t.find('.'); dot != std::string_view::npos) {
      whole = t.substr(0, dot);
      frac = t.substr(dot);
      if (!all_digits(frac.substr(1))) return;
    }
    std::vector<std::string_view> groups;
    size_t start = 0;
    for (size_t i = 0; i <= whole.size(); ++i) {
      if (i == whole.size() || whole[i] == sep) {
        groups.push_back(whole.substr(start, i - start));
        start = i + 1;
      }
    }
    if (groups.size() < 2 || groups[0].empty() || groups[0].size() > 3 || !all_digits(groups[0])) continue;
    bool ok = true;
    for (size_t g = 1; g < groups.size(); ++g) ok = ok && groups[g].size() == 3 && all_digits(groups[g]);
    if (!ok) continue;
    std::string out(sign);
    for (std::string_view g : groups) out.append(g);
    out.append(frac);
    s = out;
    return;
  }
}

}  // namespace

std::optional<std::string> last_boxed(std::string_view text) {
  size_t at = std::string_view::npos;
  size_t len = 0;
  for (std::string_view cmd : {std::string_view("\\boxed"), std::string_view("\\fbox")}) {
    const size_t p = rfind_bytes(text, cmd);
    if (p != std::string_view::npos && (at == std::string_view::npos || p > at)) {
      at = p;
      len = cmd.size();
    }
  }
  if (at == std::string_view::npos) return std::nullopt;
  size_t i = at + len;
  while (i < text.size() && text[i] == ' ') ++i;
  if (i < text.size() && text[i] == '{') {
    const size_t close = close_brace(text, i);
    if (close == std::string_view::npos) return std::nullopt;
    return std::string(text.substr(i + 1, close - i - 2));
  }
  // \boxed 5: the next token.
  size_t j = i;
  while (j < text.size() && !absl::ascii_isspace(static_cast<unsigned char>(text[j])) && text[j] != '$') ++j;
  if (j == i) return std::nullopt;
  return std::string(text.substr(i, j - i));
}

absl::StatusOr<AnswerSource> parse_answer_source(std::string_view name) {
  if (name == "answer_tag") return AnswerSource::kAnswerTag;
  if (name == "boxed") return AnswerSource::kBoxed;
  if (name == "answer_is") return AnswerSource::kAnswerIs;
  if (name == "last_math") return AnswerSource::kLastMath;
  if (name == "last_number") return AnswerSource::kLastNumber;
  return absl::InvalidArgumentError(
      cat("unknown answer source '", name, "' (answer_tag, boxed, answer_is, last_math, last_number)"));
}

std::vector<AnswerSource> default_answer_sources() {
  return {AnswerSource::kAnswerTag, AnswerSource::kBoxed, AnswerSource::kAnswerIs, AnswerSource::kLastMath,
          AnswerSource::kLastNumber};
}

namespace {

std::optional<std::string> from_answer_tag(std::string_view c) {
  auto inner = extract_answer(c);
  if (!inner) return std::nullopt;
  if (auto boxed = last_boxed(*inner)) return boxed;
  return inner;
}

// "... the answer is $42$." / "Final Answer: 42" -> the math or text that follows, to the sentence end.
std::optional<std::string> from_answer_is(std::string_view c) {
  // Case-insensitive search for the last marker without copying the whole completion.
  auto last_ci = [&](std::string_view needle) {
    const char first = static_cast<char>(absl::ascii_tolower(static_cast<unsigned char>(needle[0])));
    for (size_t i = c.size() >= needle.size() ? c.size() - needle.size() + 1 : 0; i-- > 0;) {
      if ((c[i] | 0x20) != first) continue;  // a cheap first-letter filter (needles start with a letter)
      if (iequals(c.substr(i, needle.size()), needle)) return i + needle.size();
    }
    return std::string_view::npos;
  };
  size_t at = std::string_view::npos;
  for (std::string_view m : {std::string_view("answer is"), std::string_view("answer:")}) {
    const size_t p = last_ci(m);
    if (p != std::string_view::npos && (at == std::string_view::npos || p > at)) at = p;
  }
  if (at == std::string_view::npos) return std::nullopt;
  std::string_view rest = c.substr(at);
  while (!rest.empty() && (rest.front() == ' ' || rest.front() == ':')) rest.remove_prefix(1);
  if (auto boxed = last_boxed(rest.substr(0, std::min<size_t>(rest.size(), 4096)))) return boxed;
  for (auto [open, close] : {std::pair<std::string_view, std::string_view>{"$$", "$$"}, {"$", "$"}, {"\\(", "\\)"},
                             {"\\[", "\\]"}}) {
    if (starts(rest, open)) {
      const size_t end = rest.find(close, open.size());
      if (end == std::string_view::npos) break;
      return std::string(trim(rest.substr(open.size(), end - open.size())));
    }
  }
  size_t end = rest.find('\n');
  if (end == std::string_view::npos) end = rest.size();
  for (size_t i = 0; i + 1 < end; ++i) {
    if (rest[i] == '.' && rest[i + 1] == ' ') {
      end = i;
      break;
    }
  }
  std::string_view ans = trim(rest.substr(0, end));
  while (!ans.empty() && (ans.back() == '.' || ans.back() == ',')) ans.remove_suffix(1);
  if (ans.empty()) return std::nullopt;
  return std::string(ans);
}

// The last display or inline math: $...$, $$...$$, \(...\), \[...\].
std::optional<std::string> from_last_math(std::string_view c) {
  size_t best_end = std::string_view::npos;
  std::optional<std::string> best;
  for (auto [open, close] : {std::pair<std::string_view, std::string_view>{"\\(", "\\)"}, {"\\[", "\\]"}}) {
    const size_t e = rfind_bytes(c, close);
    if (e == std::string_view::npos) continue;
    const size_t b = rfind_bytes(c, open, e);
    if (b == std::string_view::npos) continue;
    if (best_end == std::string_view::npos || e > best_end) {
      best_end = e;
      best = std::string(trim(c.substr(b + open.size(), e - b - open.size())));
    }
  }
  // Dollars: the last pair of unescaped $ (or $$).
  size_t e = c.size();
  while (e > 0) {
    e = rfind_bytes(c, "$", e - 1);
    if (e == std::string_view::npos || e == 0 || c[e - 1] != '\\') break;
  }
  if (e != std::string_view::npos && e > 0 && (best_end == std::string_view::npos || e > best_end)) {
    size_t close_start = e;
    if (c[e - 1] == '$') --close_start;
    size_t b = close_start;
    while (b > 0) {
      b = rfind_bytes(c, "$", b - 1);
      if (b == std::string_view::npos || b == 0 || c[b - 1] != '\\') break;
    }
    if (b != std::string_view::npos && b < close_start) {
      size_t inner = b + 1;
      if (close_start != e && b > 0 && c[b - 1] == '$') inner = b + 1;
      std::string_view body = trim(c.substr(inner, close_start - inner));
      if (!body.empty()) best = std::string(body);
    }
  }
  return best;
}

// The last number in the text: -1,234.5 or 3/4.
std::optional<std::string> from_last_number(std::string_view c) {
  size_t i = c.size();
  while (i > 0 && !is_digit(c[i - 1])) --i;
  if (i == 0) return std::nullopt;
  const size_t end = i;
  while (i > 0 && end - i <= kMaxAnswer &&
         (is_digit(c[i - 1]) || ((c[i - 1] == '.' || c[i - 1] == ',' || c[i - 1] == '/') && i >= 2 && is_digit(c[i - 2]))))
    --i;
  if (i > 0 && c[i - 1] == '-') --i;
  if (end - i > kMaxAnswer) return std::nullopt;  // a runaway string of digits is not an answer
  return std::string(c.substr(i, end - i));
}

}  // namespace

std::optional<std::string> extract_math_answer(std::string_view completion, const std::vector<AnswerSource>& order) {
  for (AnswerSource src : order) {
    std::optional<std::string> a;
    switch (src) {
      case AnswerSource::kAnswerTag:
        a = from_answer_tag(completion);
        break;
      case AnswerSource::kBoxed:
        a = last_boxed(completion);
        break;
      case AnswerSource::kAnswerIs:
        a = from_answer_is(completion);
        break;
      case AnswerSource::kLastMath:
        a = from_last_math(completion);
        break;
      case AnswerSource::kLastNumber:
        a = from_last_number(completion);
        break;
    }
    if (a && !trim(*a).empty()) return a;
    if (a && src == AnswerSource::kAnswerTag) return std::nullopt;  // an empty <answer></answer> is no answer
  }
  return std::nullopt;
}

std::string normalise_math(std::string_view answer) {
  std::string s(trim(answer));
  // Unicode forms models write.
  s = absl::StrReplaceAll(s, {{"\xe2\x88\x92", "-"},       // − minus
                              {"\xc3\x97", "\\times "},     // ×
                              {"\xc3\xb7", "\\div "},       // ÷
                              {"\xc2\xb7", "\\cdot "},      // ·
                              {"\xe2\x8b\x85", "\\cdot "},  // ⋅
                              {"\xcf\x80", "\\pi "},        // π
                              {"\xe2\x88\x9e", "\\infty "}, // ∞
                              {"\xe2\x88\x9a", "\\sqrt "},  // √
                              {"\xc2\xb0", ""},             // °
                              {"\xe2\x89\xa4", "\\le "},    // ≤
                              {"\xe2\x89\xa5", "\\ge "},    // ≥
                              {"\xe2\x89\xa0", "\\ne "},    // ≠
                              {"\xe2\x88\xaa", "\\cup "},   // ∪
                              {"\xc2\xb1", "\\pm "},        // ±
                              {"\xe2\x82\xac", ""},         // €
                              {"\xc2\xa3", ""},             // £
                              {"\xc2\xb2", "^2"},           // ²
                              {"\xc2\xb3", "^3"},           // ³
                              {"\xc2\xa0", " "}});          // no-break space
  // Line breaks (\\) are kept apart from the spacing commands (\ , \,) until the end.
  s = absl::StrReplaceAll(s, {{"\\\\", "\x01"}});
  s = absl::StrReplaceAll(s, {{"\\!", ""}, {"\\,", " "}, {"\\;", " "}, {"\\:", " "}, {"\\ ", " "},
                              {"\\qquad", " "}, {"\\quad", " "}, {"{, }", ""}, {"{ ,}", ""}, {"{,}", ""}});
  // Wrappers, repeatedly: $...$, \(...\), \[...\], \boxed{...}, a trailing period.
  for (int guard = 0; guard < 8; ++guard) {
    std::string_view t = trim(s);
    while (!t.empty() && (t.back() == '.' || t.back() == ',' || t.back() == ';')) t = trim(t.substr(0, t.size() - 1));
    if (starts(t, "\\boxed") || starts(t, "\\fbox")) {
      if (auto inner = last_boxed(t); inner && ends(t, "}")) {
        s = *inner;
        continue;
      }
    }
    bool changed = false;
    for (auto [open, close] : {std::pair<std::string_view, std::string_view>{"$$", "$$"}, {"$", "$"}, {"\\(", "\\)"},
                               {"\\[", "\\]"}}) {
      if (t.size() >= open.size() + close.size() && starts(t, open) && ends(t, close)) {
        t = t.substr(open.size(), t.size() - open.size() - close.size());
        changed = true;
        break;
      }
    }
    s = std::string(t);
    if (!changed) break;
  }
  if (s.find("\\boxed") != std::string::npos)
    if (auto inner = last_boxed(s)) s = *inner;
  s = absl::StrReplaceAll(s, {{"\\left", ""},        {"\\right", ""},      {"\\bigl", ""},   {"\\bigr", ""},
                              {"\\Bigl", ""},        {"\\Bigr", ""},       {"\\big", ""},    {"\\Big", ""},
                              {"\\displaystyle", ""}, {"\\!", ""},         {"\\,", " "},     {"\\;", " "},
                              {"\\:", " "},          {"\\ ", " "},         {"\\qquad", " "}, {"\\quad", " "},
                              {"~", " "},            {"\\dfrac", "\\frac"}, {"\\tfrac", "\\frac"},
                              {"\\cfrac", "\\frac"}, {"^{\\circ}", ""},    {"^\\circ", ""},  {"\\circ", ""},
                              {"\\degree", ""},      {"{,}", ""},          {"\\%", "%"},     {"\\$", ""},
                              {"$", ""},             {"\\leqslant", "\\le"}, {"\\geqslant", "\\ge"},
                              {"\\dots", ""},        {"\\ldots", ""},      {"\\cdots", ""},  {"\\neq", "\\ne"},
                              {"\\leq", "\\le"},     {"\\geq", "\\ge"},    {"\\lt", "<"},    {"\\gt", ">"},
                              {"\\infinity", "\\infty"}, {"\\tfrac", "\\frac"}, {"\\mid", "|"},
                              {"\\lvert", "|"}, {"**", "^"},      {"\\rvert", "|"},     {"\\vert", "|"}});
  s = replace_text_commands(std::move(s));
  // Percent words become a trailing '%'.
  for (std::string_view w : {" percentage", " percent", " pct", "percent", "pct"}) {
    std::string_view t = trim(s);
    if (ends(t, w)) {
      s = cat(trim(t.substr(0, t.size() - w.size())), "%");
      break;
    }
  }
  strip_trailing_units(s);
  {
    std::string_view t = trim(s);
    while (!t.empty() && (t.back() == '.' || t.back() == ',')) t = trim(t.substr(0, t.size() - 1));
    s = std::string(t);
  }
  strip_thousands(s);
  s = absl::StrReplaceAll(s, {{"\x01", "\\\\"}});
  // Collapse whitespace.
  std::string out;
  out.reserve(s.size());
  bool space = false;
  for (char c : s) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c))) {
      space = !out.empty();
      continue;
    }
    if (space) out.push_back(' ');
    space = false;
    out.push_back(c);
  }
  return out;
}

namespace {

// ---- structure

struct Answer {
  enum class Kind { kExpr, kText, kTuple, kSet, kList, kUnion, kMatrix, kRelation };
  Kind kind = Kind::kText;
  std::optional<math::Expr> expr;
  bool percent = false;
  bool from_pm = false;         // a kSet made from a ± (flattened into enclosing lists and sets)
  std::string text;             // the written form without spaces (identical forms are equal)
  char open = 0, close = 0;     // kTuple brackets
  std::vector<Answer> items;    // kTuple/kSet/kList/kUnion items, kMatrix rows, kRelation sides
  std::vector<std::string> ops; // kRelation: the operators between sides: = < <= !=  (and > >= as written)
};

using Kind = Answer::Kind;

// Splits at every top-level occurrence of one of `seps` (outside (), [], {}).
std::vector<std::string_view> split_top(std::string_view s, std::initializer_list<std::string_view> seps,
                                        std::vector<std::string_view>* found = nullptr) {
  std::vector<std::string_view> parts;
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '(' || c == '[' || c == '{') {
      ++depth;
      continue;
    }
    if (c == ')' || c == ']' || c == '}') {
      --depth;
      continue;
    }
    if (depth != 0) continue;
    for (std::string_view sep : seps) {
      if (s.substr(i, sep.size()) == sep) {
        // \le must not match the start of \left (removed already) and similar longer commands.
        if (sep.front() == '\\' && i + sep.size() < s.size() && is_alpha(s[i + sep.size()])) continue;
        parts.push_back(s.substr(start, i - start));
        if (found) found->push_back(sep);
        i += sep.size() - 1;
        start = i + 1;
        break;
      }
    }
  }
  parts.push_back(s.substr(start));
  return parts;
}

// Whether the bracket at s[0] is closed by the last character (not earlier).
bool wrapped(std::string_view s) {
  if (s.size() < 2) return false;
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '(' || c == '[' || c == '{') ++depth;
    if (c == ')' || c == ']' || c == '}') {
      if (--depth == 0) return i == s.size() - 1;
    }
  }
  return false;
}

std::string squash(std::string_view s) {
  std::string out;
  for (char c : s)
    if (c != ' ') out.push_back(c);
  return out;
}

Answer parse_answer(std::string_view s, int depth);

Answer parse_list(Kind kind, const std::vector<std::string_view>& parts, int depth) {
  Answer a;
  a.kind = kind;
  for (std::string_view p : parts) {
    Answer item = parse_answer(p, depth + 1);
    if (item.kind == Kind::kSet && item.from_pm) {
      for (Answer& x : item.items) a.items.push_back(std::move(x));
    } else {
      a.items.push_back(std::move(item));
    }
  }
  return a;
}

Answer parse_answer(std::string_view s, int depth) {
  s = trim(s);
  Answer a;
  a.text = squash(s);
  if (depth > 16 || s.empty()) return a;
  // x \in S: the set.
  if (s.size() > 4 && is_alpha(s[0])) {
    std::string_view rest = trim(s.substr(1));
    if (starts(rest, "\\in") && !(rest.size() > 3 && is_alpha(rest[3]))) return parse_answer(rest.substr(3), depth + 1);
  }
  // Several answers: "3 and 5", "x = 1; y = 2".
  if (auto parts = split_top(s, {" and ", " or ", ";"}); parts.size() > 1) return parse_list(Kind::kList, parts, depth);
  // A matrix, also inside brackets: \left[\begin{array}...\end{array}\right].
  if ((s[0] == '[' || s[0] == '(') && (s.back() == ']' || s.back() == ')') && wrapped(s) &&
      starts(trim(s.substr(1)), "\\begin{"))
    return parse_answer(s.substr(1, s.size() - 2), depth + 1);
  for (std::string_view env : {"pmatrix", "bmatrix", "matrix", "vmatrix", "Bmatrix", "array", "smallmatrix"}) {
    const std::string begin = cat("\\begin{", env, "}"), end = cat("\\end{", env, "}");
    if (starts(s, begin) && ends(s, end)) {
      std::string_view body = s.substr(begin.size(), s.size() - begin.size() - end.size());
      if (env == "array" && starts(trim(body), "{")) {  // the column spec
        body = trim(body);
        const size_t close = close_brace(body, 0);
        if (close == std::string_view::npos) return a;
        body = body.substr(close);
      }
      a.kind = Kind::kMatrix;
      for (std::string_view row : split_top(body, {"\\\\"})) {
        if (trim(row).empty()) continue;
        a.items.push_back(parse_list(Kind::kTuple, split_top(row, {"&"}), depth));
      }
      return a;
    }
  }
  // A list of answers: "-2, 1".
  if (auto parts = split_top(s, {","}); parts.size() > 1) return parse_list(Kind::kList, parts, depth);
  // A relation: x = 5, 2x + 4y - 3 = 0, x \ge 5, f(2) < f(1) < f(4).
  {
    std::vector<std::string_view> ops;
    auto sides = split_top(s, {"<=", ">=", "!=", "\\le", "\\ge", "\\ne", "\\approx", "=", "<", ">"}, &ops);
    if (sides.size() > 1) {
      a.kind = Kind::kRelation;
      for (std::string_view side : sides) a.items.push_back(parse_answer(side, depth + 1));
      for (std::string_view op : ops) {
        if (op == "\\le") op = "<=";
        if (op == "\\ge") op = ">=";
        if (op == "\\ne") op = "!=";
        if (op == "\\approx") op = "=";
        a.ops.emplace_back(op);
      }
      return a;
    }
  }
  // A union of intervals or sets.
  if (auto parts = split_top(s, {"\\cup"}); parts.size() > 1) return parse_list(Kind::kUnion, parts, depth);
  // A set \{...\}.
  if (starts(s, "\\{") && ends(s, "\\}")) {
    std::string_view body = s.substr(2, s.size() - 4);
    Answer set = parse_list(Kind::kSet, split_top(body, {","}), depth);
    set.text = a.text;
    return set;
  }
  // A tuple or interval: (1, 2), [0, 1), (-\infty, 3].
  if ((s[0] == '(' || s[0] == '[') && (s.back() == ')' || s.back() == ']') && wrapped(s)) {
    auto parts = split_top(s.substr(1, s.size() - 2), {","});
    if (parts.size() > 1) {
      Answer t = parse_list(Kind::kTuple, parts, depth);
      t.open = s[0];
      t.close = s.back();
      t.text = a.text;
      return t;
    }
  }
  // a \pm b: both values.
  if (const size_t pm = s.find("\\pm"); pm != std::string_view::npos) {
    Answer set;
    set.kind = Kind::kSet;
    set.from_pm = true;
    set.text = a.text;
    for (std::string_view sign : {"+", "-"}) {
      const std::string one = cat(s.substr(0, pm), sign, s.substr(pm + 3));
      Answer x = parse_answer(one, depth + 1);
      if (x.kind == Kind::kSet && x.from_pm) {
        for (Answer& y : x.items) set.items.push_back(std::move(y));
      } else {
        set.items.push_back(std::move(x));
      }
    }
    return set;
  }
  std::string_view body = s;
  if (!body.empty() && body.back() == '%') {
    a.percent = true;
    body = trim(body.substr(0, body.size() - 1));
  }
  a.expr = math::parse_expr(body);
  if (a.expr) {
    a.kind = Kind::kExpr;
  } else {
    a.kind = Kind::kText;
    std::string lower = a.text;
    absl::AsciiStrToLower(&lower);
    a.text = absl::StrReplaceAll(lower, {{"{", ""}, {"}", ""}, {"\\atom", ""}});
  }
  return a;
}

// ---- comparison

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A value for symbol `name` at point k: the same on both sides; half the points positive, half negative.
double point_value(const std::string& name, int k) {
  uint64_t h = 1469598103934665603ULL;
  for (char c : name) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ULL;
  const double u = static_cast<double>(splitmix(h + static_cast<uint64_t>(k) * 7919) >> 11) / 9007199254740992.0;
  const double v = 0.25 + 1.75 * u;
  return k % 2 == 0 ? v : -v;
}

bool close_enough(double a, double b, double tol) {
  if (std::isinf(a) || std::isinf(b)) return a == b;
  if (std::isnan(a) || std::isnan(b)) return false;
  return std::fabs(a - b) <= tol * std::max(std::fabs(a), std::fabs(b)) + 1e-12;
}

struct Side {
  const math::Expr* e;
  mpq_class scale;  // 1 or 1/100 (a percentage read as a fraction)
};

std::vector<std::pair<std::string, double>> assignment(const std::vector<std::string>& names, int k) {
  std::vector<std::pair<std::string, double>> v;
  v.reserve(names.size());
  for (const std::string& n : names) v.emplace_back(n, point_value(n, k));
  return v;
}

std::vector<std::string> union_symbols(const math::Expr& a, const math::Expr& b) {
  std::vector<std::string> s = a.symbols(), t = b.symbols();
  s.insert(s.end(), t.begin(), t.end());
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
  return s;
}

bool values_equal(const Side& g, const Side& p, const MathOptions& o) {
  const std::vector<std::string> names = union_symbols(*g.e, *p.e);
  if (names.empty()) {
    auto eg = math::eval_exact(*g.e);
    auto ep = eg ? math::eval_exact(*p.e) : std::nullopt;
    if (eg && ep) {
      if (*eg * g.scale == *ep * p.scale) return true;
      if (!g.e->has_decimal() && !p.e->has_decimal()) return false;
    }
    const double tol = std::max({o.rel_tol, g.e->decimal_rel_precision(), p.e->decimal_rel_precision()}) * (1 + 1e-9);
    return close_enough(math::eval_double(*g.e, {}) * g.scale.get_d(), math::eval_double(*p.e, {}) * p.scale.get_d(),
                        tol);
  }
  int valid = 0;
  for (int k = 0; k < 2 * o.points && valid < o.points; ++k) {
    const auto at = assignment(names, k);
    const double a = math::eval_double(*g.e, at) * g.scale.get_d();
    const double b = math::eval_double(*p.e, at) * p.scale.get_d();
    if (!std::isfinite(a) || !std::isfinite(b)) {
      if (std::isfinite(a) != std::isfinite(b) && !std::isnan(a) && !std::isnan(b)) return false;
      continue;
    }
    if (!close_enough(a, b, std::max(o.rel_tol, 1e-9))) return false;
    ++valid;
  }
  return valid >= 3;
}

bool exprs_equal(const Answer& g, const Answer& p, const MathOptions& o) {
  std::vector<mpq_class> gs{1}, ps{1};
  if (o.percent_as_fraction) {
    if (g.percent) gs.emplace_back(1, 100);
    if (p.percent) ps.emplace_back(1, 100);
  }
  for (const mpq_class& a : gs)
    for (const mpq_class& b : ps)
      if (values_equal({&*g.expr, a}, {&*p.expr, b}, o)) return true;
  return false;
}

bool equal(const Answer& g, const Answer& p, const MathOptions& o, int depth);

// Each item of `a` matched to a distinct equal item of `b` (any order), or in order when `ordered`.
bool items_match(const std::vector<Answer>& a, const std::vector<Answer>& b, bool ordered, const MathOptions& o,
                 int depth) {
  if (a.size() != b.size()) return false;
  if (ordered) {
    for (size_t i = 0; i < a.size(); ++i)
      if (!equal(a[i], b[i], o, depth + 1)) return false;
    return true;
  }
  if (a.size() > 64) return false;
  std::vector<bool> used(b.size(), false);
  for (const Answer& x : a) {
    bool found = false;
    for (size_t j = 0; j < b.size() && !found; ++j) {
      if (!used[j] && equal(x, b[j], o, depth + 1)) used[j] = found = true;
    }
    if (!found) return false;
  }
  return true;
}

// x = 5 (a lone symbol on the left, equalities only): the value.
const Answer* value_of_equation(const Answer& a) {
  if (a.kind != Kind::kRelation) return nullptr;
  for (const std::string& op : a.ops)
    if (op != "=") return nullptr;
  const Answer& lhs = a.items.front();
  if (lhs.kind != Kind::kExpr || lhs.expr->nodes.size() != 1 || lhs.expr->nodes[0].kind != math::Node::Kind::kSymbol)
    return nullptr;
  return &a.items.back();
}

// The relation lhs - rhs (op) 0 with > and >= turned into < and <=.
struct Relation {
  const Answer* lhs;
  const Answer* rhs;
  std::string op;
};

std::optional<Relation> simple_relation(const Answer& a) {
  if (a.kind != Kind::kRelation || a.items.size() != 2 || a.items[0].kind != Kind::kExpr ||
      a.items[1].kind != Kind::kExpr)
    return std::nullopt;
  Relation r{&a.items[0], &a.items[1], a.ops[0]};
  if (r.op == ">" || r.op == ">=") {
    std::swap(r.lhs, r.rhs);
    r.op = r.op == ">" ? "<" : "<=";
  }
  return r;
}

// Two relations are the same when (lhs - rhs) of one is a constant multiple of the other's (positive
// for inequalities).
bool relations_equal(const Relation& g, const Relation& p, const MathOptions& o) {
  if (g.op != p.op) return false;
  std::vector<std::string> names = union_symbols(*g.lhs->expr, *g.rhs->expr);
  std::vector<std::string> more = union_symbols(*p.lhs->expr, *p.rhs->expr);
  names.insert(names.end(), more.begin(), more.end());
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  const bool symmetric = g.op == "=" || g.op == "!=";
  double ratio = 0;
  int valid = 0;
  for (int k = 0; k < 2 * o.points && valid < o.points; ++k) {
    const auto at = assignment(names, k);
    const double fg = math::eval_double(*g.lhs->expr, at) - math::eval_double(*g.rhs->expr, at);
    const double fp = math::eval_double(*p.lhs->expr, at) - math::eval_double(*p.rhs->expr, at);
    if (!std::isfinite(fg) || !std::isfinite(fp)) continue;
    if (std::fabs(fg) < 1e-12 || std::fabs(fp) < 1e-12) {
      if ((std::fabs(fg) < 1e-12) != (std::fabs(fp) < 1e-12)) return false;
      continue;
    }
    const double r = fg / fp;
    if (valid == 0) {
      ratio = r;
      if (!symmetric && ratio <= 0) return false;
    } else if (!close_enough(r, ratio, std::max(o.rel_tol, 1e-9))) {
      return false;
    }
    ++valid;
  }
  return valid >= 2 || (names.empty() && valid >= 1);
}

bool equal(const Answer& g, const Answer& p, const MathOptions& o, int depth) {
  if (depth > 32) return false;
  if (!g.text.empty() && g.text == p.text && g.kind == p.kind) return true;
  // A word against the same word written without \text{}: "\text{yes}" and "yes", "\text{(C)}" and "(C)".
  if (g.text.find("\\atom{") != std::string::npos || p.text.find("\\atom{") != std::string::npos) {
    auto plain = [](const std::string& t) {
      std::string out = absl::StrReplaceAll(t, {{"\\atom", ""}, {"{", ""}, {"}", ""}});
      absl::AsciiStrToLower(&out);
      return out;
    };
    if (plain(g.text) == plain(p.text)) return true;
  }
  // One answer in a list or set: the answer itself.
  if ((g.kind == Kind::kList || g.kind == Kind::kSet) && g.items.size() == 1) return equal(g.items[0], p, o, depth + 1);
  if ((p.kind == Kind::kList || p.kind == Kind::kSet) && p.items.size() == 1) return equal(g, p.items[0], o, depth + 1);
  // x = 5 against 5; "x = 5 + 5 + 1 = 11" against "x = 11".
  const Answer* gv = value_of_equation(g);
  const Answer* pv = value_of_equation(p);
  if (gv && pv) return equal(*gv, *pv, o, depth + 1);
  if (gv && p.kind != Kind::kRelation) return equal(*gv, p, o, depth + 1);
  if (pv && g.kind != Kind::kRelation) return equal(g, *pv, o, depth + 1);
  switch (g.kind) {
    case Kind::kExpr:
      return p.kind == Kind::kExpr && exprs_equal(g, p, o);
    case Kind::kText:
      return p.kind == Kind::kText && g.text == p.text;
    case Kind::kTuple:
      return p.kind == Kind::kTuple && g.open == p.open && g.close == p.close && items_match(g.items, p.items, true, o, depth);
    case Kind::kList:
      if (p.kind == Kind::kSet) return items_match(g.items, p.items, false, o, depth);
      return p.kind == Kind::kList && items_match(g.items, p.items, o.ordered_lists, o, depth);
    case Kind::kSet:
      return (p.kind == Kind::kSet || p.kind == Kind::kList) && items_match(g.items, p.items, false, o, depth);
    case Kind::kUnion:
      return p.kind == Kind::kUnion && items_match(g.items, p.items, false, o, depth);
    case Kind::kMatrix: {
      if (p.kind != Kind::kMatrix || g.items.size() != p.items.size()) return false;
      for (size_t r = 0; r < g.items.size(); ++r)
        if (!items_match(g.items[r].items, p.items[r].items, true, o, depth)) return false;
      return true;
    }
    case Kind::kRelation: {
      if (p.kind != Kind::kRelation) return false;
      auto gr = simple_relation(g), pr = simple_relation(p);
      if (gr && pr) return relations_equal(*gr, *pr, o);
      // Chains: side by side with the same operators.
      if (g.ops != p.ops) return false;
      return items_match(g.items, p.items, true, o, depth);
    }
  }
  return false;
}

}  // namespace

bool math_equal(std::string_view gold, std::string_view pred, const MathOptions& options) {
  if (pred.size() > kMaxAnswer) return false;
  const std::string g = normalise_math(gold), p = normalise_math(pred);
  if (g.empty() || p.empty()) return false;
  if (g == p) return true;
  return equal(parse_answer(g, 0), parse_answer(p, 0), options, 0);
}

namespace {

absl::StatusOr<std::vector<AnswerSource>> sources_param(const nlohmann::json& p, const char* reward,
                                                        std::vector<AnswerSource> fallback) {
  if (!p.contains("extract")) return fallback;
  const nlohmann::json& e = p["extract"];
  if (!e.is_array() || e.empty())
    return absl::InvalidArgumentError(cat(reward, ": 'extract' must be a non-empty list"));
  std::vector<AnswerSource> out;
  for (const auto& x : e) {
    if (!x.is_string()) return absl::InvalidArgumentError(cat(reward, ": 'extract' entries are strings"));
    auto s = parse_answer_source(x.get<std::string>());
    if (!s.ok()) return absl::InvalidArgumentError(cat(reward, ": ", std::string(s.status().message())));
    out.push_back(*s);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MathReward>> MathReward::make(const nlohmann::json& p) {
  auto r = std::unique_ptr<MathReward>(new MathReward());
  auto order = sources_param(p, "math", default_answer_sources());
  if (!order.ok()) return order.status();
  r->order_ = *order;
  if (p.contains("rel_tol")) {
    if (!p["rel_tol"].is_number() || p["rel_tol"].get<double>() < 0 || p["rel_tol"].get<double>() > 0.5)
      return absl::InvalidArgumentError("math: 'rel_tol' must be a number in [0, 0.5]");
    r->options_.rel_tol = p["rel_tol"].get<double>();
  }
  for (const char* key : {"percent_as_fraction", "ordered_lists"})
    if (p.contains(key) && !p[key].is_boolean())
      return absl::InvalidArgumentError(cat("math: '", key, "' must be true or false"));
  r->options_.percent_as_fraction = p.value("percent_as_fraction", r->options_.percent_as_fraction);
  r->options_.ordered_lists = p.value("ordered_lists", r->options_.ordered_lists);
  return r;
}

Score MathReward::score(const Sample& s) const {
  Score out;
  if (s.reference.empty()) {
    out.error = "math: the sample has no reference answer";
    return out;
  }
  const std::optional<std::string> answer = extract_math_answer(s.completion, order_);
  out.components["math.extracted"] = answer ? 1.0 : 0.0;
  if (!answer) return out;
  std::string gold = s.reference;
  if (auto boxed = last_boxed(gold)) gold = *boxed;
  out.value = math_equal(gold, *answer, options_) ? 1.0 : 0.0;
  return out;
}

std::optional<char> choice_letter(std::string_view answer, std::string_view letters) {
  std::string a = normalise_math(answer);
  a = absl::StrReplaceAll(a, {{"\\atom{", ""}, {"{", ""}, {"}", ""}});
  std::string_view t = trim(a);
  for (std::string_view prefix : {"option", "choice", "answer"}) {
    if (t.size() > prefix.size() && iequals(t.substr(0, prefix.size()), prefix))
      t = trim(t.substr(prefix.size()));
  }
  while (!t.empty() && (t.front() == ':' || t.front() == ' ')) t.remove_prefix(1);
  if (t.empty()) return std::nullopt;
  size_t i = 0;
  const bool paren = t[0] == '(' || t[0] == '[';
  if (paren) ++i;
  if (i >= t.size()) return std::nullopt;
  const char c = static_cast<char>(absl::ascii_toupper(static_cast<unsigned char>(t[i])));
  if (letters.find(c) == std::string_view::npos) return std::nullopt;
  // Lowercase only when marked as a choice: "(b)" or "b)", not the word "a".
  const bool upper = t[i] == c;
  ++i;
  if (i == t.size()) return upper || paren ? std::optional<char>(c) : std::nullopt;
  const char next = t[i];
  if (next == ')' || next == ']' || next == '.' || next == ':') return c;
  if (next == ' ' && upper && !paren) return c;
  return std::nullopt;
}

absl::StatusOr<std::unique_ptr<ChoiceReward>> ChoiceReward::make(const nlohmann::json& p) {
  auto r = std::unique_ptr<ChoiceReward>(new ChoiceReward());
  auto order = sources_param(p, "choice", {AnswerSource::kAnswerTag, AnswerSource::kBoxed, AnswerSource::kAnswerIs});
  if (!order.ok()) return order.status();
  r->order_ = *order;
  r->letters_ = "ABCDEFGHIJ";
  if (p.contains("letters")) {
    if (!p["letters"].is_string() || p["letters"].get<std::string>().empty())
      return absl::InvalidArgumentError("choice: 'letters' must be a non-empty string such as \"ABCD\"");
    r->letters_ = p["letters"].get<std::string>();
    absl::AsciiStrToUpper(&r->letters_);
  }
  return r;
}

Score ChoiceReward::score(const Sample& s) const {
  Score out;
  const auto gold = choice_letter(s.reference, letters_);
  if (!gold) {
    out.error = cat("choice: the reference '", s.reference.substr(0, 40), "' is not one of ", letters_);
    return out;
  }
  const auto answer = extract_math_answer(s.completion, order_);
  if (!answer) return out;
  const auto letter = choice_letter(*answer, letters_);
  out.value = letter && *letter == *gold ? 1.0 : 0.0;
  return out;
}

}  // namespace r1lab::rewards
