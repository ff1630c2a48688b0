#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/kernels.h"

namespace loraplex::model {

absl::Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0 (0 = greedy), got ", temperature));
  }
  if (top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0 (0 = off), got ", top_k));
  }
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  if (logprobs < 0 || logprobs > kMaxLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs must be in [0, ", kMaxLogprobs, "], got ", logprobs));
  }
  return absl::OkStatus();
}

namespace {

// Sampling order: higher logit first, equal logits by lower id; NaN after everything (so that a
// row with NaN still sorts with a strict weak order; NaN has no weight, so it is never drawn).
struct Better {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    const float x = logits[a], y = logits[b];
    if (std::isnan(x) || std::isnan(y)) return !std::isnan(x) && std::isnan(y);
    return x > y || (x == y && a < b);
  }
};

// A candidate's unnormalised probability at temperature 1 / inv_t: exp((logit - max) / T), 1 for
// the maximum itself (also when it is +inf), 0 for NaN (never picked).
double Weight(float logit, float max_logit, double inv_t) {
  if (logit == max_logit) return 1.0;
  if (std::isnan(logit)) return 0.0;
  return std::exp((static_cast<double>(logit) - max_logit) * inv_t);
}

// Where a walk that rounding left with u >= 0 ends: the last candidate with a weight (NaN ones
// have none), else the first.
int64_t LastWeighted(const std::vector<double>& probs, int64_t n) {
  for (int64_t i = n - 1; i > 0; --i) {
    if (probs[i] > 0) return i;
  }
  return 0;
}

// The greedy pick (first maximum; NaN never wins; 0 in a row of -inf and NaN) and its logit: a
// SIMD max pass, then the first entry equal to it.
std::pair<int32_t, float> Argmax(const float* logits, int64_t n) {
  const float max_logit = kernels::Max(logits, n);
  if (max_logit == -std::numeric_limits<float>::infinity()) return {0, max_logit};
  return {static_cast<int32_t>(std::find(logits, logits + n, max_logit) - logits), max_logit};
}

}  // namespace

// What every whole-row sample shares: the greedy pick, the log-softmax normaliser and the
// requested alternatives; `draw` picks the token when the temperature is not 0.
template <typename DrawFn>
SampleResult Sampler::SampleRow(const float* logits, int64_t vocab_size, DrawFn&& draw) {
  SampleResult result;
  const auto [argmax, max_logit] = Argmax(logits, vocab_size);
  // The log-softmax normaliser of the raw logits (kernels::LogSumExp without its own max pass:
  // the arg-max found it): the full-row exp pass every sampled token pays on the host.
  const double log_z =
      std::isinf(max_logit)
          ? max_logit
          : max_logit + std::log(kernels::ExpMass(logits, vocab_size, max_logit, 1.0));
  auto logprob = [&](int32_t id) { return static_cast<float>(logits[id] - log_z); };
  result.token_id = params_.temperature == 0.0f ? argmax : draw(max_logit);
  result.logprob = logprob(result.token_id);
  if (params_.logprobs > 0) {
    const int64_t k = std::min<int64_t>(params_.logprobs, vocab_size);
    std::vector<int32_t> ids(vocab_size);
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), Better{logits});
    for (int64_t i = 0; i < k; ++i) result.top.push_back({ids[i], logprob(ids[i])});
  }
  return result;
}

double Sampler::WholeRowMass(const float* logits, int64_t n, float max_logit) const {
  // The f32 SIMD exp pass of the log-sum-exp (kernels::ExpMass) rather than Weight's f64 exp per
  // logit. The walk's f64 weights of the candidates it visits sum to this within ~1e-7.
  return kernels::ExpMass(logits, n, max_logit, 1.0 / params_.temperature);
}

