#include "server/openai_api.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace loraplex::server::openai {
namespace {

using json = nlohmann::json;

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("'", field, "' ", what));
}

// The field when present and not null, else nullptr.
const json* Field(const json& body, const char* name) {
  auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

absl::StatusOr<double> Number(const json& v, absl::string_view field) {
  if (!v.is_number()) return Invalid(field, "must be a number");
  const double d = v.get<double>();
  if (!std::isfinite(d)) return Invalid(field, "must be finite");
  return d;
}

absl::StatusOr<int64_t> Integer(const json& v, absl::string_view field) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) {
      return static_cast<int64_t>(d);
    }
  }
  return Invalid(field, "must be an integer");
}

absl::StatusOr<int32_t> Int32In(const json& v, absl::string_view field, int64_t lo, int64_t hi) {
  LP_ASSIGN_OR_RETURN(int64_t n, Integer(v, field));
  if (n < lo || n > hi) return Invalid(field, absl::StrCat("must be in [", lo, ", ", hi, "]"));
  return static_cast<int32_t>(n);
}

absl::StatusOr<bool> Bool(const json& v, absl::string_view field) {
  if (!v.is_boolean()) return Invalid(field, "must be true or false");
  return v.get<bool>();
}

// A token id list, or false when `v` is not an array of integers.
bool TokenIds(const json& v, v1::GenerateRequest* proto) {
  if (!v.is_array() || v.empty()) return false;
  for (const json& e : v) {
    if (!e.is_number_integer()) return false;
  }
  for (const json& e : v) {
    const int64_t id = e.get<int64_t>();
    // Out-of-range ids are the Inference service's to refuse; one int32 cannot hold stays out.
    const bool fits =
        id >= std::numeric_limits<int32_t>::min() && id <= std::numeric_limits<int32_t>::max();
    proto->add_prompt_token_ids(fits ? static_cast<int32_t>(id) : -1);
  }
  return true;
}

absl::Status ParsePrompt(const json& body, v1::GenerateRequest* proto) {
  const json* p = Field(body, "prompt");
  if (p == nullptr) return Invalid("prompt", "is required");
  if (p->is_string()) {
    proto->set_prompt(p->get<std::string>());
    return absl::OkStatus();
  }
  if (TokenIds(*p, proto)) return absl::OkStatus();
  if (p->is_array() && p->size() == 1) {
    const json& only = (*p)[0];
    if (only.is_string()) {
      proto->set_prompt(only.get<std::string>());
      return absl::OkStatus();
    }
    if (TokenIds(only, proto)) return absl::OkStatus();
  }
  if (p->is_array() && p->size() > 1 && ((*p)[0].is_string() || (*p)[0].is_array())) {
    return Invalid("prompt", "holds several prompts; send one prompt per request");
  }
  return Invalid("prompt", "must be a string, a list of token ids, or a list of one of those");
}

absl::Status ParseMessages(const json& body, v1::GenerateRequest* proto) {
  const json* m = Field(body, "messages");
  if (m == nullptr || !m->is_array() || m->empty()) {
    return Invalid("messages", "must be a non-empty list of messages");
  }
  for (size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string field = absl::StrCat("messages[", i, "]");
    if (!msg.is_object()) return Invalid(field, "must be an object");
    const json* role = Field(msg, "role");
    if (role == nullptr || !role->is_string()) return Invalid(field + ".role", "must be a string");
    v1::ChatMessage* out = proto->add_messages();
    // OpenAI's newer name for the system role.
    out->set_role(role->get<std::string>() == "developer" ? "system" : role->get<std::string>());
    const json* content = Field(msg, "content");
    if (content == nullptr) {
      return Invalid(field + ".content", "is required (tool calls are not served)");
    }
    if (content->is_string()) {
      out->set_content(content->get<std::string>());
      continue;
    }
    if (!content->is_array()) {
      return Invalid(field + ".content", "must be a string or a list of text parts");
    }
    std::string text;
    for (const json& part : *content) {
      const json* type = part.is_object() ? Field(part, "type") : nullptr;
      const json* t = part.is_object() ? Field(part, "text") : nullptr;
      if (type == nullptr || *type != "text" || t == nullptr || !t->is_string()) {
        return Invalid(field + ".content", "parts must be {\"type\": \"text\", \"text\": ...}");
      }
      text += t->get<std::string>();
    }
    out->set_content(std::move(text));
  }
  return absl::OkStatus();
}

