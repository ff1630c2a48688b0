// Proto <-> engine mapping of generation requests and outputs. No gRPC calls here, so it is tested
// without a server.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "engine/request.h"
#include "loraplex/v1/inference.pb.h"
#include "model/tokenizer.h"

namespace loraplex::server {

// Without max_tokens a request generates up to the context length (and what the KV pool holds),
// at most this many tokens.
inline constexpr int32_t kDefaultMaxTokens = 256;

// Builds an engine request from the proto's shape: tokenizes `prompt` (or renders `messages`
// with the chat template), fills the defaults (top_p 1, max_tokens as above), then runs
// Engine::Validate, which owns every rule on the values, so that a bad request never causes an
// adapter reload. The adapter is not resolved here (the caller takes the registry's lease). Codes:
//   INVALID_ARGUMENT: both or neither of prompt / prompt_token_ids / messages, a role other than
//     system, user, assistant, a chat template error; and Engine::Validate's;
//   RESOURCE_EXHAUSTED: Engine::Validate's (the context or the KV pool).
absl::StatusOr<engine::GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& proto,
                                                              const engine::Engine& engine);

// What the response of a request needs of it once it runs: kept by the call without the
// request's prompt or lease (so the lease goes back to the registry when the engine is done).
struct OutputContext {
  int32_t logprobs = 0;         // alternatives per token (the request's sampling.logprobs)
  std::string adapter;          // empty: the base model
  int64_t adapter_version = 0;  // of `adapter`
};

// Appends one engine output to a response message (token ids, text, logprobs when asked, and on
// the final output finish_reason, usage and the adapter that served it).
void AppendOutput(const engine::StepOutput& out, const OutputContext& request,
                  v1::GenerateResponse* response);

}  // namespace loraplex::server
