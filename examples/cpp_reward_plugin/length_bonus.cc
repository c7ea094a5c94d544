// An r1lab reward plugin: a shared library with the C ABI of rewards/plugin_abi.h, built without r1lab.
//
//   g++ -O2 -shared -fPIC -I<r1lab>/rewards length_bonus.cc -o liblength_bonus.so
//
// then in a recipe's reward section (or a reward config):
//   plugins: [{library: path/to/liblength_bonus.so}]
//   rules: [{name: length_bonus, weight: 0.2, params: {target: 400}}]
//
// Rewards offered:
//   length_bonus  1 at `target` characters of reasoning (inside <think>), falling linearly to 0 at 0
//                 and at 2 x target. params: {"target": 400}.
//   no_hedging    1 unless the answer says "I think" or "maybe". No params.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "plugin_abi.h"

namespace {

struct Reward {
  std::string name;
  double target = 400;
};

std::string_view view(const r1lab_text& t) { return {t.data, t.size}; }

std::string_view between(std::string_view s, std::string_view open, std::string_view close) {
  const size_t a = s.find(open);
  if (a == std::string_view::npos) return {};
  const size_t b = s.find(close, a + open.size());
  return b == std::string_view::npos ? s.substr(a + open.size()) : s.substr(a + open.size(), b - a - open.size());
}

void set_component(r1lab_score* out, const char* name, double value) {
  if (out->num_components >= R1LAB_REWARD_MAX_COMPONENTS) return;
  std::snprintf(out->component_names[out->num_components], sizeof(out->component_names[0]), "%s", name);
  out->component_values[out->num_components++] = value;
}

}  // namespace

extern "C" {

int r1lab_reward_abi_version(void) { return R1LAB_REWARD_ABI_VERSION; }

const char* r1lab_reward_names(void) { return "length_bonus,no_hedging"; }

void* r1lab_reward_create(const char* name, const char* params_json, char* error, size_t error_size) {
  auto* r = new Reward{name};
  // A real plugin would use a JSON library; this one reads its single number.
  if (const char* t = std::strstr(params_json, "\"target\"")) {
    const char* colon = std::strchr(t, ':');
    char* end = nullptr;
    r->target = colon ? std::strtod(colon + 1, &end) : 0;
    if (!colon || end == colon + 1 || !(r->target > 0)) {
      std::snprintf(error, error_size, "'target' must be a number > 0");
      delete r;
      return nullptr;
    }
  }
  if (r->name != "length_bonus" && r->name != "no_hedging") {
    std::snprintf(error, error_size, "no reward named '%s' here", name);
    delete r;
    return nullptr;
  }
  return r;
}

int r1lab_reward_score(void* reward, const r1lab_sample* sample, r1lab_score* out) {
  const auto* r = static_cast<const Reward*>(reward);
  const std::string_view completion = view(sample->completion);
  if (r->name == "length_bonus") {
    const double n = static_cast<double>(between(completion, "<think>", "</think>").size());
    out->value = std::fmax(0.0, 1.0 - std::fabs(n - r->target) / r->target);
    set_component(out, "length_bonus.chars", n);
  } else {
    const std::string_view answer = between(completion, "<answer>", "</answer>");
    const bool hedges = answer.find("I think") != std::string_view::npos || answer.find("maybe") != std::string_view::npos;
    out->value = hedges ? 0.0 : 1.0;
  }
  return 0;
}

void r1lab_reward_destroy(void* reward) { delete static_cast<Reward*>(reward); }

}  // extern "C"