absl::Status ParseStop(const json& body, v1::GenerateRequest* proto) {
  const json* stop = Field(body, "stop");
  if (stop == nullptr) return absl::OkStatus();
  if (stop->is_string()) {
    proto->add_stop(stop->get<std::string>());
    return absl::OkStatus();
  }
  if (!stop->is_array()) return Invalid("stop", "must be a string or a list of strings");
  for (const json& s : *stop) {
    if (!s.is_string()) return Invalid("stop", "must be a string or a list of strings");
    proto->add_stop(s.get<std::string>());
  }
  return absl::OkStatus();
}

// Fields whose non-default values would change the answer in ways not served.
absl::Status RefuseUnserved(Endpoint endpoint, const json& body) {
  for (const char* name : {"n", "best_of"}) {
    if (const json* v = Field(body, name)) {
      LP_ASSIGN_OR_RETURN(int64_t n, Integer(*v, name));
      if (n != 1) return Invalid(name, "must be 1: one choice per request is served");
    }
  }
  for (const char* name : {"presence_penalty", "frequency_penalty"}) {
    if (const json* v = Field(body, name)) {
      LP_ASSIGN_OR_RETURN(double d, Number(*v, name));
      if (d != 0) return Invalid(name, "is not supported (only 0)");
    }
  }
  if (const json* v = Field(body, "logit_bias"); v != nullptr && !v->empty()) {
    return Invalid("logit_bias", "is not supported");
  }
  if (endpoint == Endpoint::kCompletions) {
    if (const json* v = Field(body, "echo"); v != nullptr && *v != false) {
      return Invalid("echo", "is not supported");
    }
    if (const json* v = Field(body, "suffix"); v != nullptr && *v != "") {
      return Invalid("suffix", "is not supported");
    }
  } else {
    for (const char* name : {"tools", "functions"}) {
      if (const json* v = Field(body, name); v != nullptr && !v->empty()) {
        return Invalid(name, "is not supported: this server does not call tools");
      }
    }
    if (const json* v = Field(body, "tool_choice"); v != nullptr && *v != "none") {
      return Invalid("tool_choice", "is not supported: this server does not call tools");
    }
    if (const json* v = Field(body, "response_format")) {
      const json* type = v->is_object() ? Field(*v, "type") : nullptr;
      if (type == nullptr || *type != "text") {
        return Invalid("response_format", "is not supported (only {\"type\": \"text\"})");
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ParseLogprobs(Endpoint endpoint, const json& body, ParsedRequest* out) {
  const json* lp = Field(body, "logprobs");
  if (endpoint == Endpoint::kCompletions) {
    if (lp == nullptr) return absl::OkStatus();
    LP_ASSIGN_OR_RETURN(out->logprobs, Int32In(*lp, "logprobs", 0, 20));
  } else {
    bool on = false;
    if (lp != nullptr) {
      LP_ASSIGN_OR_RETURN(on, Bool(*lp, "logprobs"));
    }
    const json* top = Field(body, "top_logprobs");
    int32_t n = 0;
    if (top != nullptr) {
      LP_ASSIGN_OR_RETURN(n, Int32In(*top, "top_logprobs", 0, 20));
    }
    if (top != nullptr && !on) return Invalid("top_logprobs", "needs \"logprobs\": true");
    if (!on) return absl::OkStatus();
    out->logprobs = n;
  }
  out->proto.set_logprobs(std::max(1, out->logprobs));
  return absl::OkStatus();
}

absl::Status ParseSampling(Endpoint endpoint, const json& body, uint64_t seed,
                           v1::GenerateRequest* proto) {
  const json* max_tokens =
      endpoint == Endpoint::kChat ? Field(body, "max_completion_tokens") : nullptr;
  const char* max_name = max_tokens != nullptr ? "max_completion_tokens" : "max_tokens";
  if (max_tokens == nullptr) max_tokens = Field(body, "max_tokens");
  if (max_tokens != nullptr) {
    LP_ASSIGN_OR_RETURN(int32_t n,
                        Int32In(*max_tokens, max_name, 1, std::numeric_limits<int32_t>::max()));
    proto->set_max_tokens(n);
  }
  proto->set_temperature(1.0f);  // OpenAI's default
  if (const json* t = Field(body, "temperature")) {
    LP_ASSIGN_OR_RETURN(double d, Number(*t, "temperature"));
    if (d < 0) return Invalid("temperature", "must be >= 0");
    proto->set_temperature(static_cast<float>(d));
  }
  if (const json* p = Field(body, "top_p")) {
    LP_ASSIGN_OR_RETURN(double d, Number(*p, "top_p"));
    if (!(d > 0 && d <= 1)) return Invalid("top_p", "must be in (0, 1]");
    proto->set_top_p(static_cast<float>(d));
  }
  if (const json* k = Field(body, "top_k")) {  // vLLM: -1 or 0 = off
    LP_ASSIGN_OR_RETURN(int32_t n, Int32In(*k, "top_k", -1, std::numeric_limits<int32_t>::max()));
    proto->set_top_k(std::max(0, n));
  }
  proto->set_seed(seed);
  if (const json* s = Field(body, "seed")) {
    LP_ASSIGN_OR_RETURN(int64_t n, Integer(*s, "seed"));
    proto->set_seed(static_cast<uint64_t>(n));
  }
  if (const json* v = Field(body, "ignore_eos")) {
    LP_ASSIGN_OR_RETURN(bool b, Bool(*v, "ignore_eos"));
    proto->set_ignore_eos(b);
  }
  if (const json* ids = Field(body, "stop_token_ids")) {
    if (!ids->is_array()) return Invalid("stop_token_ids", "must be a list of token ids");
    for (const json& id : *ids) {
      LP_ASSIGN_OR_RETURN(int32_t n,
                          Int32In(id, "stop_token_ids", 0, std::numeric_limits<int32_t>::max()));
      proto->add_stop_token_ids(n);
    }
  }
  return ParseStop(body, proto);
}

std::string FinishReason(const std::string& ours) {
  // "eos" is OpenAI's "stop" (a natural end); "cancelled" never reaches a client that listens.
  return ours == "length" ? "length" : "stop";
}

std::string Fingerprint(const v1::GenerateResponse& r) {
  if (r.adapter().empty()) return "loraplex:base";
  return r.adapter_version() > 0 ? absl::StrCat("loraplex:", r.adapter(), "@", r.adapter_version())
                                 : absl::StrCat("loraplex:", r.adapter());
}

json Usage(const v1::GenerateResponse& r) {
  return {{"prompt_tokens", r.usage().prompt_tokens()},
          {"completion_tokens", r.usage().completion_tokens()},
          {"total_tokens", r.usage().prompt_tokens() + r.usage().completion_tokens()}};
}

json ByteList(const std::string& bytes) {
  json out = json::array();
  for (unsigned char c : bytes) out.push_back(static_cast<int>(c));
  return out;
}

// Completions' logprobs object: tokens, token_logprobs, top_logprobs, text_offset.
json CompletionLogprobs(const v1::GenerateResponse& r, int top, const TokenBytes& bytes,
                        int64_t* text_offset) {
  json tokens = json::array(), token_logprobs = json::array(), tops = json::array(),
       offsets = json::array();
  for (const v1::TokenLogprobs& t : r.logprobs()) {
    const std::string text = bytes(t.token_id());
    tokens.push_back(text);
    token_logprobs.push_back(t.logprob());
    json alternatives = json::object();
    for (int i = 0; i < std::min(top, t.top_size()); ++i) {
      alternatives[bytes(t.top(i).token_id())] = t.top(i).logprob();
    }
    tops.push_back(std::move(alternatives));
    offsets.push_back(*text_offset);
    *text_offset += static_cast<int64_t>(text.size());
  }
  return {{"tokens", std::move(tokens)},
          {"token_logprobs", std::move(token_logprobs)},
          {"top_logprobs", std::move(tops)},
          {"text_offset", std::move(offsets)}};
}

// Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}.
json ChatLogprobs(const v1::GenerateResponse& r, int top, const TokenBytes& bytes) {
  json content = json::array();
  for (const v1::TokenLogprobs& t : r.logprobs()) {
    const std::string text = bytes(t.token_id());
    json alternatives = json::array();
    for (int i = 0; i < std::min(top, t.top_size()); ++i) {
      const std::string alt = bytes(t.top(i).token_id());
      alternatives.push_back(
          {{"token", alt}, {"logprob", t.top(i).logprob()}, {"bytes", ByteList(alt)}});
    }
    content.push_back({{"token", text},
                       {"logprob", t.logprob()},
                       {"bytes", ByteList(text)},
                       {"top_logprobs", std::move(alternatives)}});
  }
  return {{"content", std::move(content)}};
}

json TokenIdList(const v1::GenerateResponse& r) {
  return json(std::vector<int32_t>(r.token_ids().begin(), r.token_ids().end()));
}

json Envelope(const ParsedRequest& request, const ResponseContext& context, const char* object) {
  return {{"id", context.id},
          {"object", object},
          {"created", context.created},
          {"model", request.model}};
}

}  // namespace

absl::StatusOr<ParsedRequest> ParseRequest(Endpoint endpoint, const json& body,
                                           const std::string& base_model, uint64_t seed) {
  if (!body.is_object())
    return absl::InvalidArgumentError("the request body must be a JSON object");
  ParsedRequest out;
  out.endpoint = endpoint;
  const json* model = Field(body, "model");
  if (model == nullptr || !model->is_string() || model->get<std::string>().empty()) {
    return Invalid("model", "is required: the base model's name or an adapter's");
  }
  out.model = model->get<std::string>();
  if (out.model != base_model) out.proto.set_adapter(out.model);
  LP_RETURN_IF_ERROR(RefuseUnserved(endpoint, body));
  LP_RETURN_IF_ERROR(endpoint == Endpoint::kChat ? ParseMessages(body, &out.proto)
                                                 : ParsePrompt(body, &out.proto));
  LP_RETURN_IF_ERROR(ParseSampling(endpoint, body, seed, &out.proto));
  LP_RETURN_IF_ERROR(ParseLogprobs(endpoint, body, &out));
  if (const json* s = Field(body, "stream")) {
    LP_ASSIGN_OR_RETURN(out.stream, Bool(*s, "stream"));
  }
  if (const json* opts = Field(body, "stream_options")) {
    if (!out.stream) return Invalid("stream_options", "is only allowed with \"stream\": true");
    if (!opts->is_object()) return Invalid("stream_options", "must be an object");
    if (const json* u = Field(*opts, "include_usage")) {
      LP_ASSIGN_OR_RETURN(out.include_usage, Bool(*u, "stream_options.include_usage"));
    }
  }
  return out;
}

json CompletionResponse(const ParsedRequest& request, const ResponseContext& context,
                        const v1::GenerateResponse& response) {
  const bool chat = request.endpoint == Endpoint::kChat;
  json choice = {{"index", 0}, {"finish_reason", FinishReason(response.finish_reason())}};
  json logprobs = nullptr;
  if (request.logprobs >= 0) {
    int64_t offset = 0;
    logprobs = chat ? ChatLogprobs(response, request.logprobs, *context.token_bytes)
                    : CompletionLogprobs(response, request.logprobs, *context.token_bytes, &offset);
  }
  if (chat) {
    choice["message"] = {{"role", "assistant"}, {"content", response.text()}};
  } else {
    choice["text"] = response.text();
  }
  choice["logprobs"] = std::move(logprobs);
  choice["token_ids"] = TokenIdList(response);
  json out = Envelope(request, context, chat ? "chat.completion" : "text_completion");
  out["system_fingerprint"] = Fingerprint(response);
  out["choices"] = json::array({std::move(choice)});
  out["usage"] = Usage(response);
  return out;
}

std::vector<json> ChunkWriter::Chunks(const v1::GenerateResponse& message) {
  const bool chat = request_.endpoint == Endpoint::kChat;
  const char* object = chat ? "chat.completion.chunk" : "text_completion";
  const bool last = !message.finish_reason().empty();
  std::vector<json> chunks;
  if (chat && !started_) {
    json role = Envelope(request_, context_, object);
    role["choices"] = json::array({{{"index", 0},
                                    {"delta", {{"role", "assistant"}, {"content", ""}}},
                                    {"logprobs", nullptr},
                                    {"finish_reason", nullptr}}});
    chunks.push_back(std::move(role));
  }
  started_ = true;
  json choice = {{"index", 0}};
  if (chat) {
    choice["delta"] =
        message.text().empty() && last ? json::object() : json{{"content", message.text()}};
  } else {
    choice["text"] = message.text();
  }
  json logprobs = nullptr;
  if (request_.logprobs >= 0) {
    logprobs =
        chat ? ChatLogprobs(message, request_.logprobs, *context_.token_bytes)
             : CompletionLogprobs(message, request_.logprobs, *context_.token_bytes, &text_offset_);
  }
  choice["logprobs"] = std::move(logprobs);
  choice["finish_reason"] = last ? json(FinishReason(message.finish_reason())) : json(nullptr);
  choice["token_ids"] = TokenIdList(message);
  json chunk = Envelope(request_, context_, object);
  if (last) chunk["system_fingerprint"] = Fingerprint(message);
  chunk["choices"] = json::array({std::move(choice)});
  chunks.push_back(std::move(chunk));
  if (last && request_.include_usage) {
    json usage = Envelope(request_, context_, object);
    usage["choices"] = json::array();
    usage["usage"] = Usage(message);
    chunks.push_back(std::move(usage));
  }
  return chunks;
}

json ModelList(const std::string& base_model, const std::vector<std::string>& adapters,
               int64_t created) {
  json data = json::array();
  data.push_back({{"id", base_model},
                  {"object", "model"},
                  {"created", created},
                  {"owned_by", "loraplex"},
                  {"root", base_model},
                  {"parent", nullptr}});
  for (const std::string& name : adapters) {
    data.push_back({{"id", name},
                    {"object", "model"},
                    {"created", created},
                    {"owned_by", "loraplex"},
                    {"root", name},
                    {"parent", base_model}});
  }
  return {{"object", "list"}, {"data", std::move(data)}};
}

namespace {

const char* ErrorType(int status) {
  switch (status) {
    case 401:
      return "authentication_error";
    case 403:
      return "permission_error";
    case 404:
      return "not_found_error";
    case 429:
      return "rate_limit_error";
    case 501:
      return "not_implemented_error";
    case 503:
      return "service_unavailable_error";
    default:
      return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

int HttpStatusOf(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kCancelled:
      return 499;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted:
      return 409;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnimplemented:
      return 501;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

std::string CodeName(absl::StatusCode code) {
  std::string name = absl::StatusCodeToString(code);  // "INVALID_ARGUMENT"
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

}  // namespace

HttpError MakeHttpError(int status, std::string message, std::string code) {
  HttpError e;
  e.status = status;
  e.body = {{"error",
             {{"message", std::move(message)},
              {"type", ErrorType(status)},
              {"param", nullptr},
              {"code", code.empty() ? json(nullptr) : json(std::move(code))}}}};
  return e;
}

HttpError ToHttpError(const absl::Status& status, bool inference) {
  const absl::StatusCode code = status.code();
  const absl::string_view message = status.message();
  // Engine::Validate's refusals of a request that can never fit (engine/engine.cc): the prompt
  // alone, prompt + max_tokens past the context, or more blocks than the whole pool. Only
  // "the request queue is full" and the adapter registry's limits are worth retrying.
  if (code == absl::StatusCode::kResourceExhausted &&
      (absl::StrContains(message, "context length") ||
       absl::StrContains(message, "but the whole pool has"))) {
    return MakeHttpError(400, std::string(message), "context_length_exceeded");
  }
  if (inference && code == absl::StatusCode::kNotFound) {
    return MakeHttpError(404, std::string(message), "model_not_found");
  }
  HttpError e = MakeHttpError(HttpStatusOf(code), std::string(message), CodeName(code));
  // The field a refusal names ("'temperature' must be ..." from ParseRequest).
  if (code == absl::StatusCode::kInvalidArgument && absl::StartsWith(message, "'")) {
    const size_t end = message.find('\'', 1);
    if (end != absl::string_view::npos) e.body["error"]["param"] = message.substr(1, end - 1);
  }
  return e;
}

std::string Dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace loraplex::server::openai
