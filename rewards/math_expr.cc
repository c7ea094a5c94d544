#include "rewards/math_expr.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>

namespace r1lab::rewards::math {
namespace {

using Kind = Node::Kind;

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

constexpr std::string_view kFunctions[] = {"sin",    "cos",    "tan",  "sec",  "csc",  "cot",   "arcsin",
                                           "arccos", "arctan", "sinh", "cosh", "tanh", "ln",    "log",
                                           "exp",    "sqrt",   "lg",   "arcsec", "arccsc", "arccot"};
constexpr std::string_view kGreek[] = {
    "alpha", "beta",   "gamma", "delta", "epsilon", "varepsilon", "zeta",  "eta",   "theta",  "vartheta",
    "iota",  "kappa",  "lambda", "mu",   "nu",      "xi",         "rho",   "sigma", "tau",    "upsilon",
    "phi",   "varphi", "chi",   "psi",   "omega",   "Gamma",      "Delta", "Theta", "Lambda", "Xi",
    "Sigma", "Phi",    "Psi",   "Omega", "ell"};

bool is_function(std::string_view w) {
  return std::find(std::begin(kFunctions), std::end(kFunctions), w) != std::end(kFunctions);
}
bool is_greek(std::string_view w) { return std::find(std::begin(kGreek), std::end(kGreek), w) != std::end(kGreek); }

// Recursive descent over the characters of a normalised answer:
//   expr    := term (('+' | '-') term)*
//   term    := unary (('*' | \cdot | \times | '/' | \div) unary | <implicit> power)*
//   unary   := ('-' | '+') unary | power
//   power   := postfix ('^' exponent)?
//   postfix := primary ('!')*
//   primary := number | (expr) | [expr] | {expr} | |expr| | \frac a b | \sqrt[n] a | function arg
//            | constant | symbol
class Parser {
 public:
  Parser(std::string_view s, int max_depth, int max_nodes) : s_(s), max_depth_(max_depth), max_nodes_(max_nodes) {}

  std::optional<Expr> run() {
    const int r = expr(0);
    skip();
    if (failed_ || r < 0 || pos_ != s_.size()) return std::nullopt;
    e_.root = r;
    return std::move(e_);
  }

 private:
  int fail() {
    failed_ = true;
    return -1;
  }
  int add(Node n) {
    if (failed_ || static_cast<int>(e_.nodes.size()) >= max_nodes_) return fail();
    e_.nodes.push_back(std::move(n));
    return static_cast<int>(e_.nodes.size()) - 1;
  }
  int node(Kind k, int a = -1, int b = -1) {
    if (failed_ || (a < 0 && k != Kind::kPi && k != Kind::kE && k != Kind::kInfinity)) return fail();
    Node n;
    n.kind = k;
    n.a = a;
    n.b = b;
    return add(std::move(n));
  }
  int symbol(std::string name) {
    Node n;
    n.kind = Kind::kSymbol;
    n.name = std::move(name);
    return add(std::move(n));
  }
  int number(mpq_class v, int digits, int decimals, bool integer_literal) {
    Node n;
    n.kind = Kind::kNumber;
    n.num = static_cast<int>(e_.numbers.size());
    n.digits = digits;
    n.decimals = decimals;
    n.integer_literal = integer_literal;
    e_.numbers.push_back(std::move(v));
    return add(std::move(n));
  }

  void skip() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  char peek() {
    skip();
    return pos_ < s_.size() ? s_[pos_] : '\0';
  }
  bool eat(char c) {
    if (peek() != c) return false;
    ++pos_;
    return true;
  }
  // The name of the command at the cursor ("frac" for "\frac"), without consuming it.
  std::string_view command() {
    if (peek() != '\\') return {};
    size_t end = pos_ + 1;
    while (end < s_.size() && is_alpha(s_[end])) ++end;
    return s_.substr(pos_ + 1, end - pos_ - 1);
  }
  bool eat_command(std::string_view name) {
    if (command() != name) return false;
    pos_ += 1 + name.size();
    return true;
  }
  bool deep(int d) {
    if (d > max_depth_) {
      failed_ = true;
      return true;
    }
    return false;
  }

  int expr(int d) {
    if (deep(d)) return -1;
    int t = term(d);
    while (!failed_) {
      if (eat('+')) {
        t = node(Kind::kAdd, t, term(d));
      } else if (eat('-')) {
        t = node(Kind::kSub, t, term(d));
      } else {
        break;
      }
    }
    return t;
  }

