#include "rewards/plugins.h"

#include <dlfcn.h>

#include <cstring>
#include <filesystem>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "data/yaml.h"
#include "re2/re2.h"
#include "rewards/plugin_abi.h"

namespace r1lab::rewards {
namespace {

using json = nlohmann::json;

// ---- declarative rules

struct Check {
  enum class Kind { kRegex, kFullMatch, kContains, kNotContains, kLength };
  Kind kind;
  std::shared_ptr<RE2> re;
  std::string text;
  int64_t min_length = 0, max_length = INT64_MAX;
  double weight = 1.0;
  enum class Field { kCompletion, kAnswer, kThink } field = Field::kCompletion;
};

std::string_view between(std::string_view s, std::string_view open, std::string_view close) {
  const size_t a = s.rfind(open);
  if (a == std::string_view::npos) return {};
  const size_t b = s.find(close, a + open.size());
  return b == std::string_view::npos ? std::string_view() : s.substr(a + open.size(), b - a - open.size());
}

class DeclarativeReward final : public RewardFn {
 public:
  DeclarativeReward(std::string name, std::string combine, std::vector<Check> checks)
      : name_(std::move(name)), combine_(std::move(combine)), checks_(std::move(checks)) {}

  Score score(const Sample& s) const override {
    Score out;
    double passed_weight = 0, total_weight = 0;
    bool all = true, any = false;
    for (size_t i = 0; i < checks_.size(); ++i) {
      const Check& c = checks_[i];
      std::string_view field = s.completion;
      if (c.field == Check::Field::kAnswer) field = between(s.completion, "<answer>", "</answer>");
      if (c.field == Check::Field::kThink) field = between(s.completion, "<think>", "</think>");
      bool ok = false;
      switch (c.kind) {
        case Check::Kind::kRegex:
          ok = RE2::PartialMatch(re2::StringPiece(field.data(), field.size()), *c.re);
          break;
        case Check::Kind::kFullMatch:
          ok = RE2::FullMatch(re2::StringPiece(field.data(), field.size()), *c.re);
          break;
        case Check::Kind::kContains:
          ok = field.find(c.text) != std::string_view::npos;
          break;
        case Check::Kind::kNotContains:
          ok = field.find(c.text) == std::string_view::npos;
          break;
        case Check::Kind::kLength: {
          int64_t n = 0;
          for (unsigned char ch : field) n += (ch & 0xC0) != 0x80;
          ok = n >= c.min_length && n <= c.max_length;
          break;
        }
      }
      out.components[absl::StrCat(name_, ".", i)] = ok ? 1.0 : 0.0;
      total_weight += c.weight;
      passed_weight += ok ? c.weight : 0.0;
      all = all && ok;
      any = any || ok;
    }
    if (combine_ == "all") out.value = all ? 1.0 : 0.0;
    if (combine_ == "any") out.value = any ? 1.0 : 0.0;
    if (combine_ == "sum") out.value = passed_weight;
    if (combine_ == "mean") out.value = total_weight > 0 ? passed_weight / total_weight : 0.0;
    return out;
  }

