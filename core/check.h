// Invariant checks for programmer errors (never for user input, which returns absl::Status).
// Debian 12's Abseil (20220623) predates absl/log, so ABSL_CHECK is not available; these keep its
// shape: CHECK(cond) << "message", reporting file and line, then abort.
#pragma once

#include <cstdlib>
#include <iostream>
#include <sstream>

namespace r1lab::core {

class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* expr) {
    stream_ << file << ":" << line << ": check failed: " << expr << " ";
  }
  [[noreturn]] ~CheckFailure() {
    std::cerr << stream_.str() << std::endl;
    std::abort();
  }
  std::ostream& stream() { return stream_; }

 private:
  std::ostringstream stream_;
};

}  // namespace r1lab::core

#define CHECK(cond) \
  while (!(cond)) ::r1lab::core::CheckFailure(__FILE__, __LINE__, #cond).stream()
#define R1LAB_CHECK_OP(a, b, op) \
  while (!((a)op(b))) ::r1lab::core::CheckFailure(__FILE__, __LINE__, #a " " #op " " #b).stream() \
      << "(" << (a) << " vs " << (b) << ") "
#define CHECK_EQ(a, b) R1LAB_CHECK_OP(a, b, ==)
#define CHECK_NE(a, b) R1LAB_CHECK_OP(a, b, !=)
#define CHECK_LE(a, b) R1LAB_CHECK_OP(a, b, <=)
#define CHECK_LT(a, b) R1LAB_CHECK_OP(a, b, <)
#define CHECK_GE(a, b) R1LAB_CHECK_OP(a, b, >=)
#define CHECK_GT(a, b) R1LAB_CHECK_OP(a, b, >)
