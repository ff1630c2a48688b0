// Turning logits into the next token: greedy, temperature, top-k, top-p, with a per-request seeded
// generator, and log-probabilities of the chosen token and of the top-k alternatives.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"

namespace loraplex::model {

// The most alternatives a request may ask log-probabilities for.
inline constexpr int32_t kMaxLogprobs = 20;

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  uint64_t seed = 0;
  int32_t logprobs = 0;  // number of top alternatives to report (0 = none)

  // The one owner of these rules. INVALID_ARGUMENT naming the field: temperature < 0 or not
  // finite, top_k < 0, top_p outside (0, 1], logprobs outside [0, kMaxLogprobs].
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

// One step's logits as LlamaModel::Forward hands them to the samplers: whole rows, or only the
// best k entries of each row (what a CUDA model copies back when every request's sampling needs
// no more; see Sampler::TopLogitsNeeded).
struct StepLogits {
  int64_t vocab = 0;
  int64_t k = 0;                // 0: `logits` is [rows, vocab]; else [rows, k], best first
  std::vector<float> logits;    // raw logits
  std::vector<int32_t> ids;     // k > 0: [rows, k] token ids, best first (equal logits: lower id)
  std::vector<float> logprobs;  // k > 0: [rows, k] log-softmax over the whole row
};

// Per-request sampler: holds the seeded generator, so the same seed gives the same tokens.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  SampleResult Sample(const float* logits, int64_t vocab_size);
  // The readable reference of Sample: sorts the whole row, then cuts and draws. The same result
  // from the same generator state; tests and the sampler benchmark hold Sample to it.
  SampleResult SampleReference(const float* logits, int64_t vocab_size);
  // Row `row` of `step`, whole or its best k entries. With the best k entries (k at least
  // TopLogitsNeeded(params)) the result is the one Sample gives on the whole row: the same draws
  // from the generator over the same candidates in the same order; only the log-probs may differ
  // in the last bits (the whole-row normaliser is summed where the logits are).
  SampleResult Sample(const StepLogits& step, int64_t row);

  // How many of a row's best logits sampling with `params` needs: the greedy pick or the top_k
  // candidates, and the `logprobs` alternatives. 0 when it needs the whole row (temperature > 0
  // with top_k off).
  static int64_t TopLogitsNeeded(const SamplingParams& params);

 private:
  // Draws among `n` candidates sorted best first, `logits` theirs, `max_logit` the row's
  // maximum: temperature, top-p cut, then one uniform draw. Returns the index of the pick.
  // `total` is the candidates' whole mass (sum of exp((logit - max_logit) / T)) when the caller
  // has it, or < 0 to sum it here over the n candidates in order.
  int64_t Draw(const float* logits, int64_t n, float max_logit, double total = -1.0);
  // The greedy pick, log-probs and alternatives of a whole row; draw(max_logit) picks otherwise.
  template <typename DrawFn>
  SampleResult SampleRow(const float* logits, int64_t vocab_size, DrawFn&& draw);
  // sum of exp((logit - max_logit) / T) over a whole row.
  double WholeRowMass(const float* logits, int64_t n, float max_logit) const;

  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace loraplex::model
