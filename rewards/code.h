// The code-execution reward: the program in a completion, run in the sandbox against the task's tests.
#pragma once

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "rewards/reward.h"
#include "sandbox/pool.h"
#include "sandbox/sandbox.h"

namespace r1lab::rewards {

struct ExtractedCode {
  std::string source;
  std::string language;  // the fence's tag ("python", "cpp", ...), "" when untagged
};
// The program of a completion: the last fenced block (```lang ... ```) inside <answer> when there is
// one, else in the whole completion; a block tagged with `prefer` wins over untagged ones. nullopt
// when there is no closed fence.
std::optional<ExtractedCode> extract_code(std::string_view completion, std::string_view prefer = "");

// Runs the extracted program against the sample's tests in the sandbox, the tests of one sample in
// parallel through a sandbox::Pool shared by all samples. Tests come from meta:
//   "tests": [{"input": "...", "output": "..."}, ...]   stdin -> expected stdout (lines compared without
//                                                        trailing whitespace), any language;
//   "asserts": ["assert add(1, 2) == 3", ...]           Python only: each appended to the program, passes
//                                                        when the program then exits 0.
// value: 1 when every test passes (mode "all", the default) or the fraction passed (mode "fraction").
// Components: "code.passed", "code.tests", and "test.<i>:<VERDICT>" (1 passed, 0 not) for each test.
// A host that cannot isolate programs gives an error (value 0), not an unsandboxed run, unless
// allow_unsafe. params: {"language": "python" (when the fence has no tag), "mode": "all" | "fraction",
// "time_limit_ms": 2000, "memory_mb": 256, "workers": 0 (CPUs), "allow_unsafe": false}.
class CodeReward final : public RewardFn {
 public:
  static absl::StatusOr<std::unique_ptr<CodeReward>> make(const nlohmann::json& params);
  ~CodeReward() override;
  Score score(const Sample& s) const override;

 private:
  CodeReward() = default;
  // The sandbox, started on first use (a reward set builds every rule, most never run code).
  absl::Status start() const;

  sandbox::Language default_language_ = sandbox::Language::kPython;
  bool fraction_ = false;
  sandbox::Limits limits_;
  int workers_ = 0;
  bool allow_unsafe_ = false;
  mutable std::once_flag started_;
  mutable absl::Status start_status_;
  mutable std::unique_ptr<sandbox::Runner> runner_;
  mutable std::unique_ptr<sandbox::Pool> pool_;
};

}  // namespace r1lab::rewards
