#include "rewards/reward.h"

#include "absl/strings/str_cat.h"
#include "rewards/math_equivalence.h"
#include "rewards/rules.h"

namespace r1lab::rewards {

RewardRegistry RewardRegistry::with_builtin_rules() {
  RewardRegistry r;
  r.add("format", [](const nlohmann::json& p) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
    if (p.contains("pattern") && !p["pattern"].is_string())
      return absl::InvalidArgumentError("format: 'pattern' must be a string");
    auto f = FormatReward::make(p.value("pattern", std::string(FormatReward::kR1Pattern)));
    if (!f.ok()) return f.status();
    return std::unique_ptr<RewardFn>(std::move(*f));
  });
  r.add("answer_match", [](const nlohmann::json& p) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
    AnswerMatch::Options o;
    if (p.contains("tolerance")) {
      if (!p["tolerance"].is_number() || p["tolerance"].get<double>() < 0)
        return absl::InvalidArgumentError("answer_match: 'tolerance' must be a number >= 0");
      o.tolerance = p["tolerance"].get<double>();
    }
    for (const char* key : {"ignore_case", "require_tags"})
      if (p.contains(key) && !p[key].is_boolean())
        return absl::InvalidArgumentError(absl::StrCat("answer_match: '", key, "' must be true or false"));
    o.ignore_case = p.value("ignore_case", o.ignore_case);
    o.require_tags = p.value("require_tags", o.require_tags);
    return std::unique_ptr<RewardFn>(std::make_unique<AnswerMatch>(o));
  });
  r.add("countdown", [](const nlohmann::json& p) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
    if (p.contains("use_all") && !p["use_all"].is_boolean())
      return absl::InvalidArgumentError("countdown: 'use_all' must be true or false");
    return std::unique_ptr<RewardFn>(std::make_unique<CountdownReward>(p.value("use_all", false)));
  });
  r.add("math", [](const nlohmann::json& p) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
    auto f = MathReward::make(p);
    if (!f.ok()) return f.status();
    return std::unique_ptr<RewardFn>(std::move(*f));
  });
  r.add("choice", [](const nlohmann::json& p) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
    auto f = ChoiceReward::make(p);
    if (!f.ok()) return f.status();
    return std::unique_ptr<RewardFn>(std::move(*f));
  });
  return r;
}

void RewardRegistry::add(const std::string& name, RewardFactory factory) { factories_[name] = std::move(factory); }

std::vector<std::string> RewardRegistry::names() const {
  std::vector<std::string> out;
  for (const auto& [name, f] : factories_) out.push_back(name);
  return out;
}

absl::StatusOr<std::unique_ptr<RewardFn>> RewardRegistry::make(const std::string& name,
                                                               const nlohmann::json& params) const {
  auto it = factories_.find(name);
  if (it == factories_.end()) {
    std::string known;
    for (const auto& [n, f] : factories_) absl::StrAppend(&known, known.empty() ? "" : ", ", n);
    return absl::InvalidArgumentError(absl::StrCat("unknown reward '", name, "' (known: ", known, ")"));
  }
  if (!params.is_null() && !params.is_object())
    return absl::InvalidArgumentError(absl::StrCat("reward '", name, "': params must be an object"));
  return it->second(params.is_null() ? nlohmann::json::object() : params);
}

absl::StatusOr<std::unique_ptr<WeightedSum>> WeightedSum::from_json(const RewardRegistry& registry,
                                                                    const nlohmann::json& spec) {
  if (!spec.is_array() || spec.empty())
    return absl::InvalidArgumentError("rewards: a non-empty list of {name, weight, params}");
  auto sum = std::make_unique<WeightedSum>();
  for (const nlohmann::json& t : spec) {
    if (!t.is_object() || !t.contains("name") || !t["name"].is_string())
      return absl::InvalidArgumentError("rewards: every entry needs a string 'name'");
    const std::string name = t["name"].get<std::string>();
    if (t.contains("weight") && !t["weight"].is_number())
      return absl::InvalidArgumentError(absl::StrCat("rewards: '", name, "': weight must be a number"));
    auto fn = registry.make(name, t.value("params", nlohmann::json::object()));
    if (!fn.ok()) return fn.status();
    sum->add(name, t.value("weight", 1.0), std::move(*fn));
  }
  return sum;
}

void WeightedSum::add(std::string name, double weight, std::unique_ptr<RewardFn> fn) {
  terms_.push_back({std::move(name), weight, std::move(fn)});
}

Score WeightedSum::score(const Sample& s) const {
  Score out;
  for (const Term& t : terms_) {
    Score part = t.fn->score(s);
    out.components[t.name] = part.value;
    if (!part.error.empty()) {
      absl::StrAppend(&out.error, out.error.empty() ? "" : "; ", t.name, ": ", part.error);
      continue;
    }
    out.value += t.weight * part.value;
  }
  return out;
}

}  // namespace r1lab::rewards
