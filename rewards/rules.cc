#include "rewards/rules.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "re2/re2.h"

namespace r1lab::rewards {

size_t rfind_bytes(std::string_view s, std::string_view needle, size_t before) {
  if (needle.empty() || needle.size() > s.size()) return std::string_view::npos;
  size_t end = std::min(before == std::string_view::npos ? s.size() : before + 1, s.size() - needle.size() + 1);
  while (end > 0) {
    const void* p = memrchr(s.data(), needle[0], end);
    if (!p) return std::string_view::npos;
    const size_t at = static_cast<size_t>(static_cast<const char*>(p) - s.data());
    if (s.substr(at, needle.size()) == needle) return at;
    end = at;
  }
  return std::string_view::npos;
}

std::optional<std::string> extract_answer(std::string_view completion) {
  const size_t open = rfind_bytes(completion, "<answer>");
  if (open == std::string_view::npos) return std::nullopt;
  const size_t start = open + 8;
  const size_t close = completion.find("</answer>", start);
  if (close == std::string_view::npos) return std::nullopt;
  return std::string(absl::StripAsciiWhitespace(std::string(completion.substr(start, close - start))));
}

std::optional<double> parse_number(const std::string& text) {
  std::string t(absl::StripAsciiWhitespace(text));
  // Wrappers models like to add: $...$, \boxed{...}, a trailing period.
  if (t.size() >= 2 && t.front() == '$' && t.back() == '$') t = t.substr(1, t.size() - 2);
  if (t.rfind("\\boxed{", 0) == 0 && !t.empty() && t.back() == '}') t = t.substr(7, t.size() - 8);
  if (!t.empty() && t.back() == '.') t.pop_back();
  t = absl::StrReplaceAll(absl::StripAsciiWhitespace(t), {{",", ""}});
  if (t.empty()) return std::nullopt;
  auto whole = [](const std::string& s, double* v) {
    if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return false;
    char* end = nullptr;
    *v = std::strtod(s.c_str(), &end);
    return end == s.c_str() + s.size() && std::isfinite(*v);
  };
  double v;
  const size_t slash = t.find('/');
  if (slash != std::string::npos) {
    double num, den;
    if (!whole(t.substr(0, slash), &num) || !whole(t.substr(slash + 1), &den) || den == 0) return std::nullopt;
    return num / den;
  }
  if (t.find_first_of("xXpP") != std::string::npos) return std::nullopt;  // no hex floats, no "inf"
  if (!whole(t, &v)) return std::nullopt;
  return v;
}

struct FormatReward::Impl {
  Impl(const std::string& pattern, bool full) : re(pattern, options()), full_match(full) {}
  static RE2::Options options() {
    RE2::Options o;
    o.set_dot_nl(true);
    o.set_log_errors(false);
    return o;
  }
  RE2 re;
  bool full_match;
};

FormatReward::FormatReward(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
FormatReward::~FormatReward() = default;

absl::StatusOr<std::unique_ptr<FormatReward>> FormatReward::make(const std::string& pattern, bool full_match) {
  auto impl = std::make_unique<Impl>(pattern, full_match);
  if (!impl->re.ok())
    return absl::InvalidArgumentError(absl::StrCat("format: bad pattern '", pattern, "': ", impl->re.error()));
  return std::unique_ptr<FormatReward>(new FormatReward(std::move(impl)));
}

Score FormatReward::score(const Sample& s) const {
  Score out;
  const bool match = impl_->full_match ? RE2::FullMatch(s.completion, impl_->re) : RE2::PartialMatch(s.completion, impl_->re);
  out.value = match ? 1.0 : 0.0;
  return out;
}

Score TagCountReward::score(const Sample& s) const {
  Score out;
  for (const std::string& tag : tags_) {
    size_t count = 0;
    for (size_t at = s.completion.find(tag); at != std::string::npos && count < 2; at = s.completion.find(tag, at + 1))
      ++count;
    const double once = count == 1 ? 1.0 : 0.0;
    out.components["tag:" + tag] = once;
    out.value += once / static_cast<double>(tags_.size());
  }
  return out;
}

namespace {

std::string normalise(const std::string& s, bool ignore_case) {
  std::string out;
  bool space = false;
  for (char c : absl::StripAsciiWhitespace(s)) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      space = true;
      continue;
    }
    if (space) out.push_back(' ');
    space = false;
    out.push_back(ignore_case ? absl::ascii_tolower(static_cast<unsigned char>(c)) : c);
  }
  return out;
}

}  // namespace

Score AnswerMatch::score(const Sample& s) const {
  Score out;
  std::optional<std::string> answer = extract_answer(s.completion);
  if (!answer && !opt_.require_tags) answer = s.completion;
  if (!answer) return out;
  const auto a = parse_number(*answer), r = parse_number(s.reference);
  if (a && r) {
    out.value = std::fabs(*a - *r) <= opt_.tolerance * std::max(1.0, std::fabs(*r)) ? 1.0 : 0.0;
  } else {
    out.value = normalise(*answer, opt_.ignore_case) == normalise(s.reference, opt_.ignore_case) ? 1.0 : 0.0;
  }
  return out;
}

