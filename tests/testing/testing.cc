#include "tests/testing/testing.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <sstream>

namespace loraplex::testing {

std::string SharedDir() {
  if (const char* env = std::getenv("LP_SHARED_DIR")) return env;
  return "../shared";
}

std::string Stories260KDir() { return SharedDir() + "/models/stories260K"; }

std::string FixturesDir() {
  if (const char* env = std::getenv("LP_FIXTURES_DIR")) return env;
  return "tests/fixtures";
}

std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::filesystem::path root = base ? base : std::filesystem::temp_directory_path();
  std::random_device rd;
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::filesystem::path p = root / (prefix + "-" + std::to_string(rd()));
    std::error_code ec;
    if (std::filesystem::create_directories(p, ec)) return p.string();
  }
  return (root / prefix).string();
}

bool MissingModelMustFail() {
  for (const char* var : {"LP_REQUIRE_MODELS", "CI"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && (std::string(v) == "1" || std::string(v) == "true")) return true;
  }
  return false;
}

bool PathExists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

::testing::AssertionResult AllClose(const float* actual, const float* expected, size_t n,
                                    Tolerance tol) {
  double max_err = 0;
  size_t max_idx = 0;
  long long first_bad = -1;
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    double a = actual[i], e = expected[i];
    double err = std::fabs(a - e);
    if (std::isnan(a) != std::isnan(e)) err = INFINITY;
    if (err > max_err || std::isnan(err)) {
      max_err = err;
      max_idx = i;
    }
    if (!(err <= tol.atol + tol.rtol * std::fabs(e))) {
      if (first_bad < 0) first_bad = static_cast<long long>(i);
      ++bad;
    }
  }
  std::ostringstream msg;
  msg << "max abs error " << max_err << " at index " << max_idx << " over " << n << " elements";
  ::testing::Test::RecordProperty("max_abs_error", msg.str());
  if (first_bad < 0) return ::testing::AssertionSuccess() << msg.str();
  return ::testing::AssertionFailure()
         << msg.str() << "; " << bad << " outside atol=" << tol.atol << " rtol=" << tol.rtol
         << "; first bad index " << first_bad << ": actual " << actual[first_bad] << " expected "
         << expected[first_bad];
}

}  // namespace loraplex::testing
