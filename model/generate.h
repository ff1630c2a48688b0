// Offline generation of one sequence (no server): prefill, then decode token by token with a
// private KV cache. Used by loraplex-generate and as the solo reference the batched engine is
// compared against.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/llama_model.h"
#include "model/sampler.h"

namespace loraplex::model {

struct GenerateOptions {
  int32_t max_tokens = 64;
  SamplingParams sampling;
  bool ignore_eos = false;
  std::vector<std::string> stop;        // stop strings (not included in the text)
  std::vector<int32_t> stop_token_ids;  // extra stop ids (included in token_ids)
  const LoraWeightsView* adapter = nullptr;
  int32_t prefill_chunk = 512;  // prompt tokens per forward step
};

struct GeneratedToken {
  int32_t token_id = 0;
  float logprob = 0.0f;
  std::vector<TokenLogprob> top;
};

struct GenerateResult {
  std::vector<GeneratedToken> tokens;
  std::string text;
  std::string finish_reason;  // "stop", "length" or "eos"
  int32_t prompt_tokens = 0;
};

// INVALID_ARGUMENT for an empty prompt, ids outside the vocabulary, max_tokens < 1 or bad sampling
// parameters; RESOURCE_EXHAUSTED when prompt + max_tokens exceeds the context. `on_text` receives
// text deltas as they become final (never a split UTF-8 character, never part of a stop string).
absl::StatusOr<GenerateResult> Generate(
    LlamaModel& model, const std::vector<int32_t>& prompt, const GenerateOptions& options,
    const std::function<void(const std::string&)>& on_text = {});

}  // namespace loraplex::model
