// A weighted mix of adapters for one request (GenerateRequest.adapters): per module
//   delta = sum_i w_i * s_i * B_i A_i
// over the parts that have the module (a module a part lacks contributes nothing). It is served
// as one adapter whose rank is the sum of the parts' ranks: A is the parts' A_i stacked row-wise
// and B the columns w_i * (s_i B_i) side by side, so B A = sum_i w_i s_i B_i A_i exactly (PEFT's
// add_weighted_adapter with combination_type="cat"). No dense matrix is built: the mix costs the
// parts' A and B once more, and the forward pass runs it through the same SGMV/BGMV kernels, in the
// same batch as single-adapter requests, merged or not. The weights scale the copies of B (one more
// rounding for bf16 storage, none for f32 or a weight of 1).
//
// Thread-safety: immutable after Build; share freely. The parts' views are only read during Build.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/llama_config.h"
#include "model/llama_model.h"

namespace loraplex::adapters {

inline constexpr int kMaxMixParts = 8;

struct MixPart {
  const model::LoraWeightsView* view = nullptr;  // as LoraAdapter::view() holds it (s folded in B)
  float weight = 1.0f;
};

class LoraMix {
 public:
  // INVALID_ARGUMENT: no parts or more than kMaxMixParts, a null view, a DoRA adapter, a weight
  // that is not finite, or views that do not fit `config` or differ in dtype. FAILED_PRECONDITION:
  // a module's summed rank exceeds `max_rank` (the server's --max-lora-rank; the CUDA backend sizes
  // its adapter slots by it), or no part has any module.
  static absl::StatusOr<std::unique_ptr<LoraMix>> Build(const std::vector<MixPart>& parts,
                                                        const model::LlamaConfig& config,
                                                        int64_t max_rank);

  const model::LoraWeightsView& view() const { return view_; }
  // Largest summed rank over its modules.
  int64_t max_rank() const { return max_rank_; }
  int64_t bytes() const { return bytes_; }

 private:
  LoraMix() = default;
  std::unique_ptr<uint8_t[]> storage_;
  std::vector<std::unique_ptr<model::LoraPair>> pairs_;  // stable addresses for the view
  model::LoraWeightsView view_;
  int64_t max_rank_ = 0;
  int64_t bytes_ = 0;
};

}  // namespace loraplex::adapters
