#include <cmath>
#include <numeric>

#include "common/half.h"
#include "common/mapped_file.h"
#include "common/status.h"
#include "common/thread_pool.h"
#include "tests/testing/testing.h"

namespace loraplex {
namespace {

using ::loraplex::testing::StatusIs;

TEST(HalfTest, Bf16RoundTripsAndRoundsToNearestEven) {
  for (float f : {0.0f, 1.0f, -2.5f, 3.140625f, 65504.0f, 1e-30f}) {
    EXPECT_EQ(Bf16ToF32(F32ToBf16(f)), Bf16ToF32(F32ToBf16(Bf16ToF32(F32ToBf16(f)))));
  }
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f)), 1.0f);
  // 1 + 2^-8 is exactly half way between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
}

TEST(HalfTest, F16RoundTripsEveryFiniteValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    uint16_t bits = static_cast<uint16_t>(h);
    float f = F16ToF32(bits);
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToF16(f), bits) << "h=" << h << " f=" << f;
  }
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F32ToF16(1e6f), 0x7c00);
}

TEST(MappedFileTest, MissingFileIsNotFoundAndNamesThePath) {
  auto f = MappedFile::Open("/nonexistent/file.bin");
  EXPECT_THAT(f, StatusIs(absl::StatusCode::kNotFound, "/nonexistent/file.bin"));
}

TEST(MappedFileTest, DirectoryIsRejected) {
  EXPECT_THAT(MappedFile::Open("/tmp"), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ThreadPoolTest, CoversRangeExactlyOnce) {
  ThreadPool pool(4);
  for (int64_t n : {1, 2, 3, 7, 100, 1001}) {
    std::vector<std::atomic<int>> hits(n);
    pool.ParallelFor(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

TEST(ThreadPoolTest, NestedCallsRunInline) {
  ThreadPool pool(3);
  std::atomic<int64_t> total{0};
  pool.ParallelFor(6, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      pool.ParallelFor(10, [&](int64_t b2, int64_t e2) { total.fetch_add(e2 - b2); });
    }
  });
  EXPECT_EQ(total.load(), 60);
}

absl::StatusOr<int> Half(int x) {
  if (x % 2) return absl::InvalidArgumentError("odd");
  return x / 2;
}

absl::Status UseMacros(int x, int* out) {
  LP_ASSIGN_OR_RETURN(int h, Half(x));
  LP_RETURN_IF_ERROR(h > 100 ? absl::OutOfRangeError("big") : absl::OkStatus());
  *out = h;
  return absl::OkStatus();
}

TEST(StatusMacrosTest, PropagateErrorsAndValues) {
  int out = 0;
  EXPECT_OK(UseMacros(8, &out));
  EXPECT_EQ(out, 4);
  EXPECT_THAT(UseMacros(3, &out), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(UseMacros(400, &out), StatusIs(absl::StatusCode::kOutOfRange));
}

}  // namespace
}  // namespace loraplex
