// Status helpers shared by every folder. Abseil ships no RETURN_IF_ERROR macros; ours are
// prefixed so they never collide with another library's copy.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define LP_STATUS_CONCAT_INNER_(a, b) a##b
#define LP_STATUS_CONCAT_(a, b) LP_STATUS_CONCAT_INNER_(a, b)

// Returns from the current function with the status of `expr` when it is not OK.
#define LP_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::absl::Status lp_status_ = (expr);      \
    if (!lp_status_.ok()) return lp_status_; \
  } while (0)

// `LP_ASSIGN_OR_RETURN(auto x, F());` evaluates F() (an absl::StatusOr<T>), returns its status
// on error, and otherwise moves the value into `x`.
#define LP_ASSIGN_OR_RETURN(lhs, rexpr) \
  LP_ASSIGN_OR_RETURN_IMPL_(LP_STATUS_CONCAT_(lp_statusor_, __LINE__), lhs, rexpr)

#define LP_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr)    \
  auto statusor = (rexpr);                                 \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

namespace loraplex {

// Prefixes the message of a non-OK status with `context` ("file.gguf: " etc.), keeping its code.
inline absl::Status Annotate(const absl::Status& s, std::string_view context) {
  if (s.ok()) return s;
  return absl::Status(s.code(), std::string(context) + ": " + std::string(s.message()));
}

}  // namespace loraplex
