// The element-wise CUDA ops and device top-k against the CPU reference (kernels::ref::) on random
// inputs of odd sizes, in f32 and bf16. Skips without a device (see cuda_test_util.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
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

using ::loraplex::kernels::cuda::testing::CudaTest;
using ::loraplex::kernels::cuda::testing::Download;
using ::loraplex::kernels::cuda::testing::DownloadRaw;
using ::loraplex::kernels::cuda::testing::DTypeName;
using ::loraplex::kernels::cuda::testing::RoundTo;
using ::loraplex::kernels::cuda::testing::Upload;
using ::loraplex::kernels::cuda::testing::UploadRaw;
using ::loraplex::kernels::testing::RandomVector;
using ::loraplex::testing::AllClose;
using ::loraplex::testing::StatusIs;
using ::loraplex::testing::Tolerance;

constexpr DType kDTypes[] = {DType::kF32, DType::kBF16};
constexpr int64_t kSizes[] = {1, 7, 577, 1537, 100003};

Tolerance TolFor(DType d) {
  return d == DType::kF32 ? ::loraplex::testing::kCudaF32Op : ::loraplex::testing::kCudaBf16Op;
}

class CudaOpsTest : public CudaTest {};

TEST_F(CudaOpsTest, ConvertRoundsLikeTheHost) {
  // bf16 rounding must be bit-identical to common/half.h (round to nearest even), including ties.
  std::vector<float> x = RandomVector(1537, 1, -100.0f, 100.0f);
  x.push_back(Bf16ToF32(0x3f80) + std::ldexp(1.0f, -8));  // 1 + half an ulp: a tie, rounds to even
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_x, Upload(x, DType::kF32));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_y, CudaBuffer::Allocate(x.size() * 2));
  ASSERT_OK(CudaConvert(d_y.data(), DType::kBF16, d_x.data(), DType::kF32,
                        static_cast<int64_t>(x.size())));
  ASSERT_OK_AND_ASSIGN(std::vector<uint16_t> got, DownloadRaw<uint16_t>(d_y, x.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(got[i], F32ToBf16(x[i])) << "i=" << i << " x=" << x[i];
  }
  // And back: widening is exact.
  ASSERT_OK(CudaConvert(d_x.data(), DType::kF32, d_y.data(), DType::kBF16,
                        static_cast<int64_t>(x.size())));
  ASSERT_OK_AND_ASSIGN(std::vector<float> back, Download(d_x, DType::kF32, x.size()));
  ASSERT_TRUE(AllClose(back, RoundTo(x, DType::kBF16), ::loraplex::testing::kExact));
}

TEST_F(CudaOpsTest, AddAndSiluMulMatchReference) {
  uint32_t seed = 10;
  for (DType dt : kDTypes) {
    for (int64_t n : kSizes) {
      SCOPED_TRACE(::testing::Message() << DTypeName(dt) << " n=" << n);
      std::vector<float> a = RoundTo(RandomVector(n, seed++, -6.0f, 6.0f), dt);
      std::vector<float> b = RoundTo(RandomVector(n, seed++, -3.0f, 3.0f), dt);
      std::vector<float> sum = a, act(n);
      ref::Add(sum.data(), b.data(), n);
      ref::SiluMul(act.data(), a.data(), b.data(), n);
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_a, Upload(a, dt));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_b, Upload(b, dt));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_out, Upload(std::vector<float>(n), dt));
      ASSERT_OK(CudaSiluMul(d_out.data(), d_a.data(), d_b.data(), dt, n));
      ASSERT_OK(CudaAdd(d_a.data(), d_b.data(), dt, n));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got_sum, Download(d_a, dt, n));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got_act, Download(d_out, dt, n));
      EXPECT_TRUE(AllClose(got_sum, sum, TolFor(dt)));
      EXPECT_TRUE(AllClose(got_act, act, TolFor(dt)));
    }
  }
}

