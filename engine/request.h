// What a caller hands the engine and what it gets back. No gRPC here: server/ maps its protos to
// these types.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "model/llama_model.h"
#include "model/sampler.h"

namespace loraplex::engine {

// Unique per engine, increasing in submission order (older requests have smaller ids and keep
// priority when memory is short).
using RequestId = uint64_t;

// An adapter resolved by the caller (the server, later the adapter registry) before submission.
// The engine holds a shared_ptr to it for as long as the request runs, so a registry can replace
// or unload the adapter at any time: requests already running finish on the version they started
// with, and the weights are released when the last handle goes.
struct AdapterHandle {
  std::string name;
  int64_t version = 0;
  const model::LoraWeightsView* weights = nullptr;  // owned by `owner`
  std::shared_ptr<const void> owner;                // keeps `weights` alive
};

struct GenerationRequest {
  // The prompt as token ids (the server tokenizes text). Must be non-empty, ids < vocab size.
  std::vector<int32_t> prompt_ids;
  model::SamplingParams sampling;
  // Tokens to generate at most; >= 1, and prompt + max_tokens must fit the context length.
  int32_t max_tokens = 16;
  // Generation stops when the generated text contains one of these; the text from the match on is
  // not returned (the tokens are).
  std::vector<std::string> stop;
  // Generation stops after one of these ids is sampled (its text is not returned).
  std::vector<int32_t> stop_token_ids;
  // Keep going past the model's end-of-generation tokens (until max_tokens or a stop condition).
  bool ignore_eos = false;
  // Null for the base model.
  std::shared_ptr<const AdapterHandle> adapter;
};

enum class FinishReason { kNone, kStop, kLength, kEos, kCancelled, kError };
// "", "stop", "length", "eos", "cancelled", "error".
const char* FinishReasonName(FinishReason reason);

struct GeneratedToken {
  int32_t token_id = 0;
  float logprob = 0.0f;                  // filled when sampling.logprobs > 0
  std::vector<model::TokenLogprob> top;  // sampling.logprobs entries, best first
};

// One message from the engine about one request: new tokens and text, and on the last message the
// reason it ended. Exactly one message per request has finished = true, and none follow it.
struct StepOutput {
  RequestId id = 0;
  std::vector<GeneratedToken> tokens;  // new since the previous message (may be empty at the end)
  std::string text;                    // new text; never splits a UTF-8 character
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  absl::Status status;  // not OK only with kError (a bug, reported as INTERNAL)
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;  // generated so far
};

// Called on the engine thread for every StepOutput of a request. It must return quickly and never
// block on the engine (hand the output to another thread through engine::Queue or a gRPC write).
using OutputSink = std::function<void(StepOutput)>;

}  // namespace loraplex::engine
