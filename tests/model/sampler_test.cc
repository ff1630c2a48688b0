// The sampler on whole logit rows and on each row's best k entries (what a CUDA model copies back
// instead of the whole vocabulary): for every kind of params, k = Sampler::TopLogitsNeeded must
// give the same tokens, from the same seeded draws, as the whole row, with the same log-probs.
#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "tests/testing/testing.h"
#include "tests/testing/top_logits.h"

namespace loraplex::model {
namespace {

// `rows` rows of random logits over `vocab`, with runs of exact ties among the best entries.
std::vector<float> RandomLogits(int64_t rows, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> l(rows * vocab);
  for (float& x : l) x = normal(rng);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = l.data() + r * vocab;
    const float best = *std::max_element(row, row + vocab);
    for (int64_t i = 7; i < vocab; i += vocab / 5) row[i] = best;  // ties at the top
    row[3] = row[vocab - 2];                                       // a tie further down
  }
  return l;
}

// The best k entries of each row, as the device selection returns them.
StepLogits Top(const std::vector<float>& logits, int64_t rows, int64_t vocab, int64_t k) {
  StepLogits t;
  t.vocab = vocab;
  t.k = k;
  for (int64_t r = 0; r < rows; ++r) {
    const ::loraplex::testing::HostTopLogits top =
        ::loraplex::testing::SelectTopLogits(logits.data() + r * vocab, vocab, k);
    t.ids.insert(t.ids.end(), top.ids.begin(), top.ids.end());
    t.logits.insert(t.logits.end(), top.logits.begin(), top.logits.end());
    t.logprobs.insert(t.logprobs.end(), top.logprobs.begin(), top.logprobs.end());
  }
  return t;
}

TEST(SamplerTest, TopLogitsNeeded) {
  EXPECT_EQ(Sampler::TopLogitsNeeded({}), 1);  // greedy
  EXPECT_EQ(Sampler::TopLogitsNeeded({.temperature = 0.0f, .logprobs = 5}), 5);
  EXPECT_EQ(Sampler::TopLogitsNeeded({.temperature = 0.8f, .top_k = 40}), 40);
  EXPECT_EQ(Sampler::TopLogitsNeeded({.temperature = 0.8f, .top_k = 3, .logprobs = 9}), 9);
  EXPECT_EQ(Sampler::TopLogitsNeeded({.temperature = 0.8f}), 0);
  EXPECT_EQ(Sampler::TopLogitsNeeded({.temperature = 0.8f, .top_p = 0.9f}), 0);
}

TEST(SamplerTest, BestEntriesGiveTheSameTokensAsWholeRows) {
  constexpr int64_t kVocab = 1000, kRows = 24;
  std::vector<SamplingParams> grid;
  for (int32_t logprobs : {0, 4}) {
    grid.push_back({.temperature = 0.0f, .logprobs = logprobs});
    for (float t : {0.6f, 1.0f, 1.7f}) {
      for (int32_t k : {1, 2, 9, 64}) {
        for (float p : {1.0f, 0.9f, 0.3f}) {
          grid.push_back(
              {.temperature = t, .top_k = k, .top_p = p, .seed = 11, .logprobs = logprobs});
        }
      }
    }
  }
  const std::vector<float> logits = RandomLogits(kRows, kVocab, 5);
  StepLogits whole;
  whole.vocab = kVocab;
  whole.logits = logits;
  int draws_differing_from_greedy = 0;
  for (const SamplingParams& params : grid) {
    ASSERT_OK(params.Validate());
    const int64_t k = Sampler::TopLogitsNeeded(params);
    ASSERT_GT(k, 0);
    const StepLogits top = Top(logits, kRows, kVocab, k);
    Sampler a(params), b(params);
    for (int64_t r = 0; r < kRows; ++r) {
      const SampleResult x = a.Sample(whole, r);
      const SampleResult y = b.Sample(top, r);
      ASSERT_EQ(x.token_id, y.token_id) << "row " << r << " T " << params.temperature << " top_k "
                                        << params.top_k << " top_p " << params.top_p;
      EXPECT_NEAR(x.logprob, y.logprob, 1e-5);
      ASSERT_EQ(x.top.size(), y.top.size());
      for (size_t i = 0; i < x.top.size(); ++i) {
        EXPECT_EQ(x.top[i].token_id, y.top[i].token_id);
        EXPECT_NEAR(x.top[i].logprob, y.top[i].logprob, 1e-5);
      }
      if (x.token_id != Top(logits, kRows, kVocab, 1).ids[r]) ++draws_differing_from_greedy;
    }
  }
  // The grid really samples (else equal tokens would prove little).
  EXPECT_GT(draws_differing_from_greedy, 100);
}

TEST(SamplerTest, WholeRowsThroughStepLogitsMatchThePointerOverload) {
  constexpr int64_t kVocab = 300, kRows = 3;
  StepLogits whole;
  whole.vocab = kVocab;
  whole.logits = RandomLogits(kRows, kVocab, 9);
  const SamplingParams params{.temperature = 0.9f, .top_p = 0.95f, .seed = 3, .logprobs = 2};
  Sampler a(params), b(params);
  for (int64_t r = 0; r < kRows; ++r) {
    const SampleResult x = a.Sample(whole, r);
    const SampleResult y = b.Sample(whole.logits.data() + r * kVocab, kVocab);
    EXPECT_EQ(x.token_id, y.token_id);
    EXPECT_EQ(x.logprob, y.logprob);
  }
}

// Sample (which sorts only the bands of the row its draw walks) against SampleReference (which
// sorts the whole row): the same tokens from the same seeds, over peaked and flat rows (a high
// temperature walks thousands of entries deep), ties, every top_p, with and without top_k, a row
// with NaN in it and one with two +inf maxima.
TEST(SamplerTest, BandSortMatchesTheWholeRowReference) {
  int deep_walks = 0;
  for (int64_t vocab : {4, 300, 5003}) {
    std::vector<float> logits = RandomLogits(6, vocab, 17 + vocab);
    logits[5 * vocab + 1] = std::nanf("");  // the last row has a NaN
    if (vocab > 4) {  // the fifth has two +inf maxima, the draw picks between them
      logits[4 * vocab + 2] = logits[4 * vocab + vocab - 1] =
          std::numeric_limits<float>::infinity();
    }
    for (float t : {0.3f, 1.0f, 8.0f, 40.0f}) {
      // The fourth row is one maximum and a long tail 8.05 T to 14 T below it, holding a good
      // part of the mass: the walk goes on into the second and later bands.
      float* tail = logits.data() + 3 * vocab;
      tail[0] = 1.0f;
      for (int64_t i = 1; i < vocab; ++i) {
        tail[i] = 1.0f - t * (8.05f + 6.0f * static_cast<float>(i % 97) / 96.0f);
      }
      for (float p : {1.0f, 0.999f, 0.9f, 0.2f}) {
        for (int32_t k : {0, 5}) {
          const SamplingParams params{.temperature = t,
                                      .top_k = k,
                                      .top_p = p,
                                      .seed = static_cast<uint64_t>(7 + vocab),
                                      .logprobs = 3};
          Sampler fast(params), ref(params);
          for (int rep = 0; rep < 4; ++rep) {
            for (int64_t r = 0; r < 6; ++r) {
              const SampleResult x = fast.Sample(logits.data() + r * vocab, vocab);
              const SampleResult y = ref.SampleReference(logits.data() + r * vocab, vocab);
              ASSERT_EQ(x.token_id, y.token_id)
                  << "vocab " << vocab << " row " << r << " T " << t << " top_p " << p;
              // (a +inf pick's log-prob is NaN: inf - inf; the two agree on that too)
              EXPECT_TRUE(x.logprob == y.logprob ||
                          (std::isnan(x.logprob) && std::isnan(y.logprob)));
              EXPECT_FALSE(std::isnan(logits[r * vocab + x.token_id])) << "NaN is never drawn";
              ASSERT_EQ(x.top.size(), y.top.size());
              for (size_t i = 0; i < x.top.size(); ++i) {
                EXPECT_EQ(x.top[i].token_id, y.top[i].token_id);
              }
              // A pick more than 8 T below the maximum: the walk went past the first band.
              if (k == 0) {
                const float* row = logits.data() + r * vocab;
                const float max = *std::max_element(row, row + vocab, [](float a, float b) {
                  return std::isnan(a) || (!std::isnan(b) && a < b);
                });
                deep_walks += row[x.token_id] < max - 8 * t;
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(deep_walks, 8);  // the grid reaches the second band (LongTails... goes further)
}

// A row built so that the walk often ends in the second or third band: one maximum, 500 entries
// 8.05 T below it and 40000 entries 12.05 T below (masses 1 : 0.16 : 0.23). Sample against
// SampleReference, and the picks spread over all three bands as those masses say.
TEST(SamplerTest, LongTailsWalkIntoLaterBands) {
  constexpr int64_t kVocab = 40501;
  constexpr int kDraws = 150;
  for (auto [t, p] : {std::pair{0.5f, 1.0f}, std::pair{2.0f, 0.95f}}) {
    std::vector<float> row(kVocab);
    row[7] = 3.0f;  // the maximum, not first
    for (int64_t i = 0, n = 0; i < kVocab; ++i) {
      if (i != 7) row[i] = 3.0f - t * (n++ < 500 ? 8.05f : 12.05f) + 1e-4f * (i % 13);
    }
    Sampler fast({.temperature = t, .top_p = p, .seed = 5}),
        ref({.temperature = t, .top_p = p, .seed = 5});
    int band[3] = {0, 0, 0};
    for (int d = 0; d < kDraws; ++d) {
      const int32_t x = fast.Sample(row.data(), kVocab).token_id;
      ASSERT_EQ(x, ref.SampleReference(row.data(), kVocab).token_id) << "T " << t << " draw " << d;
      ++band[row[x] > 3.0f - 8 * t ? 0 : row[x] > 3.0f - 12 * t ? 1 : 2];
    }
    // Expected shares 72%, 12%, 16% (top_p 1); the nucleus at 0.95 drops some of the last band.
    EXPECT_GT(band[0], kDraws / 2) << "T " << t;
    EXPECT_GT(band[1], kDraws / 20) << "T " << t;
    EXPECT_GT(band[2], kDraws / 40) << "T " << t;
  }
}

// The distribution itself, against probabilities worked out here the way Hugging Face's
// TemperatureLogitsWarper and TopPLogitsWarper define them: softmax(logits / T), then keep the
// smallest set of best tokens whose mass reaches top_p and renormalise. 40000 seeded draws per
// case; every token's frequency within 5 standard deviations (deterministic: fixed seeds).
TEST(SamplerTest, FrequenciesFollowTemperatureAndTopP) {
  constexpr int64_t kVocab = 40;
  constexpr int kDraws = 40000;
  const std::vector<float> logits = RandomLogits(1, kVocab, 23);
  for (float t : {0.7f, 1.5f}) {
    for (float p : {1.0f, 0.8f}) {
      std::vector<double> prob(kVocab);
      const double m = *std::max_element(logits.begin(), logits.end());
      double z = 0;
      for (int64_t i = 0; i < kVocab; ++i) z += prob[i] = std::exp((logits[i] - m) / t);
      for (double& x : prob) x /= z;
      std::vector<int64_t> order(kVocab);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
      double cum = 0, kept = 0;
      std::vector<double> want(kVocab, 0.0);
      for (int64_t i : order) {
        if (cum >= p) break;
        cum += prob[i];
        want[i] = prob[i];
        kept += prob[i];
      }
      for (double& x : want) x /= kept;
      Sampler sampler({.temperature = t, .top_p = p, .seed = 99});
      std::vector<int> count(kVocab, 0);
      for (int d = 0; d < kDraws; ++d) ++count[sampler.Sample(logits.data(), kVocab).token_id];
      for (int64_t i = 0; i < kVocab; ++i) {
        const double expected = want[i] * kDraws;
        const double sigma = std::sqrt(kDraws * want[i] * (1 - want[i]));
        if (want[i] == 0) {
          EXPECT_EQ(count[i], 0) << "token " << i << " is outside the nucleus";
        } else {
          EXPECT_NEAR(count[i], expected, 5 * sigma + 1) << "token " << i << " T " << t;
        }
      }
    }
  }
}

}  // namespace
}  // namespace loraplex::model