 private:
  std::string name_, combine_;
  std::vector<Check> checks_;
};

absl::StatusOr<std::vector<Check>> parse_checks(const json& list, const std::string& where) {
  if (!list.is_array() || list.empty())
    return absl::InvalidArgumentError(absl::StrCat(where, ": 'checks' must be a non-empty list"));
  std::vector<Check> out;
  for (size_t i = 0; i < list.size(); ++i) {
    const json& c = list[i];
    const std::string at = absl::StrCat(where, ": check ", i);
    if (!c.is_object()) return absl::InvalidArgumentError(absl::StrCat(at, " must be a mapping"));
    Check k;
    int kinds = 0;
    for (const auto& [key, v] : c.items()) {
      if (key == "regex" || key == "full_match") {
        if (!v.is_string()) return absl::InvalidArgumentError(absl::StrCat(at, ": '", key, "' must be a string"));
        RE2::Options o;
        o.set_dot_nl(true);
        o.set_log_errors(false);
        k.re = std::make_shared<RE2>(v.get<std::string>(), o);
        if (!k.re->ok()) return absl::InvalidArgumentError(absl::StrCat(at, ": bad pattern: ", k.re->error()));
        k.kind = key == "regex" ? Check::Kind::kRegex : Check::Kind::kFullMatch;
        ++kinds;
      } else if (key == "contains" || key == "not_contains") {
        if (!v.is_string() && !v.is_number())
          return absl::InvalidArgumentError(absl::StrCat(at, ": '", key, "' must be a string"));
        k.text = v.is_string() ? v.get<std::string>() : v.dump();
        k.kind = key == "contains" ? Check::Kind::kContains : Check::Kind::kNotContains;
        ++kinds;
      } else if (key == "min_length" || key == "max_length") {
        if (!v.is_number_integer() || v.get<int64_t>() < 0)
          return absl::InvalidArgumentError(absl::StrCat(at, ": '", key, "' must be an integer >= 0"));
        (key == "min_length" ? k.min_length : k.max_length) = v.get<int64_t>();
        if (k.kind != Check::Kind::kLength) ++kinds;
        k.kind = Check::Kind::kLength;
      } else if (key == "weight") {
        if (!v.is_number()) return absl::InvalidArgumentError(absl::StrCat(at, ": 'weight' must be a number"));
        k.weight = v.get<double>();
      } else if (key == "field") {
        if (v == "completion") k.field = Check::Field::kCompletion;
        else if (v == "answer") k.field = Check::Field::kAnswer;
        else if (v == "think") k.field = Check::Field::kThink;
        else return absl::InvalidArgumentError(absl::StrCat(at, ": 'field' must be completion, answer or think"));
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            at, ": unknown key '", key,
            "' (regex, full_match, contains, not_contains, min_length, max_length, weight, field)"));
      }
    }
    if (kinds != 1)
      return absl::InvalidArgumentError(absl::StrCat(
          at, ": exactly one of regex, full_match, contains, not_contains or min_length/max_length"));
    out.push_back(std::move(k));
  }
  return out;
}

// ---- shared libraries

struct Library {
  void* handle = nullptr;
  int (*abi_version)() = nullptr;
  const char* (*names)() = nullptr;
  void* (*create)(const char*, const char*, char*, size_t) = nullptr;
  int (*score)(void*, const r1lab_sample*, r1lab_score*) = nullptr;
  void (*destroy)(void*) = nullptr;
  ~Library() {
    if (handle) dlclose(handle);
  }
};

class LibraryReward final : public RewardFn {
 public:
  LibraryReward(std::shared_ptr<Library> lib, void* instance, std::string name)
      : lib_(std::move(lib)), instance_(instance), name_(std::move(name)) {}
  ~LibraryReward() override { lib_->destroy(instance_); }

  Score score(const Sample& s) const override {
    const std::string meta = s.meta.is_null() ? "{}" : s.meta.dump();
    r1lab_sample in{{s.prompt.data(), s.prompt.size()},
                    {s.completion.data(), s.completion.size()},
                    {s.reference.data(), s.reference.size()},
                    {s.task.data(), s.task.size()},
                    {meta.data(), meta.size()}};
    r1lab_score r;
    std::memset(&r, 0, sizeof(r));
    const int rc = lib_->score(instance_, &in, &r);
    r.error[sizeof(r.error) - 1] = '\0';
    Score out;
    if (rc != 0) {
      out.error = absl::StrCat(name_, ": plugin failed (", rc, ")", r.error[0] ? ": " : "", r.error);
      return out;
    }
    out.value = r.value;
    out.error = r.error;
    const int n = std::min(std::max(r.num_components, 0), R1LAB_REWARD_MAX_COMPONENTS);
    for (int i = 0; i < n; ++i) {
      r.component_names[i][63] = '\0';
      out.components[r.component_names[i]] = r.component_values[i];
    }
    return out;
  }

 private:
  std::shared_ptr<Library> lib_;
  void* instance_;
  std::string name_;
};

// ---- reward servers

class RemoteReward final : public RewardFn {
 public:
  RemoteReward(std::shared_ptr<RewardClient> client, std::string name, std::string target)
      : client_(std::move(client)), name_(std::move(name)), target_(std::move(target)) {}
  Score score(const Sample& s) const override {
    auto scores = client_->score(name_, {s});
    if (!scores.ok() || scores->size() != 1) {
      Score out;
      out.error = absl::StrCat("reward server ", target_, ": ",
                               scores.ok() ? "wrong number of scores" : std::string(scores.status().message()));
      return out;
    }
    return std::move((*scores)[0]);
  }