TEST_F(CudaOpsTest, AddRmsNormMatchesAddThenRmsNorm) {
  struct Size {
    int64_t rows, dim;
  };
  const Size kNormSizes[] = {{1, 1}, {3, 577}, {17, 1537}, {2, 8191}};
  uint32_t seed = 20;
  for (DType dt : kDTypes) {
    for (const Size& s : kNormSizes) {
      SCOPED_TRACE(::testing::Message() << DTypeName(dt) << " rows=" << s.rows << " dim=" << s.dim);
      std::vector<float> x = RoundTo(RandomVector(s.rows * s.dim, seed++, -3.0f, 3.0f), dt);
      std::vector<float> res = RoundTo(RandomVector(s.rows * s.dim, seed++, -3.0f, 3.0f), dt);
      std::vector<float> w = RoundTo(RandomVector(s.dim, seed++, 0.5f, 1.5f), dt);
      // The reference: Add, the rounding to dtype a stored residual stream gets, then RmsNorm.
      std::vector<float> sum = x;
      ref::Add(sum.data(), res.data(), s.rows * s.dim);
      sum = RoundTo(sum, dt);
      std::vector<float> expected(sum.size());
      ref::RmsNorm(expected.data(), sum.data(), w.data(), s.rows, s.dim, 1e-5f);
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_x, Upload(x, dt));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_res, Upload(res, dt));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_w, Upload(w, dt));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_out, Upload(std::vector<float>(x.size()), dt));
      ASSERT_OK(CudaAddRmsNorm(d_out.data(), d_x.data(), d_res.data(), d_w.data(), dt, s.rows,
                               s.dim, 1e-5f));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got_sum, Download(d_x, dt, x.size()));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, Download(d_out, dt, x.size()));
      // The residual stream is one f32 add and one rounding on both sides: exact.
      EXPECT_TRUE(AllClose(got_sum, sum, ::loraplex::testing::kExact));
      EXPECT_TRUE(AllClose(got, expected, TolFor(dt)));
    }
  }
}

TEST_F(CudaOpsTest, RopeMatchesReference) {
  struct Case {
    int64_t tokens, heads, head_dim;
  };
  const Case kCases[] = {{1, 1, 2}, {3, 9, 64}, {17, 3, 8}, {5, 7, 128}, {2, 2, 258}};
  uint32_t seed = 30;
  for (DType dt : kDTypes) {
    for (const Case& c : kCases) {
      SCOPED_TRACE(::testing::Message() << DTypeName(dt) << " tokens=" << c.tokens
                                        << " heads=" << c.heads << " head_dim=" << c.head_dim);
      std::vector<float> x = RoundTo(RandomVector(c.tokens * c.heads * c.head_dim, seed++), dt);
      std::vector<int32_t> pos(c.tokens);
      // Positions up to a few thousand: the angles need full range reduction.
      for (int64_t t = 0; t < c.tokens; ++t) pos[t] = static_cast<int32_t>((t * 997 + 3) % 4099);
      std::vector<float> inv_freq(c.head_dim / 2);
      for (int64_t i = 0; i < c.head_dim / 2; ++i) {
        inv_freq[i] = std::pow(10000.0f, -2.0f * i / c.head_dim);
      }
      std::vector<float> expected = x;
      ref::Rope(expected.data(), pos.data(), c.tokens, c.heads, c.head_dim, inv_freq.data());
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_x, Upload(x, dt));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_pos, UploadRaw(pos));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_freq, UploadRaw(inv_freq));
      ASSERT_OK(CudaRope(d_x.data(), dt, d_pos.as<int32_t>(), c.tokens, c.heads, c.head_dim,
                         d_freq.as<float>()));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, Download(d_x, dt, x.size()));
      EXPECT_TRUE(AllClose(got, expected, TolFor(dt)));
    }
  }
}

TEST_F(CudaOpsTest, EmbedMatchesReference) {
  const int64_t rows = 1001, cols = 577, n = 37;
  uint32_t seed = 50;
  for (DType table_dt : kDTypes) {
    for (DType out_dt : kDTypes) {
      SCOPED_TRACE(::testing::Message()
                   << "table " << DTypeName(table_dt) << " out " << DTypeName(out_dt));
      std::vector<float> table = RoundTo(RandomVector(rows * cols, seed++), table_dt);
      std::vector<int32_t> ids(n);
      for (int64_t t = 0; t < n; ++t) ids[t] = static_cast<int32_t>((t * 7919) % rows);
      ids[n - 1] = static_cast<int32_t>(rows - 1);
      std::vector<float> expected(n * cols);
      ref::Embed(expected.data(), ids.data(), n, WeightView{DType::kF32, table.data(), rows, cols});
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_table, Upload(table, table_dt));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_ids, UploadRaw(ids));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_out, Upload(std::vector<float>(n * cols), out_dt));
      ASSERT_OK(CudaEmbed(d_out.data(), out_dt, d_ids.as<int32_t>(), n,
                          WeightView{table_dt, d_table.data(), rows, cols}));
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, Download(d_out, out_dt, n * cols));
      // A gather is a copy; only the output rounding to bf16 can differ.
      EXPECT_TRUE(AllClose(got, RoundTo(expected, out_dt), ::loraplex::testing::kExact));
    }
  }
}

