#include "adapters/base_weights.h"

#include "common/status.h"

namespace loraplex::adapters {

BaseWeights DirectBaseWeights(const model::LlamaModel& model) {
  return [&model](int64_t layer, const std::array<bool, model::kNumLinearModules>& wanted,
                  std::array<std::vector<float>, model::kNumLinearModules>* weights) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      if (!wanted[m]) continue;
      LP_ASSIGN_OR_RETURN((*weights)[m],
                          model.BaseLinearF32(layer, static_cast<model::LinearModule>(m)));
    }
    return absl::OkStatus();
  };
}

}  // namespace loraplex::adapters
