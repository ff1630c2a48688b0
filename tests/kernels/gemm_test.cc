// Fast Gemm vs ref::Gemm on odd sizes, f32 and bf16 weights, with and without accumulate, for
// every ISA table this CPU supports.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/quant_ops.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"
#include "tests/kernels/kernel_test_util.h"
#include "tests/testing/testing.h"

namespace loraplex::kernels {
namespace {

using ::loraplex::kernels::testing::AllIsas;
using ::loraplex::kernels::testing::IsaTest;
using ::loraplex::kernels::testing::RandomVector;
using ::loraplex::kernels::testing::ToBf16;
using ::loraplex::testing::AllClose;

struct GemmCase {
  int64_t m, n, k;
};

std::vector<GemmCase> GemmCases() {
  std::vector<GemmCase> cases;
  const int64_t sizes[] = {1, 7, 33, 577, 1537};
  for (int64_t m : {1, 3}) {
    for (int64_t n : sizes)
      for (int64_t k : sizes) cases.push_back({m, n, k});
  }
  // More tokens: keep the reference's m*n*k small enough for a fast test.
  for (int64_t m : {17, 129}) {
    for (int64_t n : {1, 7, 33, 577}) {
      for (int64_t k : {1, 7, 33, 577}) {
        if (m == 129 && n == 577 && k == 577) continue;
        cases.push_back({m, n, k});
      }
    }
  }
  cases.push_back({17, 1537, 577});
  cases.push_back({129, 577, 65});  // a full 128-token prefill tile grid with remainders
  cases.push_back({5, 1536, 576});  // SmolLM2 gate/up projection, a chunk of prefill
  cases.push_back({4, 0, 7});       // empty output
  cases.push_back({3, 5, 0});       // empty reduction: y = 0 (or unchanged with accumulate)
  return cases;
}

void CheckGemm(DType dtype, bool accumulate) {
  uint32_t seed = 1;
  for (const GemmCase& c : GemmCases()) {
    SCOPED_TRACE(::testing::Message() << "m=" << c.m << " n=" << c.n << " k=" << c.k << " bf16="
                                      << (dtype == DType::kBF16) << " accumulate=" << accumulate);
    std::vector<float> x = RandomVector(c.m * c.k, seed++);
    std::vector<float> w32 = RandomVector(c.n * c.k, seed++);
    std::vector<uint16_t> w16 = ToBf16(w32);
    WeightView w{dtype, dtype == DType::kF32 ? static_cast<const void*>(w32.data()) : w16.data(),
                 c.n, c.k};
    std::vector<float> y0 = RandomVector(c.m * c.n, seed++);  // the accumulate base
    std::vector<float> fast = y0;
    std::vector<float> expected = y0;
    Gemm(fast.data(), x.data(), c.m, w, accumulate);
    ref::Gemm(expected.data(), x.data(), c.m, w, accumulate);
    const auto tol = dtype == DType::kF32 ? ::loraplex::testing::kF32KernelVsReference
                                          : ::loraplex::testing::kBf16KernelVsReference;
    ASSERT_TRUE(AllClose(fast, expected, tol));
  }
}

class GemmTest : public IsaTest {};

TEST_P(GemmTest, F32MatchesReference) { CheckGemm(DType::kF32, false); }
TEST_P(GemmTest, F32AccumulateMatchesReference) { CheckGemm(DType::kF32, true); }
TEST_P(GemmTest, Bf16MatchesReference) { CheckGemm(DType::kBF16, false); }
TEST_P(GemmTest, Bf16AccumulateMatchesReference) { CheckGemm(DType::kBF16, true); }

// A reference that is not ref::Gemm: a tiny product worked out by hand.
// BatchInvariant(): every token's row of a call is bit for bit the row a call with that token
// alone gives, whatever the number of tokens (the dot-product tiles, the tokens-in-lanes prefill
// from 32 tokens) and the threads' split of the rows. `amx` runs as `avx512` here.
TEST_P(GemmTest, BatchInvariantRowsEqualOneTokenCalls) {
  ::loraplex::kernels::testing::BatchInvariantScope invariant;
  uint32_t seed = 500;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (const GemmCase& c : std::vector<GemmCase>{
             {2, 577, 577}, {9, 97, 1537}, {33, 1537, 65}, {70, 577, 576}, {129, 33, 577}}) {
      SCOPED_TRACE(::testing::Message()
                   << "m=" << c.m << " n=" << c.n << " k=" << c.k << " " << DTypeName(dtype));
      const std::vector<float> x = RandomVector(c.m * c.k, seed++);
      const std::vector<float> w32 = RandomVector(c.n * c.k, seed++);
      const std::vector<uint16_t> w16 = ToBf16(w32);
      const WeightView w{dtype,
                         dtype == DType::kF32 ? static_cast<const void*>(w32.data()) : w16.data(),
                         c.n, c.k};
      std::vector<float> all(c.m * c.n);
      Gemm(all.data(), x.data(), c.m, w);
      for (int64_t t = 0; t < c.m; ++t) {
        std::vector<float> one(c.n);
        Gemm(one.data(), x.data() + t * c.k, 1, w);
        ASSERT_EQ(std::memcmp(one.data(), all.data() + t * c.n, c.n * sizeof(float)), 0)
            << "token " << t;
      }
    }
  }
}

TEST_P(GemmTest, HandWorkedProduct) {
  const float x[2 * 3] = {1, 2, 3, -1, 0, 0.5f};
  const float w[2 * 3] = {1, 0, -1, 2, 2, 2};  // W[out=2, in=3]
  float y[2 * 2] = {100, 100, 100, 100};
  Gemm(y, x, 2, WeightView{DType::kF32, w, 2, 3});
  EXPECT_EQ(y[0], 1 - 3);       // x0 . w0
  EXPECT_EQ(y[1], 2 + 4 + 6);   // x0 . w1
  EXPECT_EQ(y[2], -1 - 0.5f);   // x1 . w0
  EXPECT_EQ(y[3], -2 + 0 + 1);  // x1 . w1
}

INSTANTIATE_TEST_SUITE_P(Isa, GemmTest, ::testing::ValuesIn(AllIsas()),
                         [](const auto& info) { return info.param; });

TEST(CpuKernelIsaTest, ReportsTheBestSupportedIsa) {
  // The automatic choice is the best table this CPU and build support (unless LP_CPU_ISA asks
  // for another).
  if (std::getenv("LP_CPU_ISA") != nullptr) GTEST_SKIP() << "LP_CPU_ISA is set";
  std::string expected = "scalar";
  if (cpu::Avx512Supported() && cpu::Avx512Ops() != nullptr && cpu::AmxSupported()) {
    expected = "amx";
  } else if (cpu::Avx512Supported() && cpu::Avx512Ops() != nullptr) {
    expected = "avx512";
  } else if (cpu::Avx2Supported() && cpu::Avx2Ops() != nullptr) {
    expected = "avx2";
  }
  EXPECT_EQ(CpuKernelIsa(), expected);
}

TEST(CpuKernelIsaTest, UnknownNameIsRefused) {
  const std::string before = CpuKernelIsa();
  EXPECT_FALSE(cpu::SetActiveCpuOpsForTesting("avx1024"));
  EXPECT_EQ(CpuKernelIsa(), before);
}

// Every table the CPU supports can be selected by name and then reports that name.
TEST(CpuKernelIsaTest, SelectsEachSupportedTableByName) {
  const std::string before = CpuKernelIsa();
  for (const std::string& isa : testing::AllChoices()) {
    if (!cpu::SetActiveCpuOpsForTesting(isa.c_str())) continue;
    EXPECT_EQ(CpuKernelIsa(), isa);
  }
  ASSERT_TRUE(cpu::SetActiveCpuOpsForTesting(before.c_str()));
}

}  // namespace
}  // namespace loraplex::kernels