 private:
  std::shared_ptr<RewardClient> client_;
  std::string name_, target_;
};

std::string resolve(const std::string& path, const std::string& base_dir) {
  if (path.empty() || path[0] == '/' || base_dir.empty()) return path;
  return (std::filesystem::path(base_dir) / path).lexically_normal().string();
}

}  // namespace

absl::Status load_yaml_rules(const std::string& path, RewardRegistry& registry) {
  auto doc = data::read_json_or_yaml(path);
  if (!doc.ok()) return doc.status();
  const json sets = doc->is_object() && doc->contains("rules") ? (*doc)["rules"] : *doc;
  if (!sets.is_array() || sets.empty())
    return absl::InvalidArgumentError(absl::StrCat(path, ": a list of rule sets, each {name, combine, checks}"));
  for (size_t i = 0; i < sets.size(); ++i) {
    const json& set = sets[i];
    const std::string where = absl::StrCat(path, ": rule set ", i);
    if (!set.is_object() || !set.contains("name") || !set["name"].is_string() || set["name"].get<std::string>().empty())
      return absl::InvalidArgumentError(absl::StrCat(where, " needs a string 'name'"));
    const std::string name = set["name"].get<std::string>();
    for (const auto& [key, v] : set.items())
      if (key != "name" && key != "combine" && key != "checks")
        return absl::InvalidArgumentError(absl::StrCat(where, " (", name, "): unknown key '", key, "' (name, combine, checks)"));
    const std::string combine = set.value("combine", "mean");
    if (combine != "mean" && combine != "all" && combine != "any" && combine != "sum")
      return absl::InvalidArgumentError(absl::StrCat(where, " (", name, "): 'combine' must be mean, all, any or sum"));
    auto checks = parse_checks(set.value("checks", json()), absl::StrCat(where, " (", name, ")"));
    if (!checks.ok()) return checks.status();
    if (registry.contains(name))
      return absl::AlreadyExistsError(absl::StrCat(where, ": a reward named '", name, "' exists already"));
    auto shared = std::make_shared<const DeclarativeReward>(name, combine, *std::move(checks));
    registry.add(name, [shared, name](const json& p) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
      if (!p.empty()) return absl::InvalidArgumentError(absl::StrCat(name, ": a YAML rule set takes no params"));
      return std::unique_ptr<RewardFn>(std::make_unique<DeclarativeReward>(*shared));
    });
  }
  return absl::OkStatus();
}

absl::Status load_library(const std::string& path, RewardRegistry& registry) {
  auto lib = std::make_shared<Library>();
  // A path with a slash is opened as given, never searched for.
  const std::string p = path.find('/') == std::string::npos ? "./" + path : path;
  lib->handle = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib->handle) return absl::NotFoundError(absl::StrCat("reward plugin ", path, ": ", dlerror()));
  auto sym = [&](const char* name, auto& fn) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib->handle, name));
    return fn != nullptr;
  };
  for (bool ok : {sym("r1lab_reward_abi_version", lib->abi_version), sym("r1lab_reward_names", lib->names),
                  sym("r1lab_reward_create", lib->create), sym("r1lab_reward_score", lib->score),
                  sym("r1lab_reward_destroy", lib->destroy)})
    if (!ok)
      return absl::InvalidArgumentError(absl::StrCat(
          "reward plugin ", path, " lacks the r1lab_reward_* functions of rewards/plugin_abi.h"));
  if (lib->abi_version() != R1LAB_REWARD_ABI_VERSION)
    return absl::FailedPreconditionError(absl::StrCat("reward plugin ", path, " was built for ABI version ",
                                                      lib->abi_version(), "; this r1lab has ", R1LAB_REWARD_ABI_VERSION));
  const char* names = lib->names();
  if (!names || !*names) return absl::InvalidArgumentError(absl::StrCat("reward plugin ", path, " names no rewards"));
  for (absl::string_view n : absl::StrSplit(names, ',', absl::SkipWhitespace())) {
    const std::string name(n);
    if (registry.contains(name))
      return absl::AlreadyExistsError(absl::StrCat("reward plugin ", path, ": a reward named '", name, "' exists already"));
    registry.add(name, [lib, name, path](const json& params) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
      char error[512] = {0};
      void* instance = lib->create(name.c_str(), params.dump().c_str(), error, sizeof(error));
      error[sizeof(error) - 1] = '\0';
      if (!instance)
        return absl::InvalidArgumentError(absl::StrCat(name, " (", path, "): ", error[0] ? error : "cannot create"));
      return std::unique_ptr<RewardFn>(std::make_unique<LibraryReward>(lib, instance, name));
    });
  }
  return absl::OkStatus();
}

