#include "data/tasks.h"

#include <algorithm>
#include <random>

#include "core/check.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace r1lab::data {
namespace {

// One generator per (seed, index), independent of how many problems came before.
std::mt19937_64 rng_for(uint64_t seed, int64_t index, uint64_t task_salt) {
  uint64_t z = seed ^ (task_salt * 0x9e3779b97f4a7c15ull) ^ (static_cast<uint64_t>(index) * 0xbf58476d1ce4e5b9ull);
  z = (z ^ (z >> 31)) * 0x94d049bb133111ebull;
  return std::mt19937_64(z ^ (z >> 29));
}

int64_t uniform(std::mt19937_64& r, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(r);
}

int64_t pow10(int d) {
  int64_t p = 1;
  while (d-- > 0) p *= 10;
  return p;
}

}  // namespace

Problem arithmetic_problem(const ArithmeticOptions& o, uint64_t seed, int64_t index) {
  auto r = rng_for(seed, index, 1);
  CHECK(!o.ops.empty() && o.ops.find_first_not_of("+-*") == std::string::npos) << "arithmetic ops: " << o.ops;
  const char sym = o.ops[static_cast<size_t>(uniform(r, 0, static_cast<int64_t>(o.ops.size()) - 1))];
  const int op = sym == '+' ? 0 : sym == '-' ? 1 : 2;
  const int hi = op == 2 ? std::min(o.max_digits, 2) : o.max_digits;
  const int lo = std::min(o.min_digits, hi);
  auto operand = [&] {
    const int d = static_cast<int>(uniform(r, lo, hi));
    return uniform(r, d == 1 ? 1 : pow10(d - 1), pow10(d) - 1);
  };
  const int64_t a = operand(), b = operand();
  const int64_t value = op == 0 ? a + b : op == 1 ? a - b : a * b;
  Problem p;
  p.task = "arithmetic";
  p.question = absl::StrCat("What is ", a, " ", std::string(1, sym), " ", b, "?");
  p.answer = absl::StrCat(value);
  p.meta = {{"a", a}, {"b", b}, {"op", std::string(1, sym)}};
  return p;
}

Problem countdown_problem(const CountdownOptions& o, uint64_t seed, int64_t index) {
  auto r = rng_for(seed, index, 2);
  for (;;) {
    const int count = static_cast<int>(uniform(r, o.min_count, o.max_count));
    std::vector<int64_t> nums;
    for (int i = 0; i < count; ++i) nums.push_back(uniform(r, 1, o.max_number));
    // Combine left to right in a random order: value (op) next, keeping everything an integer.
    std::vector<int64_t> order = nums;
    std::shuffle(order.begin(), order.end(), r);
    int64_t value = order[0];
    std::string expr = absl::StrCat(order[0]);
    bool ok = true;
    for (size_t i = 1; i < order.size() && ok; ++i) {
      const int64_t x = order[i];
      switch (uniform(r, 0, 3)) {
        case 0:
          value += x;
          expr = absl::StrCat(expr, " + ", x);
          break;
        case 1:
          if (value - x <= 0) {
            value += x;
            expr = absl::StrCat(expr, " + ", x);
          } else {
            value -= x;
            expr = absl::StrCat(expr, " - ", x);
          }
          break;
        case 2:
          value *= x;
          expr = absl::StrCat("(", expr, ") * ", x);
          break;
        default:
          if (value % x == 0 && x > 1) {
            value /= x;
            expr = absl::StrCat("(", expr, ") / ", x);
          } else {
            value += x;
            expr = absl::StrCat(expr, " + ", x);
          }
      }
      ok = value > 0 && value <= o.max_target;
    }
    if (!ok) continue;
    Problem p;
    p.task = "countdown";
    p.question = absl::StrCat("Using the numbers [", absl::StrJoin(nums, ", "), "], create an equation that equals ",
                              value, ". You can use basic arithmetic operations (+, -, *, /) and each number can "
                              "only be used once.");
    p.answer = expr;
    p.meta = {{"numbers", nums}, {"target", value}};
    return p;
  }
}

absl::StatusOr<std::vector<Problem>> make_problems(const std::string& task, uint64_t seed, int64_t first,
                                                   int64_t n, const TaskOptions& options) {
  if (n < 0 || first < 0) return absl::InvalidArgumentError("make_problems: negative index or count");
  std::vector<Problem> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = first; i < first + n; ++i) {
    if (task == "arithmetic") {
      out.push_back(arithmetic_problem(options.arithmetic, seed, i));
    } else if (task == "countdown") {
      out.push_back(countdown_problem(options.countdown, seed, i));
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown task '", task, "' (arithmetic, countdown)"));
    }
  }
  return out;
}

absl::StatusOr<std::string> worked_solution(const Problem& p, bool slip, uint64_t seed) {
  if (p.task != "arithmetic" || !p.meta.is_object() || p.meta.value("op", "") != "+")
    return absl::UnimplementedError(absl::StrCat("worked solutions exist for additions only, not for '", p.question, "'"));
  const int64_t a = p.meta.value("a", int64_t{-1}), b = p.meta.value("b", int64_t{-1});
  if (a < 0 || b < 0) return absl::InvalidArgumentError(absl::StrCat("worked_solution: bad operands in ", p.meta.dump()));
  const std::string sa = absl::StrCat(a), sb = absl::StrCat(b);
  const size_t columns = std::max(sa.size(), sb.size());
  auto rng = rng_for(seed, a * 100003 + b, 3);
  const size_t slipped = slip ? static_cast<size_t>(uniform(rng, 0, static_cast<int64_t>(columns) - 1)) : columns;
  std::vector<std::string> steps;
  std::string digits;  // result digits, least significant first
  int carry = 0;
  for (size_t c = 0; c < columns; ++c) {
    const int da = c < sa.size() ? sa[sa.size() - 1 - c] - '0' : -1;
    const int db = c < sb.size() ? sb[sb.size() - 1 - c] - '0' : -1;
    int sum = std::max(da, 0) + std::max(db, 0) + carry;
    if (c == slipped) sum = sum == 0 ? 1 : sum + (uniform(rng, 0, 1) ? 1 : -1);
    std::string step;
    for (int d : {da, db}) {
      if (d < 0) continue;
      step = step.empty() ? absl::StrCat(d) : absl::StrCat(step, "+", d);
    }
    if (carry) step = absl::StrCat(step, "+", carry);
    steps.push_back(absl::StrCat(step, "=", sum));
    digits.push_back(static_cast<char>('0' + sum % 10));
    carry = sum / 10;
  }
  if (carry) digits.push_back(static_cast<char>('0' + carry));
  std::reverse(digits.begin(), digits.end());
  return absl::StrCat(" <think>", absl::StrJoin(steps, " "), "</think> <answer>", digits, "</answer>");
}

std::string r1_zero_prompt(const std::string& question) {
  return absl::StrCat(
      "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
      "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
      "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
      "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: ",
      question, " Assistant:");
}

}  // namespace r1lab::data
