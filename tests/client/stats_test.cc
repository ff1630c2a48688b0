// Statistics of `loraplex bench` against values computed by hand (and checked with
// numpy.percentile, whose default "linear" method client/stats.h follows).
#include "client/stats.h"

#include <gtest/gtest.h>

#include <vector>

namespace loraplex::client {
namespace {

TEST(PercentileTest, InterpolatesBetweenClosestRanks) {
  // Sorted 15 20 35 40 50; q=40: h = 4*0.4 = 1.6 -> 20 + 0.6*(35-20) = 29.
  EXPECT_DOUBLE_EQ(Percentile({15, 20, 35, 40, 50}, 40), 29.0);
  // Order of the input does not matter.
  EXPECT_DOUBLE_EQ(Percentile({50, 40, 15, 35, 20}, 40), 29.0);
  std::vector<double> one_to_ten = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  EXPECT_DOUBLE_EQ(Percentile(one_to_ten, 0), 1.0);
  EXPECT_DOUBLE_EQ(Percentile(one_to_ten, 50), 5.5);     // h = 4.5
  EXPECT_NEAR(Percentile(one_to_ten, 90), 9.1, 1e-12);   // h = 8.1
  EXPECT_NEAR(Percentile(one_to_ten, 99), 9.91, 1e-12);  // h = 8.91
  EXPECT_DOUBLE_EQ(Percentile(one_to_ten, 100), 10.0);
}

TEST(PercentileTest, EdgeCases) {
  EXPECT_DOUBLE_EQ(Percentile({}, 50), 0.0);
  EXPECT_DOUBLE_EQ(Percentile({7}, 0), 7.0);
  EXPECT_DOUBLE_EQ(Percentile({7}, 99), 7.0);
  // q outside [0, 100] is clamped rather than reading out of bounds.
  EXPECT_DOUBLE_EQ(Percentile({1, 2}, 150), 2.0);
  EXPECT_DOUBLE_EQ(Percentile({1, 2}, -5), 1.0);
}

TEST(SummarizeTest, MeanPercentilesMinMax) {
  const Summary s = Summarize({4, 1, 3, 2});
  EXPECT_EQ(s.count, 4);
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_DOUBLE_EQ(s.p50, 2.5);     // h = 1.5
  EXPECT_NEAR(s.p90, 3.7, 1e-12);   // h = 2.7
  EXPECT_NEAR(s.p99, 3.97, 1e-12);  // h = 2.97
  EXPECT_DOUBLE_EQ(s.min, 1);
  EXPECT_DOUBLE_EQ(s.max, 4);
  const Summary empty = Summarize({});
  EXPECT_EQ(empty.count, 0);
  EXPECT_DOUBLE_EQ(empty.p99, 0);
}

RequestRecord Streamed(double start, std::vector<double> chunks, std::string adapter = "") {
  RequestRecord r;
  r.start_s = start;
  r.first_token_s = chunks.front();
  r.end_s = chunks.back();
  r.output_tokens = static_cast<int64_t>(chunks.size());
  r.chunk_times_s = chunks;
  r.chunk_tokens.assign(chunks.size(), 1);
  r.adapter = adapter;
  return r;
}

TEST(CollectLatenciesTest, TtftTpotItlE2e) {
  // Starts at 1.0 s, tokens at 1.1 .. 1.5 s: TTFT 100 ms, E2E 500 ms,
  // TPOT = (1.5 - 1.1) / (5 - 1) = 100 ms, four 100 ms inter-token gaps.
  std::vector<RequestRecord> records = {Streamed(1.0, {1.1, 1.2, 1.3, 1.4, 1.5})};
  // One token only: TTFT 50 ms, E2E 50 ms, no TPOT and no ITL.
  records.push_back(Streamed(2.0, {2.05}));
  // A failed request contributes nothing.
  RequestRecord failed = Streamed(3.0, {3.5, 3.9});
  failed.grpc_code = 5;
  records.push_back(failed);

  const LatencySamples s = CollectLatencies(records);
  ASSERT_EQ(s.ttft_ms.size(), 2u);
  EXPECT_NEAR(s.ttft_ms[0], 100, 1e-9);
  EXPECT_NEAR(s.ttft_ms[1], 50, 1e-9);
  ASSERT_EQ(s.e2e_ms.size(), 2u);
  EXPECT_NEAR(s.e2e_ms[0], 500, 1e-9);
  EXPECT_NEAR(s.e2e_ms[1], 50, 1e-9);
  ASSERT_EQ(s.tpot_ms.size(), 1u);
  EXPECT_NEAR(s.tpot_ms[0], 100, 1e-9);
  ASSERT_EQ(s.itl_ms.size(), 4u);
  for (double v : s.itl_ms) EXPECT_NEAR(v, 100, 1e-9);
}

TEST(CutWarmupTest, DropsRequestsStartedBeforeTheEndOfWarmup) {
  std::vector<RequestRecord> records = {Streamed(0.5, {2.0}), Streamed(1.0, {1.2}),
                                        Streamed(1.5, {1.7})};
  const std::vector<RequestRecord> kept = CutWarmup(records, 1.0);
  ASSERT_EQ(kept.size(), 2u);  // 0.5 is dropped though it finished last; 1.0 is kept (>=)
  EXPECT_DOUBLE_EQ(kept[0].start_s, 1.0);
  EXPECT_DOUBLE_EQ(kept[1].start_s, 1.5);
  EXPECT_EQ(CutWarmup(records, 0).size(), 3u);
  EXPECT_TRUE(CutWarmup(records, 10).empty());
}

TEST(RateTest, CountsOverSeconds) {
  EXPECT_DOUBLE_EQ(Rate(30, 10), 3.0);
  EXPECT_DOUBLE_EQ(Rate(5, 0), 0.0);
  EXPECT_DOUBLE_EQ(Rate(5, -1), 0.0);
}

TEST(TokensPerSecondSeriesTest, BucketsTokensByArrival) {
  RequestRecord a;
  a.output_tokens = 4;
  a.chunk_times_s = {0.1, 0.2, 0.7};
  a.chunk_tokens = {1, 2, 1};
  RequestRecord b;  // no chunk times: 4 tokens at its end, 1.2 s
  b.output_tokens = 4;
  b.end_s = 1.2;
  RequestRecord c;  // chunk times without token counts: 2 tokens spread over 2 messages
  c.output_tokens = 2;
  c.chunk_times_s = {0.3, 1.3};
  const std::vector<double> series = TokensPerSecondSeries({a, b, c}, 0.5);
  // [0,0.5): 1+2 (a) + 1 (c) = 4 -> 8/s; [0.5,1): 1 -> 2/s; [1,1.5): 4 (b) + 1 (c) = 5 -> 10/s.
  ASSERT_EQ(series.size(), 3u);
  EXPECT_DOUBLE_EQ(series[0], 8);
  EXPECT_DOUBLE_EQ(series[1], 2);
  EXPECT_DOUBLE_EQ(series[2], 10);
  EXPECT_TRUE(TokensPerSecondSeries({a}, 0).empty());
}

TEST(CdfPointsTest, StepsThroughSortedValues) {
  const auto pts = CdfPoints({3, 1, 2}, 10);
  ASSERT_EQ(pts.size(), 3u);
  EXPECT_DOUBLE_EQ(pts[0].first, 1);
  EXPECT_NEAR(pts[0].second, 1.0 / 3, 1e-12);
  EXPECT_DOUBLE_EQ(pts[2].first, 3);
  EXPECT_DOUBLE_EQ(pts[2].second, 1.0);
  // Thinned to at most ~max_points, still ending at (max, 1).
  std::vector<double> many;
  for (int i = 0; i < 1000; ++i) many.push_back(i);
  const auto thin = CdfPoints(many, 50);
  EXPECT_LE(thin.size(), 51u);
  EXPECT_DOUBLE_EQ(thin.back().first, 999);
  EXPECT_DOUBLE_EQ(thin.back().second, 1.0);
  EXPECT_TRUE(CdfPoints({}, 10).empty());
}

}  // namespace
}  // namespace loraplex::client