SampleResult Sampler::Sample(const float* logits, int64_t vocab_size) {
  return SampleRow(logits, vocab_size, [&](float max_logit) -> int32_t {
    std::vector<int32_t> ids(vocab_size);
    std::iota(ids.begin(), ids.end(), 0);
    const Better better{logits};
    if (params_.top_k > 0) {
      // The top_k candidates, sorted: a partial sort of the row, then Draw over them.
      const int64_t keep = std::min<int64_t>(params_.top_k, vocab_size);
      std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), better);
      std::vector<float> candidates(keep);
      for (int64_t i = 0; i < keep; ++i) candidates[i] = logits[ids[i]];
      return ids[Draw(candidates.data(), keep, max_logit)];
    }
    // The whole row is the candidate list, but the draw only ever walks its best entries: the
    // nucleus (top_p), or the prefix where the uniform draw lands (mostly a few hundred tokens).
    // So the row is sorted in bands: the entries within `span` of the maximum (a prefix of the
    // sorted row), then, while the walk goes on past them, the next band down with span x1.5,
    // and at last (span / T past 800, where the f64 exp is 0) everything left. The pick is the
    // one SampleReference makes after sorting the whole row: the same weights summed in the
    // same order, the same single draw from the generator.
    const double inv_t = 1.0 / params_.temperature;
    const double total = WholeRowMass(logits, vocab_size, max_logit);
    std::vector<double> probs;  // of ids[0, sorted), in order
    int64_t sorted = 0;
    double span = 8.0 * params_.temperature;
    auto sort_more = [&] {
      auto band_end = ids.end();
      if (span * inv_t <= 800) {
        const float floor = static_cast<float>(max_logit - span);
        band_end = std::partition(ids.begin() + sorted, ids.end(),
                                  [&](int32_t id) { return logits[id] >= floor; });
        span *= 1.5;
      }
      std::sort(ids.begin() + sorted, band_end, better);
      const int64_t next = band_end - ids.begin();
      for (int64_t i = sorted; i < next; ++i) {
        probs.push_back(Weight(logits[ids[i]], max_logit, inv_t));
      }
      sorted = next;
    };
    // The nucleus: the smallest prefix whose mass reaches top_p (the whole row when it is 1).
    int64_t n = vocab_size;
    double mass = total;
    if (params_.top_p < 1.0f) {
      double cum = 0;
      for (int64_t i = 0; i < vocab_size; ++i) {
        while (i == sorted) sort_more();
        cum += probs[i] / total;
        if (cum >= params_.top_p) {
          n = i + 1;
          break;
        }
      }
      if (n < vocab_size) mass = std::accumulate(probs.begin(), probs.begin() + n, 0.0);
    }
    double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_) * mass;
    for (int64_t i = 0; i < n; ++i) {
      while (i == sorted) sort_more();
      u -= probs[i];
      if (u < 0) return ids[i];
    }
    while (sorted < n) sort_more();  // rounding left u >= 0: the nucleus's last token
    return ids[LastWeighted(probs, n)];
  });
}

SampleResult Sampler::SampleReference(const float* logits, int64_t vocab_size) {
  return SampleRow(logits, vocab_size, [&](float max_logit) -> int32_t {
    // Every candidate sorted by logit, best first (ties by lower id), cut by top-k; Draw does the
    // rest. Without top-k the whole row's mass is summed in row order (as Sample does).
    std::vector<int32_t> ids(vocab_size);
    std::iota(ids.begin(), ids.end(), 0);
    std::sort(ids.begin(), ids.end(), Better{logits});
    const int64_t keep =
        params_.top_k > 0 ? std::min<int64_t>(params_.top_k, vocab_size) : vocab_size;
    std::vector<float> candidates(keep);
    for (int64_t i = 0; i < keep; ++i) candidates[i] = logits[ids[i]];
    const double total = params_.top_k > 0 ? -1.0 : WholeRowMass(logits, vocab_size, max_logit);
    return ids[Draw(candidates.data(), keep, max_logit, total)];
  });
}

int64_t Sampler::Draw(const float* logits, int64_t n, float max_logit, double total) {
  const double inv_t = 1.0 / params_.temperature;
  std::vector<double> probs(n);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    probs[i] = Weight(logits[i], max_logit, inv_t);
    sum += probs[i];
  }
  if (total < 0) total = sum;
  if (params_.top_p < 1.0f) {
    // Smallest prefix whose mass reaches top_p (always at least one token).
    double cum = 0;
    int64_t cut = n;
    for (int64_t i = 0; i < n; ++i) {
      cum += probs[i] / total;
      if (cum >= params_.top_p) {
        cut = i + 1;
        break;
      }
    }
    if (cut < n) total = std::accumulate(probs.begin(), probs.begin() + cut, 0.0);
    n = cut;
  }
  double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_) * total;
  for (int64_t i = 0; i < n; ++i) {
    u -= probs[i];
    if (u < 0) return i;
  }
  return LastWeighted(probs, n);
}

int64_t Sampler::TopLogitsNeeded(const SamplingParams& params) {
  const int64_t alternatives = params.logprobs;
  if (params.temperature == 0.0f) return std::max<int64_t>(1, alternatives);
  if (params.top_k > 0) return std::max<int64_t>(params.top_k, alternatives);
  return 0;
}

SampleResult Sampler::Sample(const StepLogits& step, int64_t row) {
  if (step.k == 0) return Sample(step.logits.data() + row * step.vocab, step.vocab);
  const int64_t k = step.k;
  const float* logits = step.logits.data() + row * k;
  const int32_t* ids = step.ids.data() + row * k;
  const float* logprobs = step.logprobs.data() + row * k;
  SampleResult result;
  int64_t pick = 0;  // greedy: the best entry
  if (params_.temperature != 0.0f) {
    const int64_t keep = params_.top_k > 0 ? std::min<int64_t>(params_.top_k, k) : k;
    pick = Draw(logits, keep, logits[0]);
  }
  result.token_id = ids[pick];
  result.logprob = logprobs[pick];
  const int64_t alternatives = std::min<int64_t>(params_.logprobs, k);
  for (int64_t i = 0; i < alternatives; ++i) result.top.push_back({ids[i], logprobs[i]});
  return result;
}

}  // namespace loraplex::model
