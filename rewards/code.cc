#include "rewards/code.h"

#include <future>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "rewards/rules.h"

namespace r1lab::rewards {
namespace {

std::optional<sandbox::Language> language_of_tag(std::string tag) {
  absl::AsciiStrToLower(&tag);
  if (tag == "python" || tag == "py" || tag == "python3") return sandbox::Language::kPython;
  if (tag == "c") return sandbox::Language::kC;
  if (tag == "cpp" || tag == "c++" || tag == "cxx" || tag == "cc") return sandbox::Language::kCpp;
  return std::nullopt;
}

std::optional<ExtractedCode> last_fence(std::string_view text, std::string_view prefer) {
  std::optional<ExtractedCode> last, last_preferred;
  size_t at = 0;
  while (true) {
    const size_t open = text.find("```", at);
    if (open == std::string_view::npos) break;
    const size_t line_end = text.find('\n', open + 3);
    if (line_end == std::string_view::npos) break;
    const size_t close = text.find("```", line_end + 1);
    if (close == std::string_view::npos) break;
    ExtractedCode c;
    c.language = std::string(absl::StripAsciiWhitespace(std::string(text.substr(open + 3, line_end - open - 3))));
    c.source = std::string(text.substr(line_end + 1, close - line_end - 1));
    if (!prefer.empty() && language_of_tag(c.language) && language_of_tag(std::string(prefer)) &&
        *language_of_tag(c.language) == *language_of_tag(std::string(prefer)))
      last_preferred = c;
    last = std::move(c);
    at = close + 3;
  }
  return last_preferred ? last_preferred : last;
}

}  // namespace

std::optional<ExtractedCode> extract_code(std::string_view completion, std::string_view prefer) {
  if (auto answer = extract_answer(completion))
    if (auto c = last_fence(*answer, prefer)) return c;
  return last_fence(completion, prefer);
}

absl::StatusOr<std::unique_ptr<CodeReward>> CodeReward::make(const nlohmann::json& p) {
  auto r = std::unique_ptr<CodeReward>(new CodeReward());
  if (p.contains("language")) {
    auto lang = p["language"].is_string() ? language_of_tag(p["language"].get<std::string>()) : std::nullopt;
    if (!lang) return absl::InvalidArgumentError("code: 'language' must be python, c or cpp");
    r->default_language_ = *lang;
  }
  if (p.contains("mode")) {
    if (p["mode"] != "all" && p["mode"] != "fraction")
      return absl::InvalidArgumentError("code: 'mode' must be \"all\" or \"fraction\"");
    r->fraction_ = p["mode"] == "fraction";
  }
  for (auto [key, field, lo, hi] : {std::tuple<const char*, int64_t*, int64_t, int64_t>{"time_limit_ms", &r->limits_.time_limit_ms, 1, 600000},
                                    {"memory_mb", &r->limits_.memory_mb, 16, 65536}}) {
    if (!p.contains(key)) continue;
    if (!p[key].is_number_integer() || p[key].get<int64_t>() < lo || p[key].get<int64_t>() > hi)
      return absl::InvalidArgumentError(absl::StrCat("code: '", key, "' must be an integer in ", lo, "..", hi));
    *field = p[key].get<int64_t>();
  }
  if (p.contains("workers")) {
    if (!p["workers"].is_number_integer() || p["workers"].get<int>() < 0 || p["workers"].get<int>() > 1024)
      return absl::InvalidArgumentError("code: 'workers' must be an integer in 0..1024 (0: the number of CPUs)");
    r->workers_ = p["workers"].get<int>();
  }
  if (p.contains("allow_unsafe")) {
    if (!p["allow_unsafe"].is_boolean()) return absl::InvalidArgumentError("code: 'allow_unsafe' must be true or false");
    r->allow_unsafe_ = p["allow_unsafe"].get<bool>();
  }
  return r;
}

CodeReward::~CodeReward() {
  pool_.reset();  // finishes queued runs before the runner goes
  runner_.reset();
}

absl::Status CodeReward::start() const {
  std::call_once(started_, [this] {
    sandbox::RunnerOptions o;
    o.allow_unsafe = allow_unsafe_;
    auto runner = sandbox::Runner::create(o);
    if (!runner.ok()) {
      start_status_ = runner.status();
      return;
    }
    runner_ = std::move(*runner);
    pool_ = std::make_unique<sandbox::Pool>(*runner_, sandbox::PoolOptions{workers_, 0});
  });
  return start_status_;
}

Score CodeReward::score(const Sample& s) const {
  Score out;
  struct Test {
    sandbox::Program program;
    std::optional<std::string> expected;
  };
  const nlohmann::json& m = s.meta;
  const bool has_io = m.is_object() && m.contains("tests");
  const bool has_asserts = m.is_object() && m.contains("asserts");
  if (!has_io && !has_asserts) {
    out.error = "code: meta needs \"tests\" [{\"input\", \"output\"}] or \"asserts\" [\"assert ...\"]";
    return out;
  }
  auto code = extract_code(s.completion, sandbox::language_name(default_language_));
  out.components["code.passed"] = 0;
  std::vector<Test> tests;
  sandbox::Language lang = default_language_;
  if (code && !code->language.empty()) {
    auto tagged = language_of_tag(code->language);
    if (tagged) lang = *tagged;
  }
  auto bad_tests = [&](const std::string& why) {
    out.error = absl::StrCat("code: ", why);
    return out;
  };
  if (has_io) {
    if (!m["tests"].is_array()) return bad_tests("meta.tests must be a list of {\"input\", \"output\"}");
    for (const auto& t : m["tests"]) {
      if (!t.is_object() || !t.contains("output") || !t["output"].is_string() ||
          (t.contains("input") && !t["input"].is_string()))
        return bad_tests("meta.tests must be a list of {\"input\": string, \"output\": string}");
      sandbox::Program p;
      p.lang = lang;
      p.source = code ? code->source : "";
      p.stdin_data = t.value("input", "");
      tests.push_back({std::move(p), t["output"].get<std::string>()});
    }
  }
  if (has_asserts) {
    if (!m["asserts"].is_array()) return bad_tests("meta.asserts must be a list of strings");
    for (const auto& a : m["asserts"]) {
      if (!a.is_string()) return bad_tests("meta.asserts must be a list of strings");
      sandbox::Program p;
      p.lang = sandbox::Language::kPython;
      p.source = absl::StrCat(code ? code->source : "", "\n\n", a.get<std::string>(), "\n");
      tests.push_back({std::move(p), std::nullopt});
    }
  }
  if (tests.empty()) return bad_tests("the task has no tests");
  out.components["code.tests"] = static_cast<double>(tests.size());
  if (!code) return out;  // no program: every test fails
  if (has_asserts && lang != sandbox::Language::kPython) return out;  // asserts are Python; the program is not
  if (auto st = start(); !st.ok()) {
    out.error = absl::StrCat("code: ", st.message());
    return out;
  }
  std::vector<sandbox::Pool::Future> running;
  running.reserve(tests.size());
  for (Test& t : tests) running.push_back(pool_->submit(std::move(t.program), limits_, std::move(t.expected)));
  int passed = 0;
  for (size_t i = 0; i < running.size(); ++i) {
    absl::StatusOr<sandbox::Result> r = running[i].get();
    if (!r.ok()) {
      absl::StrAppend(&out.error, out.error.empty() ? "code: " : "; ", "test ", i, ": ", r.status().message());
      continue;
    }
    if (r->verdict == sandbox::Verdict::kSandboxError) {
      absl::StrAppend(&out.error, out.error.empty() ? "code: " : "; ", "test ", i, ": sandbox error: ", r->message);
      continue;
    }
    const bool ok = r->verdict == sandbox::Verdict::kOk;
    passed += ok;
    out.components[absl::StrCat("test.", i, ":", sandbox::verdict_name(r->verdict))] = ok ? 1.0 : 0.0;
  }
  out.components["code.passed"] = passed;
  if (!out.error.empty()) return out;  // the sandbox failed: the program was not judged
  const double frac = static_cast<double>(passed) / static_cast<double>(tests.size());
  out.value = fraction_ ? frac : (passed == static_cast<int>(tests.size()) ? 1.0 : 0.0);
  return out;
}

}  // namespace r1lab::rewards
