// CudaBlas::Gemm against ref::Gemm on odd sizes for every supported dtype combination, with and
// without accumulate. Skips without a device (see cuda_test_util.h).
#include "kernels/cuda/cuda_gemm.h"

#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/kernels.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/kernel_test_util.h"
#include "tests/testing/testing.h"

namespace loraplex::kernels::cuda {
namespace {

using ::loraplex::kernels::cuda::testing::CudaTest;
using ::loraplex::kernels::cuda::testing::Download;
using ::loraplex::kernels::cuda::testing::DTypeName;
using ::loraplex::kernels::cuda::testing::RoundTo;
using ::loraplex::kernels::cuda::testing::Upload;
using ::loraplex::kernels::testing::RandomVector;
using ::loraplex::testing::AllClose;
using ::loraplex::testing::StatusIs;

struct Shape {
  int64_t m, n, k;
};
// Decode (m = 1..3), prefill chunks, and sizes that are no multiple of any tile.
const Shape kShapes[] = {{1, 1, 1},      {1, 577, 577},   {3, 1537, 577}, {17, 577, 1537},
                         {129, 193, 64}, {301, 49, 1537}, {5, 0, 7},      {4, 9, 0}};

struct Combo {
  DType w, x, y;
};
const Combo kCombos[] = {{DType::kBF16, DType::kBF16, DType::kBF16},
                         {DType::kBF16, DType::kBF16, DType::kF32},
                         {DType::kBF16, DType::kF32, DType::kF32},
                         {DType::kBF16, DType::kF32, DType::kBF16},
                         {DType::kF32, DType::kF32, DType::kF32}};

class CudaGemmTest : public CudaTest {};

TEST_F(CudaGemmTest, MatchesReference) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CudaBlas> blas, CudaBlas::Create());
  uint32_t seed = 1;
  for (const Combo& c : kCombos) {
    for (const Shape& s : kShapes) {
      for (bool accumulate : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "W " << DTypeName(c.w) << " x " << DTypeName(c.x)
                                          << " y " << DTypeName(c.y) << " m=" << s.m << " n=" << s.n
                                          << " k=" << s.k << " accumulate=" << accumulate);
        std::vector<float> w = RoundTo(RandomVector(s.n * s.k, seed++), c.w);
        // With bf16 weights the activations are rounded to bf16 (cuda_gemm.h), so the reference
        // gets the rounded values and the comparison measures only summation order and output
        // rounding.
        std::vector<float> x = RoundTo(RandomVector(s.m * s.k, seed++), c.x);
        std::vector<float> x_eff = RoundTo(x, c.w);
        std::vector<float> y0 = RoundTo(RandomVector(s.m * s.n, seed++), c.y);
        std::vector<float> expected = y0;
        ref::Gemm(expected.data(), x_eff.data(), s.m, WeightView{DType::kF32, w.data(), s.n, s.k},
                  accumulate);
        ASSERT_OK_AND_ASSIGN(CudaBuffer d_w, Upload(w, c.w));
        ASSERT_OK_AND_ASSIGN(CudaBuffer d_x, Upload(x, c.x));
        ASSERT_OK_AND_ASSIGN(CudaBuffer d_y, Upload(y0, c.y));
        ASSERT_OK(blas->Gemm(d_y.data(), c.y, d_x.data(), c.x, s.m,
                             WeightView{c.w, d_w.data(), s.n, s.k}, accumulate));
        ASSERT_OK_AND_ASSIGN(std::vector<float> got, Download(d_y, c.y, y0.size()));
        EXPECT_TRUE(AllClose(got, RoundTo(expected, c.y),
                             c.y == DType::kF32 ? ::loraplex::testing::kCudaF32Op
                                                : ::loraplex::testing::kCudaBf16Op));
      }
    }
  }
}

TEST_F(CudaGemmTest, RejectsUnsupportedAndBadArguments) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<CudaBlas> blas, CudaBlas::Create());
  int dummy = 0;
  EXPECT_THAT(blas->Gemm(&dummy, DType::kF32, &dummy, DType::kBF16, 1,
                         WeightView{DType::kF32, &dummy, 1, 1}),
              StatusIs(absl::StatusCode::kUnimplemented, "W f32, x bf16"));
  EXPECT_THAT(blas->Gemm(nullptr, DType::kF32, nullptr, DType::kF32, -2,
                         WeightView{DType::kBF16, nullptr, 1, 1}),
              StatusIs(absl::StatusCode::kInvalidArgument, "m=-2"));
  EXPECT_THAT(blas->Gemm(nullptr, DType::kF32, nullptr, DType::kF32, 2,
                         WeightView{DType::kBF16, nullptr, 3, 3}),
              StatusIs(absl::StatusCode::kInvalidArgument, "d_y"));
}

}  // namespace
}  // namespace loraplex::kernels::cuda
