// Where an adapter computation reads the frozen base weights: the DoRA norms at load
// (adapters/lora_adapter.h) and the inspection (adapters/inspect.h) both need W of some modules.
// Merging writes W in place on the thread that runs the forward steps, so in a server the reads
// go through that thread (one layer at a time, between steps); a program that owns the model and
// merges nothing meanwhile reads it directly.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "model/llama_model.h"

namespace loraplex::adapters {

// The base weights of the modules `wanted` of one layer (indexed by LinearModule; an entry is
// filled when wanted[m]), each the pristine W [out, in] in f32, row-major.
using BaseWeights = std::function<absl::Status(
    int64_t layer, const std::array<bool, model::kNumLinearModules>& wanted,
    std::array<std::vector<float>, model::kNumLinearModules>* weights)>;

// Reads `model` directly (LlamaModel::BaseLinearF32). Only for a caller that runs no Merge or
// Unmerge on it while the callback is in use (tests, loraplex-generate, a server before its engine
// starts); `model` must outlive the callback.
BaseWeights DirectBaseWeights(const model::LlamaModel& model);

}  // namespace loraplex::adapters