absl::Status add_remote_rewards(const std::string& target, const std::vector<std::string>& names, double timeout_s,
                                RewardRegistry& registry) {
  std::shared_ptr<RewardClient> client = make_grpc_reward_client(target, timeout_s > 0 ? timeout_s : 30);
  auto offered = client->list();
  if (!offered.ok())
    return absl::UnavailableError(absl::StrCat("reward server ", target, ": ", offered.status().message()));
  std::vector<std::string> use = names;
  if (use.empty())
    for (const RewardInfo& r : *offered) use.push_back(r.name);
  for (const std::string& name : use) {
    bool found = false;
    for (const RewardInfo& r : *offered) found = found || r.name == name;
    if (!found) return absl::NotFoundError(absl::StrCat("reward server ", target, " does not offer '", name, "'"));
    if (registry.contains(name))
      return absl::AlreadyExistsError(absl::StrCat("reward server ", target, ": a reward named '", name, "' exists already"));
    registry.add(name, [client, name, target](const json& params) -> absl::StatusOr<std::unique_ptr<RewardFn>> {
      if (!params.empty())
        return absl::InvalidArgumentError(absl::StrCat(name, ": a remote reward is configured on its server, not here"));
      return std::unique_ptr<RewardFn>(std::make_unique<RemoteReward>(client, name, target));
    });
  }
  return absl::OkStatus();
}

absl::StatusOr<RewardSet> load_reward_set(const json& config, const std::string& base_dir) {
  RewardRegistry registry = RewardRegistry::with_builtin_rules();
  json spec = config.is_null() ? json::object() : config;
  if (!spec.is_object()) return absl::InvalidArgumentError("reward config: an object of plugins and named rewards");
  if (spec.contains("plugins")) {
    const json& plugins = spec["plugins"];
    if (!plugins.is_array()) return absl::InvalidArgumentError("reward config: 'plugins' must be a list");
    for (size_t i = 0; i < plugins.size(); ++i) {
      const json& p = plugins[i];
      absl::Status st;
      if (p.is_object() && p.contains("yaml") && p["yaml"].is_string()) {
        st = load_yaml_rules(resolve(p["yaml"], base_dir), registry);
      } else if (p.is_object() && p.contains("library") && p["library"].is_string()) {
        st = load_library(resolve(p["library"], base_dir), registry);
      } else if (p.is_object() && p.contains("server") && p["server"].is_string()) {
        std::vector<std::string> names;
        if (p.contains("rewards")) {
          if (!p["rewards"].is_array()) return absl::InvalidArgumentError("reward config: plugin 'rewards' must be a list");
          for (const auto& n : p["rewards"]) {
            if (!n.is_string()) return absl::InvalidArgumentError("reward config: plugin 'rewards' must be names");
            names.push_back(n.get<std::string>());
          }
        }
        if (p.contains("timeout_s") && !p["timeout_s"].is_number())
          return absl::InvalidArgumentError("reward config: plugin 'timeout_s' must be a number");
        st = add_remote_rewards(p["server"], names, p.value("timeout_s", 30.0), registry);
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            "reward config: plugin ", i, " must be {\"yaml\": FILE}, {\"library\": FILE.so} or {\"server\": HOST:PORT}"));
      }
      if (!st.ok()) return st;
    }
    spec.erase("plugins");
  }
  return RewardSet::make(registry, spec);
}

absl::StatusOr<RewardSet> load_reward_set_file(const std::string& path) {
  auto doc = data::read_json_or_yaml(path);
  if (!doc.ok()) return doc.status();
  auto set = load_reward_set(*doc, std::filesystem::path(path).parent_path().string());
  if (!set.ok()) return absl::Status(set.status().code(), absl::StrCat(path, ": ", set.status().message()));
  return set;
}

}  // namespace r1lab::rewards