TEST_F(CudaOpsTest, EmbedOutOfRangeIdGivesZerosNotGarbage) {
  std::vector<float> table = RandomVector(4 * 3, 60);
  std::vector<int32_t> ids = {1, 4, -1, 3};
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_table, Upload(table, DType::kF32));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_ids, UploadRaw(ids));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_out, Upload(std::vector<float>(12, 7.0f), DType::kF32));
  ASSERT_OK(CudaEmbed(d_out.data(), DType::kF32, d_ids.as<int32_t>(), 4,
                      WeightView{DType::kF32, d_table.data(), 4, 3}));
  ASSERT_OK_AND_ASSIGN(std::vector<float> got, Download(d_out, DType::kF32, 12));
  for (int c = 0; c < 3; ++c) {
    EXPECT_EQ(got[0 * 3 + c], table[1 * 3 + c]);
    EXPECT_EQ(got[1 * 3 + c], 0.0f);
    EXPECT_EQ(got[2 * 3 + c], 0.0f);
    EXPECT_EQ(got[3 * 3 + c], table[3 * 3 + c]);
  }
}

// The reference top-k: sort (logit desc, id asc), the order CudaTopK documents.
std::vector<int32_t> RefTopK(const float* row, int64_t vocab, int64_t k) {
  std::vector<int32_t> ids(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
  ids.resize(k);
  return ids;
}

TEST_F(CudaOpsTest, TopKMatchesSortAndLogSoftmax) {
  struct Case {
    int64_t rows, vocab, k;
  };
  const Case kCases[] = {{1, 1, 1}, {3, 577, 1}, {5, 49152, 1}, {2, 49152, 40}, {4, 1537, 256}};
  uint32_t seed = 70;
  for (DType dt : kDTypes) {
    for (const Case& c : kCases) {
      SCOPED_TRACE(::testing::Message()
                   << DTypeName(dt) << " rows=" << c.rows << " vocab=" << c.vocab << " k=" << c.k);
      // bf16 logits of a 49152 vocabulary have many exact ties: the id tie-break is exercised.
      std::vector<float> logits =
          RoundTo(RandomVector(c.rows * c.vocab, seed++, -20.0f, 20.0f), dt);
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_logits, Upload(logits, dt));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_ids, CudaBuffer::Allocate(c.rows * c.k * 4));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_values, CudaBuffer::Allocate(c.rows * c.k * 4));
      ASSERT_OK_AND_ASSIGN(CudaBuffer d_logprobs, CudaBuffer::Allocate(c.rows * c.k * 4));
      ASSERT_OK(CudaTopK(d_ids.as<int32_t>(), d_values.as<float>(), d_logprobs.as<float>(),
                         d_logits.data(), dt, c.rows, c.vocab, c.k));
      ASSERT_OK_AND_ASSIGN(std::vector<int32_t> ids, DownloadRaw<int32_t>(d_ids, c.rows * c.k));
      ASSERT_OK_AND_ASSIGN(std::vector<float> values,
                           Download(d_values, DType::kF32, c.rows * c.k));
      ASSERT_OK_AND_ASSIGN(std::vector<float> logprobs,
                           Download(d_logprobs, DType::kF32, c.rows * c.k));
      for (int64_t r = 0; r < c.rows; ++r) {
        const float* row = logits.data() + r * c.vocab;
        std::vector<int32_t> expected = RefTopK(row, c.vocab, c.k);
        double m = *std::max_element(row, row + c.vocab);
        double sum = 0.0;
        for (int64_t i = 0; i < c.vocab; ++i) sum += std::exp(row[i] - m);
        const double log_denom = m + std::log(sum);
        std::vector<float> expected_values(c.k), expected_logprobs(c.k);
        for (int64_t i = 0; i < c.k; ++i) {
          ASSERT_EQ(ids[r * c.k + i], expected[i]) << "row " << r << " rank " << i;
          expected_values[i] = row[expected[i]];
          expected_logprobs[i] = static_cast<float>(row[expected[i]] - log_denom);
        }
        EXPECT_TRUE(AllClose(values.data() + r * c.k, expected_values.data(), c.k,
                             ::loraplex::testing::kExact));
        EXPECT_TRUE(AllClose(logprobs.data() + r * c.k, expected_logprobs.data(), c.k,
                             ::loraplex::testing::kCudaF32Op));
      }
    }
  }
}

