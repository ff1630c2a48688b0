// Fast RmsNorm, Rope, SiluMul, Add, Embed vs their references on odd sizes, per ISA table.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/kernels.h"
#include "tests/kernels/kernel_test_util.h"
#include "tests/testing/testing.h"

namespace loraplex::kernels {
namespace {

using ::loraplex::kernels::testing::AllIsas;
using ::loraplex::kernels::testing::IsaTest;
using ::loraplex::kernels::testing::RandomVector;
using ::loraplex::kernels::testing::ToBf16;
using ::loraplex::testing::AllClose;
using ::loraplex::testing::kExact;
using ::loraplex::testing::kF32KernelVsReference;

class ElementwiseTest : public IsaTest {};

TEST_P(ElementwiseTest, RmsNormMatchesReference) {
  uint32_t seed = 10;
  for (int64_t rows : {1, 3, 17, 129}) {
    for (int64_t dim : {1, 7, 33, 576, 577}) {
      SCOPED_TRACE(::testing::Message() << "rows=" << rows << " dim=" << dim);
      std::vector<float> x = RandomVector(rows * dim, seed++, -3.0f, 3.0f);
      std::vector<float> weight = RandomVector(dim, seed++, 0.5f, 1.5f);
      std::vector<float> fast(x.size()), expected(x.size());
      RmsNorm(fast.data(), x.data(), weight.data(), rows, dim, 1e-5f);
      ref::RmsNorm(expected.data(), x.data(), weight.data(), rows, dim, 1e-5f);
      ASSERT_TRUE(AllClose(fast, expected, kF32KernelVsReference));
      // In place (out aliases x) gives the same answer.
      std::vector<float> inplace = x;
      RmsNorm(inplace.data(), inplace.data(), weight.data(), rows, dim, 1e-5f);
      ASSERT_TRUE(AllClose(inplace, expected, kF32KernelVsReference));
    }
  }
}

TEST_P(ElementwiseTest, RmsNormOfConstantRowIsWeight) {
  // mean(x^2) = c^2, so x / rms = sign(c) exactly up to eps: an answer not taken from ref::.
  const int64_t dim = 37;
  std::vector<float> x(dim, -2.5f);
  std::vector<float> weight = RandomVector(dim, 3);
  std::vector<float> out(dim);
  RmsNorm(out.data(), x.data(), weight.data(), 1, dim, 0.0f);
  std::vector<float> expected(dim);
  for (int64_t i = 0; i < dim; ++i) expected[i] = -weight[i];
  EXPECT_TRUE(AllClose(out, expected, kF32KernelVsReference));
}

TEST_P(ElementwiseTest, RopeMatchesReference) {
  uint32_t seed = 20;
  for (int64_t head_dim : {2, 8, 64}) {
    for (int64_t heads : {1, 3, 9}) {
      const int64_t tokens = 17;
      SCOPED_TRACE(::testing::Message() << "head_dim=" << head_dim << " heads=" << heads);
      std::vector<float> inv_freq(head_dim / 2);
      for (int64_t i = 0; i < head_dim / 2; ++i) {
        inv_freq[i] = std::pow(10000.0f, -2.0f * static_cast<float>(i) / head_dim);
      }
      std::vector<int32_t> positions(tokens);
      for (int64_t t = 0; t < tokens; ++t) positions[t] = static_cast<int32_t>((t * 131) % 2048);
      std::vector<float> fast = RandomVector(tokens * heads * head_dim, seed++);
      std::vector<float> expected = fast;
      Rope(fast.data(), positions.data(), tokens, heads, head_dim, inv_freq.data());
      ref::Rope(expected.data(), positions.data(), tokens, heads, head_dim, inv_freq.data());
      ASSERT_TRUE(AllClose(fast, expected, kF32KernelVsReference));
    }
  }
}

TEST_P(ElementwiseTest, RopeAtPositionZeroIsIdentity) {
  std::vector<float> inv_freq = {1.0f, 0.1f, 0.01f, 0.001f};
  std::vector<float> x = RandomVector(2 * 8, 5);
  std::vector<float> original = x;
  const int32_t positions[1] = {0};
  Rope(x.data(), positions, 1, 2, 8, inv_freq.data());
  EXPECT_TRUE(AllClose(x, original, kExact));
}

TEST_P(ElementwiseTest, SiluMulMatchesReference) {
  uint32_t seed = 30;
  for (int64_t n : {1, 7, 8, 9, 33, 1537, 40000}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    // Wide range: exercises the exp clamp (exp(-g) overflows f32 for g < -88.7).
    std::vector<float> gate = RandomVector(n, seed++, -100.0f, 100.0f);
    std::vector<float> up = RandomVector(n, seed++, -2.0f, 2.0f);
    std::vector<float> fast(n), expected(n);
    SiluMul(fast.data(), gate.data(), up.data(), n);
    ref::SiluMul(expected.data(), gate.data(), up.data(), n);
    ASSERT_TRUE(AllClose(fast, expected, kF32KernelVsReference));
    std::vector<float> small = RandomVector(n, seed++, -4.0f, 4.0f);  // the usual range
    std::vector<float> fast_inplace = small;
    SiluMul(fast_inplace.data(), fast_inplace.data(), up.data(), n);  // out aliases gate
    ref::SiluMul(expected.data(), small.data(), up.data(), n);
    ASSERT_TRUE(AllClose(fast_inplace, expected, kF32KernelVsReference));
  }
}

TEST_P(ElementwiseTest, AddMatchesReference) {
  for (int64_t n : {1, 7, 1537}) {
    std::vector<float> x = RandomVector(n, 40);
    std::vector<float> fast = RandomVector(n, 41);
    std::vector<float> expected = fast;
    Add(fast.data(), x.data(), n);
    ref::Add(expected.data(), x.data(), n);
    ASSERT_TRUE(AllClose(fast, expected, kExact));
  }
}

TEST_P(ElementwiseTest, EmbedCopiesRowsExactly) {
  const int64_t vocab = 33, dim = 577;
  std::vector<float> table32 = RandomVector(vocab * dim, 50);
  std::vector<uint16_t> table16 = ToBf16(table32);
  const std::vector<int32_t> ids = {0, 32, 5, 5, 17};
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    WeightView table{
        dtype, dtype == DType::kF32 ? static_cast<const void*>(table32.data()) : table16.data(),
        vocab, dim};
    std::vector<float> fast(ids.size() * dim), expected(ids.size() * dim);
    Embed(fast.data(), ids.data(), ids.size(), table);
    ref::Embed(expected.data(), ids.data(), ids.size(), table);
    ASSERT_TRUE(AllClose(fast, expected, kExact));
  }
}

TEST_P(ElementwiseTest, MaxMatchesReference) {
  uint32_t seed = 120;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t n : {0, 1, 7, 15, 16, 17, 33, 1023, 49152, 151936}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    std::vector<float> x = RandomVector(n, seed++, -30.0f, 30.0f);
    EXPECT_EQ(Max(x.data(), n), ref::Max(x.data(), n));
    if (n == 0) {
      EXPECT_EQ(Max(x.data(), n), -inf);
      continue;
    }
    if (n == 1) continue;
    // The maximum first, in the middle, in the last full block of 16 and in the tail, with a
    // NaN after it and one first.
    for (int64_t at : {int64_t{0}, n / 2, std::max<int64_t>(0, n - 17), n - 1}) {
      std::vector<float> y = x;
      y[at] = 31.0f;
      y[(at + 1) % n] = std::nanf("");
      if (at != 0) y[0] = std::nanf("");
      EXPECT_EQ(Max(y.data(), n), 31.0f) << "at " << at;
      EXPECT_EQ(ref::Max(y.data(), n), 31.0f) << "at " << at;
    }
  }
  std::vector<float> nans(20, std::nanf(""));
  EXPECT_EQ(Max(nans.data(), nans.size()), -inf);
  std::vector<float> with_inf = {1.0f, inf, std::nanf(""), -inf};
  EXPECT_EQ(Max(with_inf.data(), with_inf.size()), inf);
}

