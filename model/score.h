// Scoring a text with the model: the mean negative log-likelihood of its tokens and the
// perplexity, computed the way llama.cpp's `llama-perplexity` computes it, so the two can be set
// side by side on the same GGUF file and text (scripts/bench-vs-llamacpp.sh).
//
// The tokens are cut into chunks of `context` tokens (a remainder shorter than a chunk is dropped);
// in each chunk the first token is replaced by BOS when the tokenizer adds one, the chunk runs as
// one prefill, and the tokens of its second half are scored: the logits at position j predict
// token j + 1 for j in [context / 2, context - 1). So every scored token has at least context / 2
// tokens before it.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/llama_model.h"

namespace loraplex::model {

struct ScoreResult {
  int64_t chunks = 0;
  int64_t scored_tokens = 0;
  double mean_nll = 0;    // nats per scored token
  double perplexity = 0;  // exp(mean_nll)
};

// INVALID_ARGUMENT when `context` is < 4 or past the model's context length, or `tokens` holds
// fewer than `context` tokens, or an id is outside the vocabulary. `adapter` may be null.
absl::StatusOr<ScoreResult> ScoreTokens(LlamaModel& model, const std::vector<int32_t>& tokens,
                                        int64_t context, const LoraWeightsView* adapter = nullptr);

}  // namespace loraplex::model
