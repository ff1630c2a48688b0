// CudaRmsNorm (f32 and bf16) vs ref::RmsNorm on odd sizes. Skips when there is no CUDA device, so
// that CI without a GPU still builds (and links) the CUDA backend.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/kernels.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/kernel_test_util.h"
#include "tests/testing/testing.h"

namespace loraplex::kernels::cuda {
namespace {

using ::loraplex::kernels::testing::RandomVector;
using ::loraplex::kernels::testing::ToBf16;
using ::loraplex::testing::AllClose;
using ::loraplex::testing::StatusIs;

// Skips without a device, or fails with LP_REQUIRE_CUDA=1 (cuda_test_util.h).
class CudaRmsNormTest : public ::loraplex::kernels::cuda::testing::CudaTest {};

struct Size {
  int64_t rows, dim;
};
const Size kSizes[] = {{1, 1}, {3, 7}, {17, 576}, {5, 577}, {129, 33}, {2, 1537}, {1, 8191}};

TEST_F(CudaRmsNormTest, F32MatchesReference) {
  uint32_t seed = 1;
  for (const Size& s : kSizes) {
    SCOPED_TRACE(::testing::Message() << "rows=" << s.rows << " dim=" << s.dim);
    std::vector<float> x = RandomVector(s.rows * s.dim, seed++, -3.0f, 3.0f);
    std::vector<float> w = RandomVector(s.dim, seed++, 0.5f, 1.5f);
    std::vector<float> expected(x.size()), got(x.size());
    ref::RmsNorm(expected.data(), x.data(), w.data(), s.rows, s.dim, 1e-5f);
    ASSERT_OK_AND_ASSIGN(CudaBuffer d_x, CudaBuffer::Allocate(x.size() * sizeof(float)));
    ASSERT_OK_AND_ASSIGN(CudaBuffer d_w, CudaBuffer::Allocate(w.size() * sizeof(float)));
    ASSERT_OK_AND_ASSIGN(CudaBuffer d_out, CudaBuffer::Allocate(x.size() * sizeof(float)));
    ASSERT_OK(d_x.CopyFromHost(x.data(), x.size() * sizeof(float)));
    ASSERT_OK(d_w.CopyFromHost(w.data(), w.size() * sizeof(float)));
    ASSERT_OK(CudaRmsNorm(static_cast<float*>(d_out.data()), static_cast<const float*>(d_x.data()),
                          static_cast<const float*>(d_w.data()), s.rows, s.dim, 1e-5f));
    ASSERT_OK(d_out.CopyToHost(got.data(), got.size() * sizeof(float)));
    // f32 on both sides; only the summation order differs.
    ASSERT_TRUE(AllClose(got, expected, ::loraplex::testing::kF32KernelVsReference));
  }
}

TEST_F(CudaRmsNormTest, Bf16MatchesReference) {
  uint32_t seed = 100;
  for (const Size& s : kSizes) {
    SCOPED_TRACE(::testing::Message() << "rows=" << s.rows << " dim=" << s.dim);
    // The reference runs in f32 on the bf16-rounded inputs, so the only differences are the
    // output rounding to bf16 and summation order.
    std::vector<uint16_t> x16 = ToBf16(RandomVector(s.rows * s.dim, seed++, -3.0f, 3.0f));
    std::vector<uint16_t> w16 = ToBf16(RandomVector(s.dim, seed++, 0.5f, 1.5f));
    std::vector<float> x(x16.size()), w(w16.size()), expected(x16.size()), got(x16.size());
    for (size_t i = 0; i < x16.size(); ++i) x[i] = Bf16ToF32(x16[i]);
    for (size_t i = 0; i < w16.size(); ++i) w[i] = Bf16ToF32(w16[i]);
    ref::RmsNorm(expected.data(), x.data(), w.data(), s.rows, s.dim, 1e-5f);
    ASSERT_OK_AND_ASSIGN(CudaBuffer d_x, CudaBuffer::Allocate(x16.size() * 2));
    ASSERT_OK_AND_ASSIGN(CudaBuffer d_w, CudaBuffer::Allocate(w16.size() * 2));
    ASSERT_OK(d_x.CopyFromHost(x16.data(), x16.size() * 2));
    ASSERT_OK(d_w.CopyFromHost(w16.data(), w16.size() * 2));
    // In place: out aliases x.
    ASSERT_OK(CudaRmsNormBf16(static_cast<uint16_t*>(d_x.data()),
                              static_cast<const uint16_t*>(d_x.data()),
                              static_cast<const uint16_t*>(d_w.data()), s.rows, s.dim, 1e-5f));
    std::vector<uint16_t> got16(x16.size());
    ASSERT_OK(d_x.CopyToHost(got16.data(), got16.size() * 2));
    for (size_t i = 0; i < got16.size(); ++i) got[i] = Bf16ToF32(got16[i]);
    ASSERT_TRUE(AllClose(got, expected, ::loraplex::testing::kCudaBf16Op));
  }
}

TEST_F(CudaRmsNormTest, RejectsBadArguments) {
  EXPECT_THAT(CudaRmsNorm(nullptr, nullptr, nullptr, -1, 4, 1e-5f),
              StatusIs(absl::StatusCode::kInvalidArgument, "negative shape"));
  EXPECT_THAT(CudaRmsNorm(nullptr, nullptr, nullptr, 2, 4, 1e-5f),
              StatusIs(absl::StatusCode::kInvalidArgument, "null device pointer"));
  ASSERT_OK_AND_ASSIGN(CudaBuffer small, CudaBuffer::Allocate(16));
  std::vector<float> host(8);
  EXPECT_THAT(small.CopyFromHost(host.data(), 32), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Runs everywhere: the availability probe must answer without crashing and explain a "no".
TEST(CudaDeviceAvailableTest, ExplainsAbsence) {
  std::string why;
  if (!CudaDeviceAvailable(&why)) {
    EXPECT_FALSE(why.empty());
  }
}

}  // namespace
}  // namespace loraplex::kernels::cuda
