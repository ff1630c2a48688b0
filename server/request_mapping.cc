#include "server/request_mapping.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace loraplex::server {

absl::StatusOr<engine::GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& proto,
                                                              const engine::Engine& engine,
                                                              const AdapterTable& adapters) {
  const model::LlamaModel& model = engine.model();
  const model::Tokenizer& tokenizer = model.tokenizer();
  engine::GenerationRequest req;

  const bool has_text = proto.has_prompt();
  const bool has_ids = proto.prompt_token_ids_size() > 0;
  const bool has_messages = proto.messages_size() > 0;
  const int forms = int{has_text} + int{has_ids} + int{has_messages};
  if (forms != 1) {
    return absl::InvalidArgumentError(
        forms > 1 ? "give only one of prompt, prompt_token_ids and messages"
                  : "give a prompt: prompt (text), prompt_token_ids or messages");
  }
  const int64_t vocab = model.config().vocab_size;
  if (has_ids) {
    for (int i = 0; i < proto.prompt_token_ids_size(); ++i) {
      const int32_t id = proto.prompt_token_ids(i);
      if (id < 0 || id >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat(
            "prompt_token_ids[", i, "] = ", id, " is outside the vocabulary [0, ", vocab, ")"));
      }
    }
    req.prompt_ids.assign(proto.prompt_token_ids().begin(), proto.prompt_token_ids().end());
  } else if (has_messages) {
    std::vector<model::ChatMessage> messages;
    for (const auto& m : proto.messages()) {
      if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
        return absl::InvalidArgumentError(
            absl::StrCat("messages: role '", m.role(), "' is not one of system, user, assistant"));
      }
      messages.push_back({m.role(), m.content()});
    }
    LP_ASSIGN_OR_RETURN(std::string text,
                        tokenizer.ApplyChatTemplate(messages, /*add_generation_prompt=*/true));
    req.prompt_ids = tokenizer.Encode(text, /*add_bos=*/tokenizer.spec().add_bos);
  } else {
    req.prompt_ids = tokenizer.Encode(proto.prompt(), /*add_bos=*/tokenizer.spec().add_bos);
    if (req.prompt_ids.empty()) {
      return absl::InvalidArgumentError(
          "prompt is empty and this model adds no BOS token: give some text");
    }
  }

  if (!std::isfinite(proto.temperature()) || proto.temperature() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be >= 0 (0 = greedy), got ", proto.temperature()));
  }
  if (proto.top_k() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be >= 0 (0 = off), got ", proto.top_k()));
  }
  if (proto.has_top_p() && !(proto.top_p() > 0.0f && proto.top_p() <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", proto.top_p()));
  }
  if (proto.logprobs() < 0 || proto.logprobs() > 20) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs must be in [0, 20], got ", proto.logprobs()));
  }
  req.sampling.temperature = proto.temperature();
  req.sampling.top_k = proto.top_k();
  req.sampling.top_p = proto.has_top_p() ? proto.top_p() : 1.0f;
  req.sampling.seed = proto.seed();
  req.sampling.logprobs = proto.logprobs();

  const int64_t context = model.config().max_position_embeddings;
  const int64_t prompt = static_cast<int64_t>(req.prompt_ids.size());
  if (proto.has_max_tokens()) {
    if (proto.max_tokens() < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("max_tokens must be at least 1, got ", proto.max_tokens()));
    }
    req.max_tokens = proto.max_tokens();
  } else {
    // As much as the context and the whole KV pool leave room for, at most the default; a prompt
    // that leaves no room at all is reported by Engine::Validate.
    const int64_t pool = engine.kv_blocks_total() * engine.options().kv_block_size;
    req.max_tokens = static_cast<int32_t>(
        std::clamp<int64_t>(std::min(context, pool) - prompt, 1, kDefaultMaxTokens));
  }
  // The engine thread matches every stop string against every new token's text: bounded, so
  // that one request cannot slow the steps of all the others.
  if (proto.stop_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", kMaxStopStrings, " stop strings, got ", proto.stop_size()));
  }
  for (int i = 0; i < proto.stop_size(); ++i) {
    if (proto.stop(i).empty() || proto.stop(i).size() > kMaxStopBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] must have 1 to ", kMaxStopBytes,
                                                     " bytes, got ", proto.stop(i).size()));
    }
  }
  if (proto.stop_token_ids_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "at most ", kMaxStopStrings, " stop_token_ids, got ", proto.stop_token_ids_size()));
  }
  req.stop.assign(proto.stop().begin(), proto.stop().end());
  req.stop_token_ids.assign(proto.stop_token_ids().begin(), proto.stop_token_ids().end());
  req.ignore_eos = proto.ignore_eos();

  LP_ASSIGN_OR_RETURN(req.adapter, adapters.Resolve(proto.adapter()));
  LP_RETURN_IF_ERROR(engine.Validate(req));
  return req;
}

void AppendOutput(const engine::StepOutput& out, const engine::GenerationRequest& request,
                  v1::GenerateResponse* response) {
  for (const engine::GeneratedToken& t : out.tokens) {
    response->add_token_ids(t.token_id);
    if (request.sampling.logprobs > 0) {
      v1::TokenLogprobs* lp = response->add_logprobs();
      lp->set_token_id(t.token_id);
      lp->set_logprob(t.logprob);
      for (const model::TokenLogprob& alt : t.top) {
        v1::TokenLogprob* a = lp->add_top();
        a->set_token_id(alt.token_id);
        a->set_logprob(alt.logprob);
      }
    }
  }
  response->mutable_text()->append(out.text);
  if (out.finished) {
    response->set_finish_reason(engine::FinishReasonName(out.finish_reason));
    response->mutable_usage()->set_prompt_tokens(out.prompt_tokens);
    response->mutable_usage()->set_completion_tokens(out.completion_tokens);
    if (request.adapter != nullptr) {
      response->set_adapter(request.adapter->name);
      response->set_adapter_version(request.adapter->version);
    }
  }
}

}  // namespace loraplex::server
