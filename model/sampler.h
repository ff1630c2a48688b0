// Turning logits into the next token: greedy, temperature, top-k, top-p, with a per-request seeded
// generator, and log-probabilities of the chosen token and of the top-k alternatives.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"

namespace loraplex::model {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  uint64_t seed = 0;
  int32_t logprobs = 0;  // number of top alternatives to report (0 = none)

  // INVALID_ARGUMENT naming the field: temperature < 0 or not finite, top_k < 0,
  // top_p outside (0, 1], logprobs outside [0, 20].
  absl::Status Validate() const;
};

struct TokenLogprob {
  int32_t token_id = 0;
  float logprob = 0.0f;
};

struct SampleResult {
  int32_t token_id = 0;
  float logprob = 0.0f;           // log-softmax of the raw logits (temperature 1), as OpenAI
  std::vector<TokenLogprob> top;  // best first, `logprobs` entries
};

// Per-request sampler: holds the seeded generator, so the same seed gives the same tokens.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  SampleResult Sample(const float* logits, int64_t vocab_size);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace loraplex::model
