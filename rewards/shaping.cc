#include "rewards/shaping.h"

#include <cmath>
#include <string_view>

#include "absl/container/flat_hash_set.h"
#include "absl/hash/hash.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace r1lab::rewards {
namespace {

absl::StatusOr<LengthUnit> unit_param(const nlohmann::json& p, const char* reward) {
  if (!p.contains("unit")) return LengthUnit::kTokens;
  const nlohmann::json& u = p["unit"];
  if (u == "tokens") return LengthUnit::kTokens;
  if (u == "chars") return LengthUnit::kChars;
  if (u == "words") return LengthUnit::kWords;
  return absl::InvalidArgumentError(absl::StrCat(reward, ": 'unit' must be \"tokens\", \"chars\" or \"words\""));
}

absl::Status number_param(const nlohmann::json& p, const char* key, const char* reward, double min, double* out) {
  if (!p.contains(key)) return absl::OkStatus();
  if (!p[key].is_number() || p[key].get<double>() < min)
    return absl::InvalidArgumentError(absl::StrCat(reward, ": '", key, "' must be a number >= ", min));
  *out = p[key].get<double>();
  return absl::OkStatus();
}

absl::Status any_number(const nlohmann::json& p, const char* key, const char* reward, double* out) {
  if (!p.contains(key)) return absl::OkStatus();
  if (!p[key].is_number()) return absl::InvalidArgumentError(absl::StrCat(reward, ": '", key, "' must be a number"));
  *out = p[key].get<double>();
  return absl::OkStatus();
}

std::vector<std::string_view> words(std::string_view t) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < t.size()) {
    while (i < t.size() && absl::ascii_isspace(static_cast<unsigned char>(t[i]))) ++i;
    const size_t start = i;
    while (i < t.size() && !absl::ascii_isspace(static_cast<unsigned char>(t[i]))) ++i;
    if (i > start) out.push_back(t.substr(start, i - start));
  }
  return out;
}

}  // namespace

absl::StatusOr<double> completion_length(const Sample& s, LengthUnit unit) {
  switch (unit) {
    case LengthUnit::kChars: {
      double n = 0;  // code points
      for (unsigned char c : s.completion) n += (c & 0xC0) != 0x80;
      return n;
    }
    case LengthUnit::kWords:
      return static_cast<double>(words(s.completion).size());
    case LengthUnit::kTokens:
      if (!s.meta.is_object() || !s.meta.contains("completion_tokens") ||
          !s.meta["completion_tokens"].is_number_integer() || s.meta["completion_tokens"].get<int64_t>() < 0)
        return absl::InvalidArgumentError(
            "length in tokens needs meta \"completion_tokens\" (a non-negative integer); or set unit to chars/words");
      return static_cast<double>(s.meta["completion_tokens"].get<int64_t>());
  }
  return 0.0;
}

absl::StatusOr<std::unique_ptr<OverlongReward>> OverlongReward::make(const nlohmann::json& p) {
  auto r = std::unique_ptr<OverlongReward>(new OverlongReward());
  if (auto st = number_param(p, "max_length", "overlong", 1, &r->max_length_); !st.ok()) return st;
  if (auto st = number_param(p, "cache_length", "overlong", 0, &r->cache_length_); !st.ok()) return st;
  if (r->cache_length_ >= r->max_length_)
    return absl::InvalidArgumentError("overlong: 'cache_length' must be below 'max_length'");
  auto unit = unit_param(p, "overlong");
  if (!unit.ok()) return unit.status();
  r->unit_ = *unit;
  return r;
}

