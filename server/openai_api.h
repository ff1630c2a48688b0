// The OpenAI API's JSON shapes (POST /v1/completions and /v1/chat/completions, their server-sent
// event chunks, GET /v1/models and the error object) mapped to and from the loraplex.v1 protos.
// Pure functions without I/O, so they are tested without a server; server/http_front.h serves
// them.
//
// Requests: `model` is the base model's served name or an adapter ("name" or "name@version");
// `prompt` is a string, token ids, or a list of one of those (one prompt per request);
// `messages` hold string content or lists of text parts; max_tokens (chat: also
// max_completion_tokens), temperature (default 1, as OpenAI), top_p, seed (absent: a random one),
// stop, logprobs / top_logprobs, stream and stream_options.include_usage; vLLM's extensions
// top_k, ignore_eos and stop_token_ids too. Fields that would change the answer but are not
// served (n or best_of above 1, echo, suffix, penalties, logit_bias, tools, response_format other
// than text) are refused with INVALID_ARGUMENT naming the field, never ignored; other unknown
// fields are ignored (as vLLM does).
//
// Responses follow OpenAI's shapes, plus on each choice `token_ids` (the generated ids, as vLLM
// returns them) and `system_fingerprint` = "loraplex:<adapter>@<version>" ("loraplex:base" for the
// base model) naming what served the request.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "loraplex/v1/inference.pb.h"
#include "nlohmann/json.hpp"

namespace loraplex::server::openai {

enum class Endpoint { kCompletions, kChat };

struct ParsedRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  v1::GenerateRequest proto;  // what the Inference service is called with
  std::string model;          // as the client named it; echoed in every response
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a last chunk with usage
  // Log-probabilities to return: -1 none; otherwise the chosen token's and this many
  // alternatives (0-20). proto.logprobs is max(1, this) so that the engine computes them.
  int logprobs = -1;
};

// Parses a request body. `base_model` is the name that selects the base model; `seed` is used
// when the request gives none. INVALID_ARGUMENT with the field's name for a malformed or refused
// field.
absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, const nlohmann::json& body,
                                           const std::string& base_model, uint64_t seed);

// The raw bytes one token id stands for (may be part of a UTF-8 character).
using TokenBytes = std::function<std::string(int32_t id)>;

// What every response and chunk of one request shares.
struct ResponseContext {
  std::string id;       // "cmpl-..." or "chatcmpl-..."
  int64_t created = 0;  // Unix seconds
  const TokenBytes* token_bytes = nullptr;
};

// The non-streaming response from the Complete RPC's answer.
nlohmann::json CompletionResponse(const ParsedRequest& request, const ResponseContext& context,
                                  const v1::GenerateResponse& response);

// Streaming: the chunks of one request, fed every Generate message in order.
class ChunkWriter {
 public:
  ChunkWriter(const ParsedRequest& request, ResponseContext context)
      : request_(request), context_(std::move(context)) {}
  // The chunks (JSON objects) this message becomes: chat's first message is preceded by the
  // assistant-role delta; the last message adds the usage chunk when include_usage was asked.
  std::vector<nlohmann::json> Chunks(const v1::GenerateResponse& message);

 private:
  const ParsedRequest& request_;
  ResponseContext context_;
  bool started_ = false;
  int64_t text_offset_ = 0;  // completions' logprobs.text_offset so far
};

// GET /v1/models: the base model first, then every adapter name given.
nlohmann::json ModelList(const std::string& base_model, const std::vector<std::string>& adapters,
                         int64_t created);

// An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, and its HTTP
// status. gRPC codes map as grpc-gateway maps them (INVALID_ARGUMENT 400, NOT_FOUND 404,
// RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, ...), except a prompt that cannot fit the context or
// the KV pool, which is a 400 with code "context_length_exceeded" as in OpenAI's API; NOT_FOUND
// on an inference call gets code "model_not_found".
struct HttpError {
  int status = 500;
  nlohmann::json body;
};
HttpError ToHttpError(const absl::Status& status, bool inference = false);
// An error the HTTP layer finds itself (bad JSON, unknown route, body too large).
HttpError MakeHttpError(int status, std::string message, std::string code = "");

// JSON text for the wire: invalid UTF-8 (a token that ends inside a character) is replaced by
// U+FFFD instead of throwing.
std::string Dump(const nlohmann::json& value);

}  // namespace loraplex::server::openai
