#include "adapters/inspect.h"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "adapters/lora_adapter.h"
#include "adapters/low_rank.h"
#include "common/half.h"
#include "common/status.h"

namespace loraplex::adapters {
namespace {

using Eigen::MatrixXd;
using Eigen::VectorXd;

// A weight view (f32 or bf16) as an f64 matrix.
absl::StatusOr<MatrixXd> ToMatrix(const kernels::WeightView& w) {
  if (w.data == nullptr && w.rows * w.cols > 0) {
    return absl::InvalidArgumentError("a LoRA matrix has no host data");
  }
  MatrixXd m(w.rows, w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t c = 0; c < w.cols; ++c) {
      const int64_t i = r * w.cols + c;
      switch (w.dtype) {
        case kernels::DType::kF32:
          m(r, c) = static_cast<const float*>(w.data)[i];
          break;
        case kernels::DType::kBF16:
          m(r, c) = Bf16ToF32(static_cast<const uint16_t*>(w.data)[i]);
          break;
        default:
          return absl::InvalidArgumentError("a LoRA matrix is neither f32 nor bf16");
      }
    }
  }
  return m;
}

struct Pair {
  MatrixXd a, b;
  LowRankSvd svd;
};

absl::StatusOr<Pair> Load(const model::LoraPair& p, const model::LlamaConfig& config, int64_t layer,
                          model::LinearModule m) {
  const int64_t in = model::LinearInFeatures(config, m), out = model::LinearOutFeatures(config, m);
  if (p.rank <= 0 || p.a.rows != p.rank || p.a.cols != in || p.b.rows != out ||
      p.b.cols != p.rank) {
    return absl::InvalidArgumentError(absl::StrCat(
        ModuleKey(layer, m), ": LoRA shapes A [", p.a.rows, ", ", p.a.cols, "], B [", p.b.rows,
        ", ", p.b.cols, "] do not fit [", out, ", ", in, "] at rank ", p.rank));
  }
  Pair pair;
  LP_ASSIGN_OR_RETURN(pair.a, ToMatrix(p.a));
  LP_ASSIGN_OR_RETURN(pair.b, ToMatrix(p.b));
  pair.svd = DecomposeLowRank(pair.a, pair.b);
  return pair;
}

absl::Status CheckLayers(const model::LoraWeightsView& v, const model::LlamaConfig& config) {
  if (static_cast<int64_t>(v.layers.size()) != config.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("the adapter has ", v.layers.size(),
                                                   " layers, the model ", config.num_layers));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<ModuleInspection>> InspectAdapter(
    const model::LoraWeightsView& adapter, const model::LlamaConfig& config,
    const BaseWeights& base, const model::LoraWeightsView* against) {
  LP_RETURN_IF_ERROR(CheckLayers(adapter, config));
  if (against != nullptr) LP_RETURN_IF_ERROR(CheckLayers(*against, config));
  std::vector<ModuleInspection> result;
  for (int64_t l = 0; l < config.num_layers; ++l) {
    std::array<bool, model::kNumLinearModules> wanted{};
    bool any = false;
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      wanted[m] = adapter.layers[l][m] != nullptr;
      any = any || wanted[m];
    }
    if (!any) continue;
    std::array<std::vector<float>, model::kNumLinearModules> weights;
    LP_RETURN_IF_ERROR(base(l, wanted, &weights));
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      if (!wanted[m]) continue;
      const auto kind = static_cast<model::LinearModule>(m);
      const int64_t in = model::LinearInFeatures(config, kind);
      const int64_t out = model::LinearOutFeatures(config, kind);
      if (static_cast<int64_t>(weights[m].size()) != out * in) {
        return absl::InternalError(absl::StrCat(ModuleKey(l, kind), ": the base weight has ",
                                                weights[m].size(), " values, not ", out * in));
      }
      LP_ASSIGN_OR_RETURN(Pair pair, Load(*adapter.layers[l][m], config, l, kind));
      const LowRankSvd& svd = pair.svd;
      ModuleInspection mi;
      mi.module = ModuleKey(l, kind);
      mi.layer = l;
      mi.kind = kind;
      mi.rank = adapter.layers[l][m]->rank;
      mi.singular_values.assign(mi.rank, 0.0);
      for (Eigen::Index i = 0; i < svd.sigma.size() && i < mi.rank; ++i) {
        mi.singular_values[i] = svd.sigma(i);
      }
      const double sum_sq = svd.sigma.squaredNorm();
      mi.fro_norm = std::sqrt(sum_sq);
      // ||W||_F and U^T W V, with W V [out, p] accumulated row by row.
      const Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>
          w(weights[m].data(), out, in);
      const MatrixXd wd = w.cast<double>();
      const double w_norm = wd.norm();
      mi.relative_norm = w_norm > 0 ? mi.fro_norm / w_norm : 0.0;
      const MatrixXd projected = svd.u.transpose() * (wd * svd.v);
      const double projected_norm = projected.norm();
      mi.amplification = mi.fro_norm == 0     ? 0.0
                         : projected_norm > 0 ? mi.fro_norm / projected_norm
                                              : std::numeric_limits<double>::infinity();
      if (sum_sq > 0) {
        double acc = 0;
        for (Eigen::Index i = 0; i < svd.sigma.size(); ++i) {
          acc += svd.sigma(i) * svd.sigma(i);
          mi.effective_rank = i + 1;
          if (acc >= 0.99 * sum_sq) break;
        }
      }
      if (against != nullptr && against->layers[l][m] != nullptr) {
        LP_ASSIGN_OR_RETURN(Pair other, Load(*against->layers[l][m], config, l, kind));
        const Eigen::Index k =
            std::min({static_cast<Eigen::Index>(std::min(mi.rank, against->layers[l][m]->rank)),
                      svd.v.cols(), other.svd.v.cols()});
        const MatrixXd overlap = svd.v.leftCols(k).transpose() * other.svd.v.leftCols(k);
        mi.similarity = k > 0 ? overlap.squaredNorm() / static_cast<double>(k) : 0.0;
      }
      result.push_back(std::move(mi));
    }
  }
  return result;
}

}  // namespace loraplex::adapters