Score OverlongReward::score(const Sample& s) const {
  Score out;
  auto len = completion_length(s, unit_);
  if (!len.ok()) {
    out.error = absl::StrCat("overlong: ", len.status().message());
    return out;
  }
  const double start = max_length_ - cache_length_;
  if (*len <= start) {
    out.value = 0;
  } else if (*len <= max_length_) {
    out.value = (start - *len) / cache_length_;
  } else {
    out.value = -1;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<CosineLengthReward>> CosineLengthReward::make(const nlohmann::json& p) {
  auto r = std::unique_ptr<CosineLengthReward>(new CosineLengthReward());
  std::string name = "math";
  nlohmann::json inner = nlohmann::json::object();
  if (p.contains("accuracy")) {
    const nlohmann::json& a = p["accuracy"];
    if (a.is_string()) {
      name = a.get<std::string>();
    } else if (a.is_object() && a.contains("name") && a["name"].is_string()) {
      name = a["name"].get<std::string>();
      inner = a.value("params", nlohmann::json::object());
    } else {
      return absl::InvalidArgumentError("cosine: 'accuracy' must be a reward name or {\"name\", \"params\"}");
    }
  }
  if (name == "cosine") return absl::InvalidArgumentError("cosine: 'accuracy' cannot be cosine itself");
  auto acc = RewardRegistry::with_builtin_rules().make(name, inner);
  if (!acc.ok()) return absl::InvalidArgumentError(absl::StrCat("cosine: accuracy: ", acc.status().message()));
  r->accuracy_ = std::move(*acc);
  if (auto st = number_param(p, "max_length", "cosine", 1, &r->max_length_); !st.ok()) return st;
  for (auto [key, field] : {std::pair<const char*, double*>{"correct_short", &r->correct_short_},
                            {"correct_long", &r->correct_long_},
                            {"wrong_short", &r->wrong_short_},
                            {"wrong_long", &r->wrong_long_},
                            {"exceed", &r->exceed_}})
    if (auto st = any_number(p, key, "cosine", field); !st.ok()) return st;
  auto unit = unit_param(p, "cosine");
  if (!unit.ok()) return unit.status();
  r->unit_ = *unit;
  return r;
}

Score CosineLengthReward::score(const Sample& s) const {
  Score out;
  auto len = completion_length(s, unit_);
  if (!len.ok()) {
    out.error = absl::StrCat("cosine: ", len.status().message());
    return out;
  }
  const Score acc = accuracy_->score(s);
  if (!acc.error.empty()) {
    out.error = absl::StrCat("cosine: ", acc.error);
    return out;
  }
  const bool correct = acc.value >= 1.0;
  out.components["cosine.correct"] = correct ? 1.0 : 0.0;
  if (*len > max_length_) {
    out.value = exceed_;
    return out;
  }
  // from + (to - from) · (1 - cos(π t / T)) / 2: from at t = 0, to at t = T.
  const double from = correct ? correct_short_ : wrong_short_;
  const double to = correct ? correct_long_ : wrong_long_;
  out.value = from + (to - from) * 0.5 * (1 - std::cos(M_PI * *len / max_length_));
  return out;
}

absl::StatusOr<std::unique_ptr<RepetitionReward>> RepetitionReward::make(const nlohmann::json& p) {
  auto r = std::unique_ptr<RepetitionReward>(new RepetitionReward());
  if (p.contains("n")) {
    if (!p["n"].is_number_integer() || p["n"].get<int>() < 1 || p["n"].get<int>() > 32)
      return absl::InvalidArgumentError("repetition: 'n' must be an integer in 1..32");
    r->n_ = p["n"].get<int>();
  }
  if (auto st = any_number(p, "penalty", "repetition", &r->penalty_); !st.ok()) return st;
  if (r->penalty_ > 0) return absl::InvalidArgumentError("repetition: 'penalty' must be <= 0");
  return r;
}

Score RepetitionReward::score(const Sample& s) const {
  Score out;
  const std::vector<std::string_view> w = words(s.completion);
  if (w.size() < static_cast<size_t>(n_)) return out;
  const size_t total = w.size() - static_cast<size_t>(n_) + 1;
  absl::flat_hash_set<size_t> seen;
  seen.reserve(total);
  for (size_t i = 0; i < total; ++i) {
    size_t h = 0;
    for (int k = 0; k < n_; ++k) h = absl::HashOf(h, w[i + static_cast<size_t>(k)]);
    seen.insert(h);
  }
  out.value = penalty_ * (1.0 - static_cast<double>(seen.size()) / static_cast<double>(total));
  return out;
}

}  // namespace r1lab::rewards
