// The best k entries of a logit row, selected on the host the plain way: ids best first (equal
// logits: lower id), their logits, and their log-softmax over the whole row (normaliser in f64).
// The reference for the device's selection (CudaTopK) and the samplers' top-k path in tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace loraplex::testing {

struct HostTopLogits {
  std::vector<int32_t> ids;
  std::vector<float> logits;
  std::vector<float> logprobs;
};

inline HostTopLogits SelectTopLogits(const float* row, int64_t vocab, int64_t k) {
  std::vector<int32_t> ids(vocab);
  for (int64_t i = 0; i < vocab; ++i) ids[i] = static_cast<int32_t>(i);
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return row[a] > row[b] || (row[a] == row[b] && a < b);
  });
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double{row[i]} - row[ids[0]]);
  const double log_z = row[ids[0]] + std::log(sum);
  HostTopLogits top;
  for (int64_t i = 0; i < k; ++i) {
    top.ids.push_back(ids[i]);
    top.logits.push_back(row[ids[i]]);
    top.logprobs.push_back(static_cast<float>(row[ids[i]] - log_z));
  }
  return top;
}

}  // namespace loraplex::testing
