#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/kernels.h"

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
  float max_logit = -std::numeric_limits<float>::infinity();
  int32_t argmax = 0;
  for (int64_t i = 0; i < vocab_size; ++i) {
    if (logits[i] > max_logit) {
      max_logit = logits[i];
      argmax = static_cast<int32_t>(i);
    }
  }
  // The log-softmax normaliser of the raw logits (SIMD exp, f64 sums of chunks): the full-row
  // pass every sampled token pays on the host; 3.5x cheaper than a scalar f64 exp per logit
  // (kernels_bench BM_LogSumExp; its scalar max pass is most of what is left).
  const double log_z = kernels::LogSumExp(logits, vocab_size);
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
    std::vector<float> candidates(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) candidates[i] = logits[ids[i]];
    const int64_t pick = Draw(candidates.data(), static_cast<int64_t>(ids.size()), max_logit);
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

int64_t Sampler::Draw(const float* logits, int64_t n, float max_logit) {
  const double inv_t = 1.0 / params_.temperature;
  std::vector<double> probs(n);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    probs[i] = std::exp((static_cast<double>(logits[i]) - max_logit) * inv_t);
    total += probs[i];
  }
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
    n = cut;
    total = std::accumulate(probs.begin(), probs.begin() + n, 0.0);
  }
  double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_) * total;
  for (int64_t i = 0; i < n; ++i) {
    u -= probs[i];
    if (u < 0) return i;
  }
  return n - 1;
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