// Host-side checks only (nothing is launched), so this runs without a device too.
TEST(CudaOpsTestArgs, RejectsBadArguments) {
  EXPECT_THAT(CudaAdd(nullptr, nullptr, DType::kF32, -1),
              StatusIs(absl::StatusCode::kInvalidArgument, "n=-1"));
  EXPECT_THAT(CudaAddRmsNorm(nullptr, nullptr, nullptr, nullptr, DType::kF32, 2, 3, 1e-5f),
              StatusIs(absl::StatusCode::kInvalidArgument, "d_out"));
  EXPECT_THAT(CudaSiluMul(nullptr, nullptr, nullptr, DType::kF32, 3),
              StatusIs(absl::StatusCode::kInvalidArgument, "d_out"));
  EXPECT_THAT(CudaRope(nullptr, DType::kF32, nullptr, 1, 1, 7, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, "head_dim=7"));
  EXPECT_THAT(CudaTopK(nullptr, nullptr, nullptr, nullptr, DType::kF32, 1, 10, 11),
              StatusIs(absl::StatusCode::kInvalidArgument, "k=11"));
  EXPECT_THAT(CudaTopK(nullptr, nullptr, nullptr, nullptr, DType::kF32, 1, 1000, 300),
              StatusIs(absl::StatusCode::kInvalidArgument, "k=300"));
  EXPECT_THAT(CudaEmbed(nullptr, DType::kF32, nullptr, 2, WeightView{DType::kF32, nullptr, 4, 4}),
              StatusIs(absl::StatusCode::kInvalidArgument, "null device pointer"));
  // Empty shapes are no-ops, even with null pointers.
  EXPECT_OK(CudaAdd(nullptr, nullptr, DType::kBF16, 0));
}

TEST_F(CudaOpsTest, StreamsAndAsyncCopiesRoundTrip) {
  ASSERT_OK_AND_ASSIGN(CudaStream stream, CudaStream::Create());
  std::vector<float> x = RandomVector(1537, 80);
  std::vector<float> y = RandomVector(1537, 81);
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_x, CudaBuffer::Allocate(x.size() * 4));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_y, CudaBuffer::Allocate(y.size() * 4));
  ASSERT_OK(d_x.CopyFromHostAsync(x.data(), x.size() * 4, stream.get()));
  ASSERT_OK(d_y.CopyFromHostAsync(y.data(), y.size() * 4, stream.get()));
  ASSERT_OK(CudaAdd(d_y.data(), d_x.data(), DType::kF32, 1537, stream.get()));
  std::vector<float> got(1537);
  ASSERT_OK(d_y.CopyToHostAsync(got.data(), got.size() * 4, stream.get()));
  ASSERT_OK(stream.Synchronize());
  std::vector<float> expected = y;
  ref::Add(expected.data(), x.data(), 1537);
  EXPECT_TRUE(AllClose(got, expected, ::loraplex::testing::kExact));
  ASSERT_OK_AND_ASSIGN(CudaMemoryInfo mem, GetCudaMemoryInfo());
  EXPECT_GT(mem.total_bytes, 0u);
  EXPECT_LE(mem.free_bytes, mem.total_bytes);
  ASSERT_OK_AND_ASSIGN(std::string name, CudaDeviceName());
  EXPECT_NE(name.find("sm_"), std::string::npos) << name;
}

}  // namespace
}  // namespace loraplex::kernels::cuda
