// Every entry of each CPU loop table (kernels/cpu/cpu_ops.h) called directly against plain loops,
// on odd lengths around the vector widths (8 for AVX2, 16 for AVX-512) so that every masked or
// scalar tail runs. The public ops are tested in gemm_test.cc, elementwise_test.cc and
// attention_test.cc; this covers the table entries none of them reaches on its own (axpy) and the
// j_begin/j_end sub-ranges the thread split hands to gemm_*.
#include "kernels/cpu/cpu_ops.h"

#include <gtest/gtest.h>

#include <cmath>
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
using ::loraplex::testing::kF32KernelVsReference;

const int64_t kLengths[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 577};

class CpuOpsTest : public IsaTest {
 protected:
  const cpu::CpuOps& ops() const { return cpu::ActiveCpuOps(); }
};

TEST_P(CpuOpsTest, ReportsItsName) { EXPECT_EQ(GetParam(), ops().name); }

TEST_P(CpuOpsTest, DotAxpyScale) {
  uint32_t seed = 100;
  for (int64_t n : kLengths) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const std::vector<float> a = RandomVector(n, seed++), b = RandomVector(n, seed++);
    float dot = 0.0f;
    for (int64_t i = 0; i < n; ++i) dot += a[i] * b[i];
    EXPECT_TRUE(AllClose(std::vector<float>{ops().dot(a.data(), b.data(), n)},
                         std::vector<float>{dot}, kF32KernelVsReference));

    // One element past the end must not be touched.
    std::vector<float> y = RandomVector(n + 1, seed++), expected = y;
    ops().axpy(y.data(), -0.75f, a.data(), n);
    for (int64_t i = 0; i < n; ++i) expected[i] += -0.75f * a[i];
    EXPECT_TRUE(AllClose(y, expected, kF32KernelVsReference));

    ops().scale(y.data(), 3.5f, n);
    for (int64_t i = 0; i < n; ++i) expected[i] *= 3.5f;
    EXPECT_TRUE(AllClose(y, expected, kF32KernelVsReference));
  }
}

TEST_P(CpuOpsTest, ExpShiftSumAndSiluMul) {
  uint32_t seed = 200;
  for (int64_t n : kLengths) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    std::vector<float> s = RandomVector(n + 1, seed++, -20.0f, 5.0f), expected = s;
    const float sum = ops().exp_shift_sum(s.data(), 2.0f, n);
    float expected_sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      expected[i] = std::exp(expected[i] - 2.0f);
      expected_sum += expected[i];
    }
    EXPECT_TRUE(AllClose(s, expected, kF32KernelVsReference));
    EXPECT_TRUE(
        AllClose(std::vector<float>{sum}, std::vector<float>{expected_sum}, kF32KernelVsReference));

    const std::vector<float> gate = RandomVector(n, seed++, -6.0f, 6.0f);
    const std::vector<float> up = RandomVector(n, seed++);
    std::vector<float> out(n + 1, 42.0f), want(n + 1, 42.0f);
    ops().silu_mul(out.data(), gate.data(), up.data(), n);
    for (int64_t i = 0; i < n; ++i) want[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    EXPECT_TRUE(AllClose(out, want, kF32KernelVsReference));
  }
}

TEST_P(CpuOpsTest, AttentionScoresAndAccumulate) {
  uint32_t seed = 300;
  for (int64_t dim : {1, 8, 15, 16, 17, 33, 64}) {
    for (int64_t count : {0, 1, 3, 4, 7, 8, 9, 17}) {
      SCOPED_TRACE(::testing::Message() << "dim=" << dim << " count=" << count);
      const int64_t stride = dim + 5;  // rows of one KV block are further apart than dim
      const std::vector<float> q = RandomVector(dim, seed++);
      const std::vector<float> kv = RandomVector(count * stride, seed++);
      std::vector<float> scores(count + 1, 7.0f), want(count + 1, 7.0f);
      ops().attn_scores(scores.data(), q.data(), kv.data(), stride, count, dim, 0.125f);
      for (int64_t c = 0; c < count; ++c) {
        float dot = 0.0f;
        for (int64_t i = 0; i < dim; ++i) dot += q[i] * kv[c * stride + i];
        want[c] = dot * 0.125f;
      }
      EXPECT_TRUE(AllClose(scores, want, kF32KernelVsReference));

      const std::vector<float> p = RandomVector(count, seed++, 0.0f, 1.0f);
      std::vector<float> out = RandomVector(dim + 1, seed++), expected = out;
      ops().attn_accumulate(out.data(), p.data(), kv.data(), stride, count, dim);
      for (int64_t i = 0; i < dim; ++i) {
        for (int64_t c = 0; c < count; ++c) expected[i] += p[c] * kv[c * stride + i];
      }
      EXPECT_TRUE(AllClose(out, expected, kF32KernelVsReference));
    }
  }
}

// gemm_* on a sub-range of output features writes exactly those columns of every token row.
TEST_P(CpuOpsTest, GemmWritesOnlyItsRange) {
  uint32_t seed = 400;
  for (int64_t m : {1, 2, 5, 9, 33}) {
    for (int64_t k : {1, 15, 17, 64, 577}) {
      const int64_t n = 29;
      for (const auto& [j0, j1] : {std::pair<int64_t, int64_t>{0, 29}, {3, 20}, {11, 12}}) {
        for (bool accumulate : {false, true}) {
          SCOPED_TRACE(::testing::Message() << "m=" << m << " k=" << k << " range=[" << j0 << ","
                                            << j1 << ") accumulate=" << accumulate);
          const std::vector<float> x = RandomVector(m * k, seed++);
          const std::vector<float> w32 = RandomVector(n * k, seed++);
          const std::vector<uint16_t> w16 = ToBf16(w32);
          const std::vector<float> y0 = RandomVector(m * n, seed++);
          for (DType dtype : {DType::kF32, DType::kBF16}) {
            std::vector<float> y = y0, want = y0;
            if (dtype == DType::kF32) {
              ops().gemm_f32(y.data(), x.data(), m, w32.data(), n, k, j0, j1, accumulate);
            } else {
              ops().gemm_bf16(y.data(), x.data(), m, w16.data(), n, k, j0, j1, accumulate);
            }
            const WeightView w{dtype,
                               dtype == DType::kF32 ? static_cast<const void*>(w32.data())
                                                    : static_cast<const void*>(w16.data()),
                               n, k};
            std::vector<float> full(m * n);
            ref::Gemm(full.data(), x.data(), m, w);
            for (int64_t i = 0; i < m; ++i) {
              for (int64_t j = j0; j < j1; ++j) {
                want[i * n + j] = accumulate ? want[i * n + j] + full[i * n + j] : full[i * n + j];
              }
            }
            EXPECT_TRUE(AllClose(y, want, kF32KernelVsReference))
                << "bf16=" << (dtype != DType::kF32);
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, CpuOpsTest, ::testing::ValuesIn(AllIsas()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace loraplex::kernels
