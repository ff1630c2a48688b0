// Proto <-> engine mapping of generation requests and outputs, with the request validation of
// DESIGN.md section 5. No gRPC calls here, so it is tested without a server.
#pragma once

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "engine/request.h"
#include "loraplex/v1/inference.pb.h"
#include "model/tokenizer.h"
#include "server/adapter_table.h"

namespace loraplex::server {

// Without max_tokens a request generates up to the context length (and what the KV pool holds),
// at most this many tokens.
inline constexpr int32_t kDefaultMaxTokens = 256;
// Bounds on a request's stop conditions (the engine thread checks them on every token).
inline constexpr int kMaxStopStrings = 16;
inline constexpr size_t kMaxStopBytes = 256;

// Builds an engine request: tokenizes `prompt`, resolves the adapter, checks fields. Codes:
//   INVALID_ARGUMENT: both or neither of prompt / prompt_token_ids, an empty prompt, token ids
//     outside the vocabulary, temperature < 0 or not finite, top_k < 0, top_p outside (0, 1],
//     logprobs outside [0, 20], max_tokens present and < 1, a malformed adapter version, more
//     than kMaxStopStrings stop strings or stop_token_ids, a stop string empty or longer than
//     kMaxStopBytes;
//   NOT_FOUND: unknown adapter or version;
//   RESOURCE_EXHAUSTED: prompt or prompt + max_tokens past the context (from Engine::Validate).
absl::StatusOr<engine::GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& proto,
                                                              const engine::Engine& engine,
                                                              const AdapterTable& adapters);

// Appends one engine output to a response message (token ids, text, logprobs when asked, and on
// the final output finish_reason, usage and the adapter that served it).
void AppendOutput(const engine::StepOutput& out, const engine::GenerationRequest& request,
                  v1::GenerateResponse* response);

}  // namespace loraplex::server