  // Whether an implicit product continues here: 2x, 3\sqrt{2}, (a)(b), 2\pi.
  bool starts_factor() {
    const char c = peek();
    if (c == '\0') return false;
    if (is_digit(c) || is_alpha(c) || c == '(' || c == '{') return true;
    if (c == '\\') {
      const std::string_view cmd = command();
      return !(cmd.empty() || cmd == "cdot" || cmd == "times" || cmd == "div" || cmd == "ast" || cmd == "le" ||
               cmd == "leq" || cmd == "ge" || cmd == "geq" || cmd == "ne" || cmd == "neq" || cmd == "pm" ||
               cmd == "mp" || cmd == "cup" || cmd == "cap" || cmd == "lt" || cmd == "gt" || cmd == "approx" ||
               cmd == "in" || cmd == "to" || cmd == "end" || cmd == "right");
    }
    return false;
  }

  bool integer_literal(int i) const { return i >= 0 && e_.nodes[i].kind == Kind::kNumber && e_.nodes[i].integer_literal; }

  int term(int d) {
    int f = unary(d + 1);
    while (!failed_) {
      if (eat('*') || eat_command("cdot") || eat_command("times") || eat_command("ast")) {
        f = node(Kind::kMul, f, unary(d + 1));
      } else if (eat('/') || eat_command("div")) {
        f = node(Kind::kDiv, f, unary(d + 1));
      } else if (starts_factor()) {
        const bool frac = command() == "frac";
        const int g = power(d + 1);
        if (failed_) return -1;
        // A mixed number: 3\frac{1}{2} = 3 + 1/2 (and -3\frac{1}{2} = -(3 + 1/2)).
        const Node& gn = e_.nodes[g];
        const bool literal_frac = frac && gn.kind == Kind::kDiv && integer_literal(gn.a) && integer_literal(gn.b);
        if (literal_frac && integer_literal(f)) {
          f = node(Kind::kAdd, f, g);
        } else if (literal_frac && e_.nodes[f].kind == Kind::kNeg && integer_literal(e_.nodes[f].a)) {
          f = node(Kind::kNeg, node(Kind::kAdd, e_.nodes[f].a, g));
        } else {
          f = node(Kind::kMul, f, g);
        }
      } else {
        break;
      }
    }
    return f;
  }

  int unary(int d) {
    if (deep(d)) return -1;
    if (eat('-')) return node(Kind::kNeg, unary(d + 1));
    if (eat('+')) return unary(d + 1);
    return power(d);
  }

  int power(int d) {
    if (deep(d)) return -1;
    const int base = postfix(d + 1);
    if (failed_) return -1;
    if (eat('^')) return node(Kind::kPow, base, exponent(d + 1));
    return base;
  }

  // An exponent: {expr}, a signed exponent, or one primary (itself possibly raised: 2^3^2 = 2^(3^2)).
  int exponent(int d) {
    if (deep(d)) return -1;
    if (eat('-')) return node(Kind::kNeg, exponent(d + 1));
    if (eat('+')) return exponent(d + 1);
    const int p = postfix(d + 1);
    if (failed_) return -1;
    if (eat('^')) return node(Kind::kPow, p, exponent(d + 1));
    return p;
  }

  int postfix(int d) {
    int p = primary(d);
    while (!failed_ && pos_ < s_.size() && s_[pos_] == '!') {
      ++pos_;
      p = node(Kind::kFactorial, p);
    }
    return p;
  }

  // A LaTeX argument: {expr} or a single character (\frac12, \sqrt3) or a command (\frac\pi2).
  int arg(int d) {
    if (deep(d)) return -1;
    const char c = peek();
    if (c == '{') {
      ++pos_;
      const int e = expr(d + 1);
      if (!eat('}')) return fail();
      return e;
    }
    if (is_digit(c)) {
      ++pos_;
      return number(mpq_class(c - '0'), 0, 0, true);
    }
    if (is_alpha(c)) {
      ++pos_;
      return letter_symbol(c);
    }
    if (c == '\\') return primary(d + 1);
    return fail();
  }

  int letter_symbol(char c) {
    if (c == 'e') return node(Kind::kE);
    return symbol(std::string(1, c));
  }

