// What an adapter learned, per module, after the LoRA paper's section 7 (Hu et al., 2021): the
// singular values of its update dW = s B A, how large it is against the base weight, how many
// directions carry it, how much it amplifies directions the base weight does not emphasise, and how
// much two adapters' updates share a subspace.
//
// Per module with A [r, in] and s B [out, r] (B already scaled, as LoraAdapter stores it):
//   singular_values  the r singular values of dW, descending (zeros past rank(dW)). Computed from
//                    r x r problems, never the dense dW: thin QRs B = Qb Rb and A^T = Qa Ra, then
//                    the SVD of Rb Ra^T = Um S Vm^T; dW's singular vectors are U = Qb Um, V = Qa
//                    Vm.
//   fro_norm         ||dW||_F = sqrt(sum of squared singular values)
//   relative_norm    ||dW||_F / ||W||_F, W the pristine base weight (without a merged delta)
//   effective_rank   the smallest k whose top-k singular values hold >= 99% of the sum of squares
//                    (0 when dW = 0)
//   amplification    ||dW||_F / ||U^T W V||_F with U, V the top-r singular vectors of dW: how much
//                    dW amplifies the directions it shares with W (the paper's table 7); 0 when
//                    dW = 0
//   similarity       against a second adapter with the same module: ||V1_k^T V2_k||_F^2 / k, V the
//                    right singular vectors, k the smaller of the two ranks; 1 for an adapter
//                    against itself (when its dW has full rank r), 0 for orthogonal row spaces
// All arithmetic in f64 on the weights as the adapter is held (its storage dtype: f32, or bf16
// for a bf16 or quantized base), so the numbers describe what is served. Eigen does the QR and SVD.
//
// Thread-safety: pure functions of their inputs; the base weight callback decides where W is read.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/base_weights.h"
#include "model/llama_config.h"
#include "model/llama_model.h"

namespace loraplex::adapters {

struct ModuleInspection {
  std::string module;  // PEFT's path without "base_model.model.": "model.layers.0.self_attn.q_proj"
  int64_t layer = 0;
  model::LinearModule kind = model::LinearModule::kQ;
  int64_t rank = 0;
  std::vector<double> singular_values;  // `rank` of them, descending
  double fro_norm = 0;
  double relative_norm = 0;
  int64_t effective_rank = 0;
  double amplification = 0;
  std::optional<double> similarity;  // only against a second adapter that has this module
};

// Every module of `adapter`, in layer then LinearModule order; with `against`, its similarity for
// the modules both adapters have. INVALID_ARGUMENT when a view does not fit `config`; errors of
// `base` are returned as they are.
absl::StatusOr<std::vector<ModuleInspection>> InspectAdapter(
    const model::LoraWeightsView& adapter, const model::LlamaConfig& config,
    const BaseWeights& base, const model::LoraWeightsView* against = nullptr);

}  // namespace loraplex::adapters
