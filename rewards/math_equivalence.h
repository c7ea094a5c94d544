// Math answer checking: find the answer in a completion, clean up how it is written, and decide whether
// it is the same mathematical object as the reference.
//
// Equivalence parses both sides into structure (lists, sets, tuples and intervals, unions, matrices,
// equations and inequalities, ±) over expression trees (math_expr.h) and compares:
//   numbers exactly as rationals of any size; written decimals within the precision they were written
//   to (0.333 = 1/3, 0.33 != 1/3) or a relative tolerance; symbolic expressions by evaluating both at the
//   same random points; equations and inequalities as the same relation up to a (positive) factor;
//   sets and multiple answers in any order; intervals with their bracket kinds; percentages either way.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "rewards/reward.h"

namespace r1lab::rewards {

struct MathOptions {
  double rel_tol = 1e-6;            // relative tolerance for values that are not both exact rationals
  bool percent_as_fraction = true;  // 50% also equals 0.5 (it always equals 50)
  bool ordered_lists = false;       // "1, 2" vs "2, 1": lists are unordered unless set
  int points = 8;                   // random points for expressions with symbols
};

// Where an answer is looked for in a completion, in a configurable order.
enum class AnswerSource { kAnswerTag, kBoxed, kAnswerIs, kLastMath, kLastNumber };
// "answer_tag", "boxed", "answer_is", "last_math" ($...$, \(...\), \[...\]), "last_number".
absl::StatusOr<AnswerSource> parse_answer_source(std::string_view name);
std::vector<AnswerSource> default_answer_sources();

// The content of the last \boxed{...} or \fbox{...} (nested braces), nullopt when there is none or it is
// not closed.
std::optional<std::string> last_boxed(std::string_view text);
// The answer of a completion: the first source in `order` that finds one. Inside <answer> tags a
// \boxed{} is preferred; an empty <answer></answer> means no answer.
std::optional<std::string> extract_math_answer(std::string_view completion, const std::vector<AnswerSource>& order);

// The written form with presentation removed: $ and \( \) \[ \] wrappers, \boxed, \left/\right, spacing,
// \dfrac/\tfrac, ^\circ, units, currency, thousands separators, \text{} (kept as an opaque word when it
// is not a unit); percent signs become a trailing '%'.
std::string normalise_math(std::string_view answer);

// Whether `pred` is the same answer as `gold` (both as written, before or after normalise_math).
bool math_equal(std::string_view gold, std::string_view pred, const MathOptions& options = {});

// 1 when the answer extracted from the completion equals the reference (a \boxed{} in the reference is
// used when present). params: {"extract": ["answer_tag", "boxed", "answer_is", "last_math", "last_number"],
// "rel_tol": 1e-6, "percent_as_fraction": true, "ordered_lists": false}.
class MathReward final : public RewardFn {
 public:
  static absl::StatusOr<std::unique_ptr<MathReward>> make(const nlohmann::json& params);
  Score score(const Sample& s) const override;

 private:
  std::vector<AnswerSource> order_;
  MathOptions options_;
};

// Multiple choice: 1 when the letter chosen in the answer ("B", "(B)", "B) 42", "\text{(B)}", "the
// answer is B") is the reference letter. params: {"extract": [...], "letters": "ABCDE"}.
class ChoiceReward final : public RewardFn {
 public:
  static absl::StatusOr<std::unique_ptr<ChoiceReward>> make(const nlohmann::json& params);
  Score score(const Sample& s) const override;

 private:
  std::vector<AnswerSource> order_;
  std::string letters_;
};

// The letter chosen in an answer text, nullopt when none of `letters` is chosen unambiguously.
std::optional<char> choice_letter(std::string_view answer, std::string_view letters);

}  // namespace r1lab::rewards