namespace {

// Exact fractions over int64 (reduced); `ok` false on overflow or division by zero.
struct Fraction {
  __int128 num = 0, den = 1;
  bool ok = true;
};

Fraction make(__int128 n, __int128 d, bool ok) {
  Fraction f;
  constexpr __int128 kMax = static_cast<__int128>(1) << 62;
  if (!ok || d == 0) {
    f.ok = false;
    return f;
  }
  if (d < 0) {
    n = -n;
    d = -d;
  }
  __int128 a = n < 0 ? -n : n, b = d;
  while (b != 0) {
    const __int128 t = a % b;
    a = b;
    b = t;
  }
  if (a > 1) {
    n /= a;
    d /= a;
  }
  f.num = n;
  f.den = d;
  f.ok = n < kMax && n > -kMax && d < kMax;
  return f;
}

// expr := term (('+' | '-') term)*;  term := factor (('*' | '/') factor)*;
// factor := integer | '(' expr ')' | '-' factor
class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}
  std::vector<int64_t> numbers;

  bool parse(Fraction* out) {
    *out = expr(0);
    skip();
    return out->ok && pos_ == s_.size() && !failed_;
  }

 private:
  void skip() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool eat(char c) {
    skip();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  Fraction expr(int depth) {
    Fraction a = term(depth);
    for (;;) {
      if (eat('+')) {
        Fraction b = term(depth);
        a = make(a.num * b.den + b.num * a.den, a.den * b.den, a.ok && b.ok);
      } else if (eat('-')) {
        Fraction b = term(depth);
        a = make(a.num * b.den - b.num * a.den, a.den * b.den, a.ok && b.ok);
      } else {
        return a;
      }
    }
  }
  Fraction term(int depth) {
    Fraction a = factor(depth);
    for (;;) {
      if (eat('*') || eat('x') || eat('X')) {
        Fraction b = factor(depth);
        a = make(a.num * b.num, a.den * b.den, a.ok && b.ok);
      } else if (eat('/')) {
        Fraction b = factor(depth);
        a = make(a.num * b.den, a.den * b.num, a.ok && b.ok && b.num != 0);
      } else {
        return a;
      }
    }
  }
  Fraction factor(int depth) {
    Fraction bad;
    bad.ok = false;
    if (depth > 64 || ++steps_ > 10000) {
      failed_ = true;
      return bad;
    }
    if (eat('(')) {
      Fraction f = expr(depth + 1);
      if (!eat(')')) failed_ = true;
      return f;
    }
    if (eat('-')) {
      Fraction f = factor(depth + 1);
      return make(-f.num, f.den, f.ok);
    }
    skip();
    size_t end = pos_;
    while (end < s_.size() && std::isdigit(static_cast<unsigned char>(s_[end]))) ++end;
    if (end == pos_ || end - pos_ > 12) {
      failed_ = true;
      return bad;
    }
    const int64_t v = std::stoll(s_.substr(pos_, end - pos_));
    pos_ = end;
    numbers.push_back(v);
    return make(v, 1, true);
  }

  const std::string& s_;
  size_t pos_ = 0;
  int steps_ = 0;
  bool failed_ = false;
};

}  // namespace

Score CountdownReward::score(const Sample& s) const {
  Score out;
  const nlohmann::json& m = s.meta;
  if (!m.is_object() || !m.contains("numbers") || !m["numbers"].is_array() || !m.contains("target") ||
      !m["target"].is_number_integer()) {
    out.error = "countdown needs meta {\"numbers\": [...], \"target\": integer}";
    return out;
  }
  std::vector<int64_t> given;
  for (const auto& n : m["numbers"]) {
    if (!n.is_number_integer()) {
      out.error = "countdown: meta.numbers must be integers";
      return out;
    }
    given.push_back(n.get<int64_t>());
  }
  std::optional<std::string> answer = extract_answer(s.completion);
  if (!answer) return out;
  std::string expr = *answer;
  const size_t eq = expr.find('=');
  if (eq != std::string::npos) expr = expr.substr(0, eq);  // "3 * 7 + 25 = 46"
  Parser p(expr);
  Fraction value;
  if (!p.parse(&value) || value.den != 1 || value.num != m["target"].get<int64_t>()) return out;
  std::vector<int64_t> used = p.numbers;
  std::sort(used.begin(), used.end());
  std::sort(given.begin(), given.end());
  const bool fits = use_all_ ? used == given : std::includes(given.begin(), given.end(), used.begin(), used.end());
  out.value = fits ? 1.0 : 0.0;
  return out;
}

}  // namespace r1lab::rewards
