// Helpers every test uses: status matchers (this Abseil ships none), paths to shared models and
// fixtures, and an all-close check that reports the max error and the first bad index.
#pragma once

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tests/testing/tolerances.h"

namespace loraplex::testing {

// ../shared beside the repository (LP_SHARED_DIR overrides). Tests run from the repository root.
std::string SharedDir();
// ../shared/models/stories260K
std::string Stories260KDir();
// tests/fixtures (LP_FIXTURES_DIR overrides).
std::string FixturesDir();
// A fresh empty directory under TEST_TMPDIR or /tmp, removed by nobody (tests are short-lived).
std::string MakeTempDir(const std::string& prefix);

// SmolLM2-135M-Instruct's GGUF as scripts/fetch-model.sh puts it, relative to the repository root.
inline constexpr const char* kSmolLm2Gguf = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
// True when a test whose model file is absent must fail instead of skipping: with
// LP_REQUIRE_MODELS=1 (scripts/test.sh, after scripts/fetch-model.sh succeeded) or CI=true, so
// that a download that went wrong cannot pass as a row of skipped tests.
bool MissingModelMustFail();
bool PathExists(const std::string& path);

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

MATCHER(IsOk, "is OK") {
  const absl::Status& s = GetStatus(arg);
  if (!s.ok()) *result_listener << "status: " << s.ToString();
  return s.ok();
}

MATCHER_P(StatusIs, code, "has code " + absl::StatusCodeToString(code)) {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status: " << s.ToString();
  return s.code() == code;
}

MATCHER_P2(StatusIs, code, substr,
           "has code " + absl::StatusCodeToString(code) + " and a message containing '" +
               std::string(substr) + "'") {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status: " << s.ToString();
  return s.code() == code && std::string(s.message()).find(substr) != std::string::npos;
}

// Compares element-wise with |a-b| <= atol + rtol*|b|. Returns a failure naming the max abs error,
// the first bad index and the values there; on success records the max error as a test property.
::testing::AssertionResult AllClose(const float* actual, const float* expected, size_t n,
                                    Tolerance tol);
inline ::testing::AssertionResult AllClose(const std::vector<float>& actual,
                                           const std::vector<float>& expected, Tolerance tol) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure() << "size " << actual.size() << " != " << expected.size();
  }
  return AllClose(actual.data(), expected.data(), actual.size(), tol);
}

}  // namespace loraplex::testing

#define LP_TEST_CONCAT_INNER_(a, b) a##b
#define LP_TEST_CONCAT_(a, b) LP_TEST_CONCAT_INNER_(a, b)
#define ASSERT_OK(expr) ASSERT_THAT((expr), ::loraplex::testing::IsOk())
#define EXPECT_OK(expr) EXPECT_THAT((expr), ::loraplex::testing::IsOk())
// In a test body or SetUp (it returns from there): when `path` (a model fetched by
// scripts/fetch-model.sh) is absent, skips the test, or fails it where MissingModelMustFail().
#define LP_SKIP_UNLESS_MODEL_EXISTS(path)                                                       \
  do {                                                                                          \
    const std::string lp_model_path_ = (path);                                                  \
    if (!::loraplex::testing::PathExists(lp_model_path_)) {                                     \
      if (::loraplex::testing::MissingModelMustFail()) {                                        \
        FAIL() << lp_model_path_                                                                \
               << " absent, and LP_REQUIRE_MODELS=1 or CI=true: run scripts/fetch-model.sh";    \
      }                                                                                         \
      GTEST_SKIP() << lp_model_path_ << " absent: run scripts/fetch-model.sh to run this test"; \
    }                                                                                           \
  } while (0)
#define ASSERT_OK_AND_ASSIGN(lhs, rexpr) \
  ASSERT_OK_AND_ASSIGN_IMPL_(LP_TEST_CONCAT_(lp_test_statusor_, __LINE__), lhs, rexpr)
#define ASSERT_OK_AND_ASSIGN_IMPL_(so, lhs, rexpr) \
  auto so = (rexpr);                               \
  ASSERT_TRUE(so.ok()) << so.status().ToString();  \
  lhs = std::move(so).value()
