// Early-return helpers for absl::Status / absl::StatusOr at the edges of the system.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define R1LAB_RETURN_IF_ERROR(expr)   \
  do {                                \
    absl::Status r1lab_s_ = (expr);   \
    if (!r1lab_s_.ok()) return r1lab_s_; \
  } while (0)

#define R1LAB_CONCAT_INNER(a, b) a##b
#define R1LAB_CONCAT(a, b) R1LAB_CONCAT_INNER(a, b)
#define R1LAB_ASSIGN_OR_RETURN(lhs, expr) \
  R1LAB_ASSIGN_OR_RETURN_IMPL(R1LAB_CONCAT(r1lab_so_, __LINE__), lhs, expr)
#define R1LAB_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()
