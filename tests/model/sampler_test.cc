// The sampler on whole logit rows and on each row's best k entries (what a CUDA model copies back
// instead of the whole vocabulary): for every kind of params, k = Sampler::TopLogitsNeeded must
// give the same tokens, from the same seeded draws, as the whole row, with the same log-probs.
#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
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

}  // namespace
}  // namespace loraplex::model