TEST_P(ElementwiseTest, LogSumExpMatchesReference) {
  uint32_t seed = 60;
  for (int64_t n : {1, 7, 16, 17, 1023, 1024, 1025, 49152, 151936}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    for (float spread : {1.0f, 10.0f, 60.0f}) {
      std::vector<float> x = RandomVector(n, seed++, -spread, spread);
      const double got = LogSumExp(x.data(), n);
      const double want = ref::LogSumExp(x.data(), n);
      // What a log-prob inherits: the f32 exp's relative error, in absolute terms here.
      EXPECT_NEAR(got, want, 2e-6 * std::max(1.0, std::abs(want))) << "spread " << spread;
    }
  }
  // -inf entries count as 0, NaN entries are skipped, a row of one value v gives v + log(n).
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {1.0f, -inf, 2.0f, std::nanf(""), -inf, 0.5f};
  EXPECT_NEAR(LogSumExp(x.data(), x.size()), ref::LogSumExp(x.data(), x.size()), 1e-6);
  EXPECT_NEAR(LogSumExp(x.data(), x.size()),
              std::log(std::exp(1.0) + std::exp(2.0) + std::exp(0.5)), 1e-6);
  std::vector<float> same(3000, -7.25f);
  EXPECT_NEAR(LogSumExp(same.data(), same.size()), -7.25 + std::log(3000.0), 1e-6);
  std::vector<float> all_inf(5, -inf);
  EXPECT_EQ(LogSumExp(all_inf.data(), all_inf.size()), -inf);
}

