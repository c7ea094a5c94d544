// Built-in tasks with verifiable answers, generated from a seed: the same (task, seed, index) always
// gives the same problem, so runs replay exactly and train/held-out splits never overlap (they use
// different seeds).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace r1lab::data {

struct Problem {
  std::string task;      // "arithmetic" | "countdown"
  std::string question;  // what the user asks
  std::string answer;    // the reference answer (for countdown: one expression that reaches the target)
  nlohmann::json meta;   // for countdown {"numbers": [...], "target": N}
};

// Multi-digit arithmetic: a + b, a - b, a * b (those of `ops`) with operands of min_digits..max_digits
// digits (products use at most 2-digit factors).
struct ArithmeticOptions {
  int min_digits = 1, max_digits = 3;
  std::string ops = "+-*";
};
Problem arithmetic_problem(const ArithmeticOptions& o, uint64_t seed, int64_t index);

// Countdown as in TinyZero: `count` numbers in [1, max_number] and a target in [1, max_target] reached
// by an expression over all of them with + - * and exact /.
struct CountdownOptions {
  int min_count = 3, max_count = 4;
  int max_number = 99;
  int max_target = 999;
};
Problem countdown_problem(const CountdownOptions& o, uint64_t seed, int64_t index);

struct TaskOptions {
  ArithmeticOptions arithmetic;
  CountdownOptions countdown;
};
// `n` problems of a named task ("arithmetic" or "countdown"), indices first .. first + n - 1.
absl::StatusOr<std::vector<Problem>> make_problems(const std::string& task, uint64_t seed, int64_t first, int64_t n,
                                                   const TaskOptions& options = {});

// A worked solution in the R1 format, what follows the prompt's "Assistant:":
//   " <think>7+5=12 4+8+1=13</think> <answer>132</answer>"
// column by column from the right with carries (a + b only). With `slip` one column's digit sum is off
// by one and everything after it follows the slip, so the answer is wrong but consistent with the work,
// which is what the base model of the R1-Zero demo learns to do some of the time.
absl::StatusOr<std::string> worked_solution(const Problem& p, bool slip, uint64_t seed);

// The R1-Zero prompt around a question.
std::string r1_zero_prompt(const std::string& question);

}  // namespace r1lab::data
