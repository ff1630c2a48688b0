// The singular value decomposition of a LoRA update dW = B A (B [out, r] with the scale folded in,
// A [r, in]) through r x r problems, never the dense dW, and its best rank-k approximation
// factored back into a smaller pair. Shared by the inspection (adapters/inspect.h) and the rank
// compression at registration (AdapterLoadOptions::compress_rank).
//
// Method: thin QRs B = Qb Rb and A^T = Qa Ra, so dW = Qb (Rb Ra^T) Qa^T; the SVD of the r x r core
// Rb Ra^T = Um S Vm^T gives dW = U S V^T with U = Qb Um, V = Qa Vm. All in f64 (Eigen).
//
// Truncation (Eckart-Young): the best rank-k approximation in the Frobenius norm keeps the k
// largest singular values, dW_k = U_k S_k V_k^T. It is factored back as B' = U_k S_k^(1/2) and
// A' = S_k^(1/2) V_k^T, the singular values split evenly, so that A' and B' have the same scale and
// lose the same relative precision when they are rounded to bf16. Its relative error is
// ||dW - dW_k||_F / ||dW||_F = sqrt(sum_{i >= k} s_i^2 / sum_i s_i^2) (0 when dW = 0).
//
// Thread-safety: pure functions.
#pragma once

#include <Eigen/Dense>
#include <cstdint>
#include <vector>

namespace loraplex::adapters {

struct LowRankSvd {
  Eigen::VectorXd sigma;  // p = min(r, out, in) singular values, descending
  Eigen::MatrixXd u;      // [out, p]
  Eigen::MatrixXd v;      // [in, p]
};

// a [r, in], b [out, r].
LowRankSvd DecomposeLowRank(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b);

// The best rank-k approximation of B A, as a pair of rank k' = min(k, p).
struct TruncatedPair {
  int64_t rank = 0;           // k'
  std::vector<float> a;       // [k', in], row-major
  std::vector<float> b;       // [out, k'], row-major
  double relative_error = 0;  // ||B A - B' A'||_F / ||B A||_F, from the discarded singular values
  double discarded_sq = 0;    // sum of the discarded singular values squared
  double total_sq = 0;        // ||B A||_F^2
};

// a: [r, in] and b: [out, r] row-major f32 (b scaled); k >= 1.
TruncatedPair TruncateLowRank(const float* a, const float* b, int64_t r, int64_t in, int64_t out,
                              int64_t k);

}  // namespace loraplex::adapters