TEST_P(ElementwiseTest, ExpMassMatchesReference) {
  uint32_t seed = 90;
  for (int64_t n : {1, 7, 16, 17, 1023, 1024, 1025, 49152, 151936}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    for (float spread : {1.0f, 10.0f, 60.0f}) {
      std::vector<float> x = RandomVector(n, seed++, -spread, spread);
      const float max = *std::max_element(x.begin(), x.end());
      for (double inv_t : {1.0 / 0.05, 1.0 / 0.7, 1.0, 1.0 / 3.0}) {
        const double got = ExpMass(x.data(), n, max, inv_t);
        const double want = ref::ExpMass(x.data(), n, max, inv_t);
        // The f32 exp's relative error (and the f32 scaled distance's, at a large 1 / T).
        EXPECT_NEAR(got, want, 2e-6 * want) << "spread " << spread << " inv_t " << inv_t;
      }
    }
  }
  // The maximum counts 1 (+inf too), NaN and -inf count 0.
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {1.0f, -inf, 2.0f, std::nanf(""), 0.5f};
  for (double inv_t : {1.0, 2.0}) {
    const double want = 1.0 + std::exp(-1.0 * inv_t) + std::exp(-1.5 * inv_t);
    EXPECT_NEAR(ExpMass(x.data(), x.size(), 2.0f, inv_t), want, 1e-6);
    EXPECT_NEAR(ref::ExpMass(x.data(), x.size(), 2.0f, inv_t), want, 1e-12);
  }
  std::vector<float> with_inf = {3.0f, inf, std::nanf(""), inf, -inf};
  EXPECT_EQ(ExpMass(with_inf.data(), with_inf.size(), inf, 1.0), 2.0);
  EXPECT_EQ(ref::ExpMass(with_inf.data(), with_inf.size(), inf, 1.0), 2.0);
}

INSTANTIATE_TEST_SUITE_P(Isa, ElementwiseTest, ::testing::ValuesIn(AllIsas()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace loraplex::kernels
