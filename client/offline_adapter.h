// The PEFT adapter, or weighted mix of adapters, loaded for offline use by loraplex-generate (no
// registry).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "model/llama_model.h"

namespace loraplex {

class OfflineAdapter {
 public:
  OfflineAdapter();
  ~OfflineAdapter();
  // Loads and validates `dirs` against `model`; errors name the field or file at fault. One folder
  // without weights is that adapter; several, or weights (one per folder), make a weighted mix
  // (adapters/lora_mix.h) whose summed rank must stay within max_rank.
  absl::Status Load(const std::vector<std::string>& dirs, const std::vector<double>& weights,
                    const model::LlamaModel& model, int max_rank);
  // Null when nothing was loaded.
  const model::LoraWeightsView* view() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace loraplex
