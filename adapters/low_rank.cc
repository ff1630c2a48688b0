#include "adapters/low_rank.h"

#include <algorithm>
#include <cmath>

namespace loraplex::adapters {
namespace {

using Eigen::MatrixXd;

// Thin QR of x [n, r]: Q [n, k] with orthonormal columns and R [k, r], k = min(n, r).
void ThinQr(const MatrixXd& x, MatrixXd* q, MatrixXd* r) {
  const Eigen::Index k = std::min(x.rows(), x.cols());
  Eigen::HouseholderQR<MatrixXd> qr(x);
  *q = qr.householderQ() * MatrixXd::Identity(x.rows(), k);
  *r = qr.matrixQR().topRows(k).triangularView<Eigen::Upper>();
}

using RowMajorF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

}  // namespace

LowRankSvd DecomposeLowRank(const MatrixXd& a, const MatrixXd& b) {
  MatrixXd qb, rb, qa, ra;
  ThinQr(b, &qb, &rb);              // B = Qb Rb
  ThinQr(a.transpose(), &qa, &ra);  // A^T = Qa Ra, so B A = Qb (Rb Ra^T) Qa^T
  const MatrixXd core = rb * ra.transpose();
  Eigen::JacobiSVD<MatrixXd> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return {svd.singularValues(), qb * svd.matrixU(), qa * svd.matrixV()};
}

TruncatedPair TruncateLowRank(const float* a, const float* b, int64_t r, int64_t in, int64_t out,
                              int64_t k) {
  const MatrixXd ad = Eigen::Map<const RowMajorF>(a, r, in).cast<double>();
  const MatrixXd bd = Eigen::Map<const RowMajorF>(b, out, r).cast<double>();
  const LowRankSvd svd = DecomposeLowRank(ad, bd);
  const Eigen::Index p = svd.sigma.size();
  const Eigen::Index kept = std::min<Eigen::Index>(std::max<int64_t>(k, 1), p);
  TruncatedPair t;
  t.rank = kept;
  t.total_sq = svd.sigma.squaredNorm();
  t.discarded_sq = svd.sigma.tail(p - kept).squaredNorm();
  t.relative_error = t.total_sq > 0 ? std::sqrt(t.discarded_sq / t.total_sq) : 0.0;
  const Eigen::VectorXd root = svd.sigma.head(kept).cwiseSqrt();
  const MatrixXd b_new = svd.u.leftCols(kept) * root.asDiagonal();              // [out, k']
  const MatrixXd a_new = root.asDiagonal() * svd.v.leftCols(kept).transpose();  // [k', in]
  t.a.resize(kept * in);
  t.b.resize(out * kept);
  Eigen::Map<RowMajorF>(t.a.data(), kept, in) = a_new.cast<float>();
  Eigen::Map<RowMajorF>(t.b.data(), out, kept) = b_new.cast<float>();
  return t;
}

}  // namespace loraplex::adapters