  // digits [. digits] [e[+-]digits]
  int read_number() {
    const size_t start = pos_;
    std::string digits;
    int decimals = 0;
    bool point = false;
    while (pos_ < s_.size()) {
      const char c = s_[pos_];
      if (is_digit(c)) {
        digits.push_back(c);
        if (point) ++decimals;
      } else if (c == '.' && !point && pos_ + 1 < s_.size() && is_digit(s_[pos_ + 1])) {
        point = true;
      } else {
        break;
      }
      ++pos_;
    }
    if (digits.empty() || digits.size() > 100000) return fail();
    long exp10 = 0;
    if (pos_ + 1 < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      size_t q = pos_ + 1;
      bool neg = false;
      if (q < s_.size() && (s_[q] == '+' || s_[q] == '-')) neg = s_[q++] == '-';
      const size_t exp_start = q;
      while (q < s_.size() && is_digit(s_[q]) && q - exp_start < 7) ++q;
      if (q > exp_start && (q >= s_.size() || !is_digit(s_[q]))) {
        exp10 = std::stol(std::string(s_.substr(exp_start, q - exp_start)));
        if (neg) exp10 = -exp10;
        pos_ = q;
        point = true;  // scientific notation is a written approximation like a decimal
      }
    }
    if (std::labs(exp10) > 100000) return fail();
    mpz_class n(digits, 10);
    mpq_class v(n);
    mpz_class scale;
    mpz_ui_pow_ui(scale.get_mpz_t(), 10, static_cast<unsigned long>(std::labs(exp10 - decimals)));
    if (exp10 - decimals < 0) {
      v /= scale;
    } else {
      v *= scale;
    }
    v.canonicalize();
    int significant = 0;
    if (point) {
      const size_t first = digits.find_first_not_of('0');
      significant = first == std::string::npos ? 1 : static_cast<int>(digits.size() - first);
    }
    (void)start;
    return number(std::move(v), significant, decimals - static_cast<int>(exp10), !point);
  }

  // name(args) of a function written as a command or a word; an optional power (\sin^2 x) and, for
  // logarithms, a base (\log_2 8).
  int function(std::string name, int d) {
    if (name == "sqrt") {
      return root(d);
    }
    int power_of = -1, base = -1;
    for (int i = 0; i < 2; ++i) {
      if (eat('^')) {
        power_of = exponent(d + 1);
      } else if (eat('_')) {
        base = arg(d + 1);
      }
    }
    int a;
    if (peek() == '(') {
      ++pos_;
      a = expr(d + 1);
      if (!eat(')')) return fail();
    } else {
      // \sin 2x, \ln 5: factors up to the next operator or command.
      a = power(d + 1);
      while (!failed_ && (is_digit(peek()) || is_alpha(peek()))) a = node(Kind::kMul, a, power(d + 1));
    }
    Node n;
    n.kind = Kind::kFunc;
    n.name = name == "lg" ? "log10" : name;
    n.a = a;
    n.b = base;
    int f = failed_ || a < 0 ? fail() : add(std::move(n));
    if (power_of >= 0) f = node(Kind::kPow, f, power_of);
    return f;
  }

  int root(int d) {
    int index = -1;
    if (peek() == '[') {
      ++pos_;
      index = expr(d + 1);
      if (!eat(']')) return fail();
    }
    int a;
    if (peek() == '(') {  // sqrt(2) in plain text
      ++pos_;
      a = expr(d + 1);
      if (!eat(')')) return fail();
    } else {
      a = arg(d + 1);
    }
    Node n;
    n.kind = Kind::kRoot;
    n.a = a;
    n.b = index;
    return failed_ ? -1 : add(std::move(n));
  }

