// Mathematical expressions as models and answer keys write them (LaTeX or plain text), parsed into a
// tree that can be evaluated exactly (rationals of any size, GMP) or numerically at chosen values of
// its free symbols. Used by math_equivalence.cc; not a computer-algebra system: equality of symbolic
// expressions is decided by evaluating both at the same random points.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <gmpxx.h>

namespace r1lab::rewards::math {

struct Node {
  enum class Kind : uint8_t {
    kNumber,     // numbers[num]; digits > 0 when written as a decimal with that many significant digits
    kPi,
    kE,
    kInfinity,
    kSymbol,     // a variable, an opaque atom (\text{...}, 204_5, f(2)): name
    kAdd,        // a + b
    kSub,        // a - b
    kMul,        // a · b
    kDiv,        // a / b
    kPow,        // a ^ b
    kNeg,        // -a
    kFunc,       // name(a); a log with a base: name "log", b = base
    kRoot,       // a ^ (1/b): \sqrt[b]{a}, b = -1 for the square root
    kFactorial,  // a!
    kAbs,        // |a|
  };
  Kind kind;
  int a = -1, b = -1;
  int num = -1;     // kNumber: index into Expr::numbers
  int digits = 0;   // kNumber: significant digits of a written decimal (0: exact)
  int decimals = 0; // kNumber: digits after the decimal point of a written decimal
  bool integer_literal = false;  // kNumber written as digits only (mixed numbers: 3\frac{1}{2})
  std::string name;
};

// One parsed expression: nodes in an arena, the root last.
struct Expr {
  std::vector<Node> nodes;
  std::vector<mpq_class> numbers;
  int root = -1;

  // Free symbols (sorted, unique).
  std::vector<std::string> symbols() const;
  // Whether any node is a written decimal (a value given to limited precision).
  bool has_decimal() const;
  // The finest rounding a written decimal implies: half a unit in its last place relative to the
  // number (e.g. 0.333333 -> 0.0000005 / 0.333333); 0 when no decimal has at least 6 significant digits
  // (fewer digits are taken as the value itself: 0.333 is not 1/3).
  double decimal_rel_precision() const;
};

// Parses a normalised answer (see normalise() in math_equivalence.h). nullopt when the text is not an
// expression. Bounded: at most `max_depth` nesting and `max_nodes` nodes, so hostile input fails fast.
std::optional<Expr> parse_expr(std::string_view text, int max_depth = 200, int max_nodes = 20000);

// Exact value when the expression is a rational number: integers, fractions, decimals, integer powers
// (results up to ~1 Mbit), roots that come out rational, factorials up to 2000!. nullopt otherwise.
std::optional<mpq_class> eval_exact(const Expr& e);

// Numeric value with every free symbol set by `value_of(name)`; NaN where undefined.
double eval_double(const Expr& e, const std::vector<std::pair<std::string, double>>& values);

}  // namespace r1lab::rewards::math
