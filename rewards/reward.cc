#include "rewards/reward.h"

#include "absl/strings/str_cat.h"
#include "rewards/code.h"
#include "rewards/language.h"
#include "rewards/math_equivalence.h"
#include "rewards/shaping.h"
#include "rewards/rules.h"

namespace r1lab::rewards {

namespace {

// The factory of a rule whose T::make(params) validates its own parameters.
template <typename T>
RewardFactory factory_of() {
  return [](const nlohmann::json& p) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
    auto f = T::make(p);
    if (!f.ok()) return f.status();
    return std::unique_ptr<RewardFn>(std::move(*f));
  };
}

}  // namespace

RewardRegistry RewardRegistry::with_builtin_rules() {
  RewardRegistry r;
  r.add("format", [](const nlohmann::json& p) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
    if (p.contains("pattern") && !p["pattern"].is_string())
      return absl::InvalidArgumentError("format: 'pattern' must be a string");
    if (p.contains("mode") && (!p["mode"].is_string() || (p["mode"] != "full" && p["mode"] != "search")))
      return absl::InvalidArgumentError("format: 'mode' must be \"full\" (the whole completion) or \"search\"");
    auto f = FormatReward::make(p.value("pattern", std::string(FormatReward::kR1Pattern)),
                                p.value("mode", std::string("full")) == "full");
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
  r.add("tag_count", [](const nlohmann::json& p) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
    std::vector<std::string> tags{"<think>", "</think>", "<answer>", "</answer>"};
    if (p.contains("tags")) {
      if (!p["tags"].is_array() || p["tags"].empty())
        return absl::InvalidArgumentError("tag_count: 'tags' must be a non-empty list of strings");
      tags.clear();
      for (const auto& t : p["tags"]) {
        if (!t.is_string() || t.get<std::string>().empty())
          return absl::InvalidArgumentError("tag_count: 'tags' must be a non-empty list of strings");
        tags.push_back(t.get<std::string>());
      }
    }
    return std::unique_ptr<RewardFn>(std::make_unique<TagCountReward>(std::move(tags)));
  });
  r.add("language", factory_of<LanguageConsistencyReward>());
  r.add("overlong", factory_of<OverlongReward>());
  r.add("cosine", factory_of<CosineLengthReward>());
  r.add("repetition", factory_of<RepetitionReward>());
  r.add("code", factory_of<CodeReward>());
  r.add("math", factory_of<MathReward>());
  r.add("choice", factory_of<ChoiceReward>());
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
    for (const auto& [key, v] : t.items())
      if (key != "name" && key != "weight" && key != "params" && key != "as" && key != "gate")
        return absl::InvalidArgumentError(absl::StrCat("rewards: '", name, "': unknown key '", key,
                                                       "' (name, weight, params, as, gate)"));
    if (t.contains("weight") && !t["weight"].is_number())
      return absl::InvalidArgumentError(absl::StrCat("rewards: '", name, "': weight must be a number"));
    if (t.contains("as") && (!t["as"].is_string() || t["as"].get<std::string>().empty()))
      return absl::InvalidArgumentError(absl::StrCat("rewards: '", name, "': 'as' must be a non-empty string"));
    std::string gate;
    double gate_min = 1.0;
    if (t.contains("gate")) {
      const nlohmann::json& g = t["gate"];
      if (g.is_string()) {
        gate = g.get<std::string>();
      } else if (g.is_object() && g.contains("name") && g["name"].is_string() &&
                 (!g.contains("min") || g["min"].is_number())) {
        gate = g["name"].get<std::string>();
        gate_min = g.value("min", 1.0);
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("rewards: '", name, "': 'gate' must be a rule name or {\"name\": ..., \"min\": number}"));
      }
    }
    auto fn = registry.make(name, t.value("params", nlohmann::json::object()));
    if (!fn.ok()) return fn.status();
    const std::string as = t.value("as", name);
    for (const Term& prev : sum->terms_)
      if (prev.name == as)
        return absl::InvalidArgumentError(
            absl::StrCat("rewards: two rules named '", as, "'; give one another name with \"as\""));
    sum->add(as, t.value("weight", 1.0), std::move(*fn), gate, gate_min);
  }
  for (const Term& t : sum->terms_) {
    if (t.gate.empty()) continue;
    bool found = false;
    for (const Term& u : sum->terms_) found = found || (u.name == t.gate && &u != &t);
    if (!found)
      return absl::InvalidArgumentError(
          absl::StrCat("rewards: '", t.name, "' is gated on '", t.gate, "', which is not a rule of this reward"));
  }
  return sum;
}

void WeightedSum::add(std::string name, double weight, std::unique_ptr<RewardFn> fn, std::string gate,
                      double gate_min) {
  terms_.push_back({std::move(name), weight, std::move(fn), std::move(gate), gate_min});
}

Score WeightedSum::score(const Sample& s) const {
  Score out;
  std::vector<Score> parts;
  parts.reserve(terms_.size());
  for (const Term& t : terms_) {
    parts.push_back(t.fn->score(s));
    out.components[t.name] = parts.back().value;
    for (const auto& [k, v] : parts.back().components) out.components.emplace(k, v);
  }
  for (size_t i = 0; i < terms_.size(); ++i) {
    const Term& t = terms_[i];
    const Score& part = parts[i];
    if (!part.error.empty()) {
      absl::StrAppend(&out.error, out.error.empty() ? "" : "; ", t.name, ": ", part.error);
      continue;
    }
    if (!t.gate.empty()) {
      bool open = false;
      for (size_t j = 0; j < terms_.size(); ++j)
        if (terms_[j].name == t.gate) open = parts[j].error.empty() && parts[j].value >= t.gate_min;
      if (!open) {
        out.components["gated:" + t.name] = 1.0;
        continue;
      }
    }
    out.value += t.weight * part.value;
  }
  return out;
}

}  // namespace r1lab::rewards