  int primary(int d) {
    if (deep(d)) return -1;
    const char c = peek();
    if (c == '(' || c == '[' || c == '{') {
      ++pos_;
      const int e = expr(d + 1);
      if (!eat(c == '(' ? ')' : c == '[' ? ']' : '}')) return fail();
      return e;
    }
    if (c == '|') {
      ++pos_;
      const int e = expr(d + 1);
      if (!eat('|')) return fail();
      return node(Kind::kAbs, e);
    }
    if (is_digit(c) || (c == '.' && pos_ + 1 < s_.size() && is_digit(s_[pos_ + 1]))) {
      const int n = read_number();
      // A number in another base: 204_5 is a literal, not a value in base ten.
      if (!failed_ && pos_ < s_.size() && s_[pos_] == '_') {
        const size_t start = pos_ + 1;
        ++pos_;
        if (eat('{')) {
          while (pos_ < s_.size() && s_[pos_] != '}') ++pos_;
          if (!eat('}')) return fail();
        } else if (pos_ < s_.size()) {
          ++pos_;
        }
        Node& num = e_.nodes[n];
        std::string name = num.integer_literal ? e_.numbers[num.num].get_str() : "?";
        std::string sub(s_.substr(start, pos_ - start));
        sub.erase(std::remove_if(sub.begin(), sub.end(), [](char ch) { return ch == '{' || ch == '}' || ch == ' '; }),
                  sub.end());
        return symbol(name + "_" + sub);
      }
      return n;
    }
    if (is_alpha(c)) return word(d);
    if (c == '\\') {
      const std::string_view cmd = command();
      if (cmd.empty()) return fail();
      pos_ += 1 + cmd.size();
      if (cmd == "frac" || cmd == "dfrac" || cmd == "tfrac" || cmd == "cfrac") {
        const int num = arg(d + 1);
        const int den = arg(d + 1);
        return node(Kind::kDiv, num, den);
      }
      if (cmd == "sqrt") return root(d);
      if (cmd == "pi") return node(Kind::kPi);
      if (cmd == "infty" || cmd == "infinity") return node(Kind::kInfinity);
      if (cmd == "atom") {  // \atom{text} from normalise(): an opaque literal (a name, a word)
        if (!eat('{')) return fail();
        const size_t close = s_.find('}', pos_);
        if (close == std::string_view::npos) return fail();
        std::string name = "text:" + std::string(s_.substr(pos_, close - pos_));
        pos_ = close + 1;
        return symbol(std::move(name));
      }
      if (is_function(cmd)) return function(std::string(cmd), d + 1);
      if (is_greek(cmd)) return subscripted(std::string("\\") + std::string(cmd));
      return fail();
    }
    return fail();
  }

  // A symbol with an optional subscript: x_1, a_{n+1}.
  int subscripted(std::string name) {
    if (pos_ < s_.size() && s_[pos_] == '_') {
      ++pos_;
      const size_t start = pos_;
      if (eat('{')) {
        int depth = 1;
        while (pos_ < s_.size() && depth > 0) {
          depth += s_[pos_] == '{' ? 1 : s_[pos_] == '}' ? -1 : 0;
          ++pos_;
        }
        if (depth != 0) return fail();
      } else if (pos_ < s_.size()) {
        ++pos_;
      }
      std::string sub(s_.substr(start, pos_ - start));
      sub.erase(std::remove_if(sub.begin(), sub.end(), [](char ch) { return ch == '{' || ch == '}' || ch == ' '; }),
                sub.end());
      name += "_" + sub;
    }
    return symbol(std::move(name));
  }

  // A run of letters: a function (sin x), a constant (pi), f(2), a word (an opaque literal), or
  // single-letter symbols multiplied (xy).
  int word(int d) {
    size_t end = pos_;
    while (end < s_.size() && is_alpha(s_[end])) ++end;
    const std::string w(s_.substr(pos_, end - pos_));
    if (is_function(w)) {
      pos_ = end;
      return function(w, d + 1);
    }
    if (w == "pi") {
      pos_ = end;
      return node(Kind::kPi);
    }
    if (w == "inf" || w == "infinity" || w == "infty") {
      pos_ = end;
      return node(Kind::kInfinity);
    }
    if (w.size() >= 4) {  // a word: "Evelyn", "none", "undefined"
      pos_ = end;
      std::string lower = w;
      for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return symbol("text:" + lower);
    }
    // f(2), g(x): an unknown function applied, kept as a literal of its argument's text.
    if (w.size() == 1 && (w[0] == 'f' || w[0] == 'g' || w[0] == 'h') && end < s_.size() && s_[end] == '(') {
      const size_t close = s_.find(')', end);
      if (close == std::string_view::npos) return fail();
      std::string inner(s_.substr(end + 1, close - end - 1));
      inner.erase(std::remove(inner.begin(), inner.end(), ' '), inner.end());
      pos_ = close + 1;
      return symbol(w + "(" + inner + ")");
    }
    // One letter at a time; the term loop multiplies the rest.
    const char c = s_[pos_++];
    if (c == 'e') return node(Kind::kE);
    return subscripted(std::string(1, c));
  }

