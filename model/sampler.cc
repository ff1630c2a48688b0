#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace loraplex::model {

absl::Status SamplingParams::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  if (logprobs < 0 || logprobs > 20) {
    return absl::InvalidArgumentError(absl::StrCat("logprobs must be in [0, 20], got ", logprobs));
  }
  return absl::OkStatus();
}

SampleResult Sampler::Sample(const float* logits, int64_t vocab_size) {
  SampleResult result;
  // log-softmax normaliser of the raw logits, in double for a stable sum.
  float max_logit = -std::numeric_limits<float>::infinity();
  int32_t argmax = 0;
  for (int64_t i = 0; i < vocab_size; ++i) {
    if (logits[i] > max_logit) {
      max_logit = logits[i];
      argmax = static_cast<int32_t>(i);
    }
  }
  double sum = 0;
  for (int64_t i = 0; i < vocab_size; ++i)
    sum += std::exp(static_cast<double>(logits[i] - max_logit));
  const double log_z = max_logit + std::log(sum);
  auto logprob = [&](int32_t id) { return static_cast<float>(logits[id] - log_z); };

  if (params_.temperature == 0.0f) {
    result.token_id = argmax;
  } else {
    // Candidates sorted by logit, best first (ties by lower id), cut by top-k then top-p.
    std::vector<int32_t> ids(vocab_size);
    std::iota(ids.begin(), ids.end(), 0);
    int64_t keep = vocab_size;
    if (params_.top_k > 0) keep = std::min<int64_t>(keep, params_.top_k);
    auto better = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    if (keep < vocab_size) {
      std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), better);
      ids.resize(keep);
    } else {
      std::sort(ids.begin(), ids.end(), better);
    }
    const double inv_t = 1.0 / params_.temperature;
    std::vector<double> probs(ids.size());
    double total = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      probs[i] = std::exp((static_cast<double>(logits[ids[i]]) - max_logit) * inv_t);
      total += probs[i];
    }
    if (params_.top_p < 1.0f) {
      // Smallest prefix whose mass reaches top_p (always at least one token).
      double cum = 0;
      size_t cut = ids.size();
      for (size_t i = 0; i < ids.size(); ++i) {
        cum += probs[i] / total;
        if (cum >= params_.top_p) {
          cut = i + 1;
          break;
        }
      }
      ids.resize(cut);
      probs.resize(cut);
      total = std::accumulate(probs.begin(), probs.end(), 0.0);
    }
    double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_) * total;
    size_t pick = ids.size() - 1;
    for (size_t i = 0; i < ids.size(); ++i) {
      u -= probs[i];
      if (u < 0) {
        pick = i;
        break;
      }
    }
    result.token_id = ids[pick];
  }
  result.logprob = logprob(result.token_id);

  if (params_.logprobs > 0) {
    int64_t k = std::min<int64_t>(params_.logprobs, vocab_size);
    std::vector<int32_t> ids(vocab_size);
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    for (int64_t i = 0; i < k; ++i) result.top.push_back({ids[i], logprob(ids[i])});
  }
  return result;
}

}  // namespace loraplex::model
