// The workload of `loraplex bench`, with no gRPC: which adapter each request names (popularity),
// how long prompts and outputs are, when open-loop requests arrive, and the fixed parameters of
// the DESIGN.md section 6 scenarios. Each sampler owns its generator: one per thread.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace loraplex::client {

// distinct: request i names adapter i mod N (concurrent requests differ); uniform: each equally
// likely; zipf:ALPHA: adapter k (0-based) with probability proportional to 1/(k+1)^ALPHA;
// identical: every request names adapter 0; hot:P: adapter 0 with probability P, the others
// equally likely with the rest (S7's skew: hot:0.9).
struct Popularity {
  enum class Kind { kDistinct, kUniform, kZipf, kIdentical, kHot };
  Kind kind = Kind::kUniform;
  double alpha = 1.0;  // zipf's ALPHA, or hot's P
};
// "distinct" | "uniform" | "identical" | "zipf" (alpha 1) | "zipf:ALPHA" (ALPHA > 0) |
// "hot:P" (0 < P <= 1).
absl::StatusOr<Popularity> ParsePopularity(const std::string& text);
std::string PopularityName(const Popularity& p);

class AdapterPicker {
 public:
  // n >= 1 adapters.
  AdapterPicker(Popularity pop, int n, uint64_t seed);
  // The adapter index for the request numbered `request_index` (0, 1, 2, ...).
  int Pick(int64_t request_index);
  // The probability of each index (for tests and the report).
  const std::vector<double>& Probabilities() const { return probs_; }

 private:
  Popularity pop_;
  int n_;
  std::mt19937_64 rng_;
  std::vector<double> probs_;
  std::vector<double> cdf_;
};

// "N" (fixed) or "uniform:A:B" (integers, A <= B, inclusive), all >= 1.
struct LengthDist {
  int64_t lo = 128, hi = 128;
  int64_t Sample(std::mt19937_64& rng) const;
  double Mean() const { return 0.5 * static_cast<double>(lo + hi); }
};
absl::StatusOr<LengthDist> ParseLengthDist(const std::string& flag, const std::string& text);

// Open-loop inter-arrival times with mean 1/rate: "poisson" (exponential gaps) or "gamma:SHAPE"
// (gamma gaps; SHAPE < 1 is burstier than Poisson, > 1 more regular; SHAPE 1 is Poisson).
struct Arrivals {
  double rate = 1;     // requests per second, > 0
  double shape = 1.0;  // gamma shape; 1 = Poisson
  std::string Name() const;
  double NextGap(std::mt19937_64& rng) const;
};
absl::StatusOr<Arrivals> ParseArrivals(const std::string& text, double rate);

// A prompt from a JSONL file: {"prompt": "...", "max_tokens": N (optional)} per line.
struct PromptLine {
  std::string prompt;
  int64_t max_tokens = 0;  // 0: from the output length distribution
};
// INVALID_ARGUMENT naming the file and line for bad JSON or a missing "prompt"; NOT_FOUND.
absl::StatusOr<std::vector<PromptLine>> ReadPromptsJsonl(const std::string& path);

}  // namespace loraplex::client
