// A PEFT adapter loaded for offline use by loraplex-generate (no registry, one adapter).
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "model/llama_model.h"

namespace loraplex {

class OfflineAdapter {
 public:
  OfflineAdapter();
  ~OfflineAdapter();
  // Loads and validates `dir` against `model`; errors name the field or file at fault.
  absl::Status Load(const std::string& dir, const model::LlamaModel& model, int max_rank);
  const model::LoraWeightsView* view() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace loraplex