  std::string_view s_;
  size_t pos_ = 0;
  const int max_depth_, max_nodes_;
  bool failed_ = false;
  Expr e_;
};

// Exact evaluation (nullopt when the value is not rational or too large).
constexpr size_t kMaxBits = size_t{1} << 20;

size_t bits(const mpq_class& q) {
  return mpz_sizeinbase(q.get_num_mpz_t(), 2) + mpz_sizeinbase(q.get_den_mpz_t(), 2);
}

// The exact r-th root of a non-negative rational, if it is rational.
std::optional<mpq_class> exact_root(const mpq_class& q, unsigned long r) {
  if (r == 0 || sgn(q) < 0) return std::nullopt;
  mpz_class n, d;
  if (!mpz_root(n.get_mpz_t(), q.get_num_mpz_t(), r) || !mpz_root(d.get_mpz_t(), q.get_den_mpz_t(), r))
    return std::nullopt;
  mpq_class out(n, d);
  out.canonicalize();
  return out;
}

std::optional<mpq_class> exact_pow(const mpq_class& base, const mpq_class& ex) {
  if (ex.get_den() != 1) {
    // b^(p/q): the q-th root when it is rational.
    if (!ex.get_den().fits_ulong_p() || ex.get_den() > 64) return std::nullopt;
    auto r = exact_root(base, ex.get_den().get_ui());
    if (!r) return std::nullopt;
    return exact_pow(*r, mpq_class(ex.get_num()));
  }
  const mpz_class& e = ex.get_num();
  if (sgn(base) == 0) {
    if (sgn(e) < 0) return std::nullopt;
    return mpq_class(sgn(e) == 0 ? 1 : 0);
  }
  if (!e.fits_slong_p()) return std::nullopt;
  const long k = e.get_si();
  const unsigned long m = static_cast<unsigned long>(std::labs(k));
  if (base == 1) return mpq_class(1);
  if (base == -1) return mpq_class(m % 2 ? -1 : 1);
  if (static_cast<double>(bits(base)) * static_cast<double>(m) > static_cast<double>(kMaxBits)) return std::nullopt;
  mpz_class n, d;
  mpz_pow_ui(n.get_mpz_t(), base.get_num_mpz_t(), m);
  mpz_pow_ui(d.get_mpz_t(), base.get_den_mpz_t(), m);
  mpq_class out = k >= 0 ? mpq_class(n, d) : mpq_class(d, n);
  out.canonicalize();
  return out;
}

std::optional<mpq_class> exact(const Expr& e, int i) {
  const Node& n = e.nodes[i];
  switch (n.kind) {
    case Kind::kNumber:
      return e.numbers[n.num];
    case Kind::kNeg: {
      auto a = exact(e, n.a);
      if (!a) return std::nullopt;
      return mpq_class(-*a);
    }
    case Kind::kAdd:
    case Kind::kSub:
    case Kind::kMul:
    case Kind::kDiv: {
      auto a = exact(e, n.a);
      if (!a) return std::nullopt;
      auto b = exact(e, n.b);
      if (!b) return std::nullopt;
      if (bits(*a) + bits(*b) > 2 * kMaxBits) return std::nullopt;
      if (n.kind == Kind::kAdd) return mpq_class(*a + *b);
      if (n.kind == Kind::kSub) return mpq_class(*a - *b);
      if (n.kind == Kind::kMul) return mpq_class(*a * *b);
      if (sgn(*b) == 0) return std::nullopt;
      return mpq_class(*a / *b);
    }
    case Kind::kPow: {
      auto a = exact(e, n.a);
      if (!a) return std::nullopt;
      auto b = exact(e, n.b);
      if (!b) return std::nullopt;
      return exact_pow(*a, *b);
    }
    case Kind::kRoot: {
      auto a = exact(e, n.a);
      if (!a) return std::nullopt;
      unsigned long r = 2;
      if (n.b >= 0) {
        auto idx = exact(e, n.b);
        if (!idx || idx->get_den() != 1 || !idx->get_num().fits_ulong_p() || idx->get_num() > 64) return std::nullopt;
        r = idx->get_num().get_ui();
      }
      if (sgn(*a) < 0 && r % 2 == 1) {
        auto pos = exact_root(mpq_class(-*a), r);
        if (!pos) return std::nullopt;
        return mpq_class(-*pos);
      }
      return exact_root(*a, r);
    }
    case Kind::kFactorial: {
      auto a = exact(e, n.a);
      if (!a || a->get_den() != 1 || sgn(*a) < 0 || a->get_num() > 2000) return std::nullopt;
      mpz_class f;
      mpz_fac_ui(f.get_mpz_t(), a->get_num().get_ui());
      return mpq_class(f);
    }
    case Kind::kAbs: {
      auto a = exact(e, n.a);
      if (!a) return std::nullopt;
      return mpq_class(abs(*a));
    }
    default:
      return std::nullopt;
  }
}

double func(const std::string& name, double x, double base) {
  if (name == "sin") return std::sin(x);
  if (name == "cos") return std::cos(x);
  if (name == "tan") return std::tan(x);
  if (name == "sec") return 1 / std::cos(x);
  if (name == "csc") return 1 / std::sin(x);
  if (name == "cot") return 1 / std::tan(x);
  if (name == "arcsin") return std::asin(x);
  if (name == "arccos") return std::acos(x);
  if (name == "arctan") return std::atan(x);
  if (name == "arcsec") return std::acos(1 / x);
  if (name == "arccsc") return std::asin(1 / x);
  if (name == "arccot") return std::atan(1 / x);
  if (name == "sinh") return std::sinh(x);
  if (name == "cosh") return std::cosh(x);
  if (name == "tanh") return std::tanh(x);
  if (name == "exp") return std::exp(x);
  if (name == "ln") return std::log(x);
  if (name == "log10") return std::log10(x);
  if (name == "log") return std::isnan(base) ? std::log(x) : std::log(x) / std::log(base);
  return std::numeric_limits<double>::quiet_NaN();
}

double numeric(const Expr& e, int i, const std::vector<std::pair<std::string, double>>& values) {
  const Node& n = e.nodes[i];
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  switch (n.kind) {
    case Kind::kNumber:
      return e.numbers[n.num].get_d();
    case Kind::kPi:
      return M_PI;
    case Kind::kE:
      return M_E;
    case Kind::kInfinity:
      return std::numeric_limits<double>::infinity();
    case Kind::kSymbol:
      for (const auto& [name, v] : values)
        if (name == n.name) return v;
      return kNaN;
    case Kind::kAdd:
      return numeric(e, n.a, values) + numeric(e, n.b, values);
    case Kind::kSub:
      return numeric(e, n.a, values) - numeric(e, n.b, values);
    case Kind::kMul:
      return numeric(e, n.a, values) * numeric(e, n.b, values);
    case Kind::kDiv:
      return numeric(e, n.a, values) / numeric(e, n.b, values);
    case Kind::kNeg:
      return -numeric(e, n.a, values);
    case Kind::kPow:
      return std::pow(numeric(e, n.a, values), numeric(e, n.b, values));
    case Kind::kRoot: {
      const double a = numeric(e, n.a, values);
      const double r = n.b >= 0 ? numeric(e, n.b, values) : 2.0;
      if (a < 0 && std::fmod(r, 2.0) == 1.0) return -std::pow(-a, 1 / r);
      return std::pow(a, 1 / r);
    }
    case Kind::kFactorial:
      return std::tgamma(numeric(e, n.a, values) + 1);
    case Kind::kAbs:
      return std::fabs(numeric(e, n.a, values));
    case Kind::kFunc:
      return func(n.name, numeric(e, n.a, values), n.b >= 0 ? numeric(e, n.b, values) : kNaN);
  }
  return kNaN;
}

}  // namespace

std::vector<std::string> Expr::symbols() const {
  std::vector<std::string> out;
  for (const Node& n : nodes)
    if (n.kind == Node::Kind::kSymbol) out.push_back(n.name);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

bool Expr::has_decimal() const {
  for (const Node& n : nodes)
    if (n.kind == Node::Kind::kNumber && n.digits > 0) return true;
  return false;
}

double Expr::decimal_rel_precision() const {
  double out = 0;
  for (const Node& n : nodes) {
    if (n.kind != Node::Kind::kNumber || n.digits < 6) continue;
    const double v = std::fabs(numbers[n.num].get_d());
    if (v == 0 || !std::isfinite(v)) continue;
    out = std::max(out, 0.5 * std::pow(10.0, -n.decimals) / v);
  }
  return out;
}

std::optional<Expr> parse_expr(std::string_view text, int max_depth, int max_nodes) {
  return Parser(text, max_depth, max_nodes).run();
}

std::optional<mpq_class> eval_exact(const Expr& e) {
  if (e.root < 0) return std::nullopt;
  return exact(e, e.root);
}

double eval_double(const Expr& e, const std::vector<std::pair<std::string, double>>& values) {
  if (e.root < 0) return std::numeric_limits<double>::quiet_NaN();
  return numeric(e, e.root, values);
}

}  // namespace r1lab::rewards::math
