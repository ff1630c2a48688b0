// What a caller hands the engine and what it gets back. No gRPC here: server/ maps its protos to
// these types.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "adapters/lora_mix.h"
#include "adapters/registry.h"
#include "model/llama_model.h"
#include "model/sampler.h"

namespace loraplex::engine {

// Unique per engine, increasing in submission order (older requests have smaller ids and keep
// priority when memory is short).
using RequestId = uint64_t;

// Bounds on a request's stop conditions: the engine thread checks them on every token, so that one
// request cannot slow the steps of all the others.
inline constexpr int kMaxStopStrings = 16;
inline constexpr size_t kMaxStopBytes = 256;

struct GenerationRequest {
  // The prompt as token ids (the server tokenizes text). Must be non-empty, ids < vocab size.
  std::vector<int32_t> prompt_ids;
  model::SamplingParams sampling;
  // Tokens to generate at most; >= 1, and prompt + max_tokens must fit the context length.
  int32_t max_tokens = 16;
  // Generation stops when the generated text contains one of these; the text from the match on is
  // not returned (the tokens are). At most kMaxStopStrings, each of 1 to kMaxStopBytes bytes.
  std::vector<std::string> stop;
  // Generation stops after one of these ids is sampled (its text is not returned). At most
  // kMaxStopStrings, each inside the vocabulary.
  std::vector<int32_t> stop_token_ids;
  // Keep going past the model's end-of-generation tokens (until max_tokens or a stop condition).
  bool ignore_eos = false;
  // The adapter's lease (adapters/registry.h), taken by the caller before submission; null for
  // the base model. The engine holds it for as long as the request runs, so the registry can
  // replace or unload the adapter at any time: a running request finishes on the version it
  // started with, and that version's weights go when the engine drops the request.
  std::shared_ptr<const adapters::Lease> adapter;
  // A weighted mix of adapters (adapters/lora_mix.h) instead of `adapter` (which is then null):
  // it holds its own copy of the weights.
  std::shared_ptr<const adapters::LoraMix> mix;
  // What makes two mixes compute the same K/V, for the prefix cache: the parts in order with their
  // versions and exact weights ("@mix:name@version*weight+..."); empty: never cached.
  std::string mix_identity;
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
// block on the engine (hand the output to another thread through a Queue, common/queue.h, or a gRPC
// write).
using OutputSink = std::function<void(StepOutput)>;

}  // namespace loraplex::engine
