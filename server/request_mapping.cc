#include "server/request_mapping.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace loraplex::server {

absl::StatusOr<engine::GenerationRequest> ToGenerationRequest(const v1::GenerateRequest& proto,
                                                              const engine::Engine& engine) {
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
  if (has_ids) {
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
  }

  req.sampling.temperature = proto.temperature();
  req.sampling.top_k = proto.top_k();
  req.sampling.top_p = proto.has_top_p() ? proto.top_p() : 1.0f;
  req.sampling.seed = proto.seed();
  req.sampling.logprobs = proto.logprobs();

  const int64_t context = model.config().max_position_embeddings;
  const int64_t prompt = static_cast<int64_t>(req.prompt_ids.size());
  if (proto.has_max_tokens()) {
    req.max_tokens = proto.max_tokens();
  } else {
    // As much as the context and the whole KV pool leave room for, at most the default; a prompt
    // that leaves no room at all is reported by Engine::Validate.
    const int64_t pool = engine.kv_blocks_total() * engine.options().kv_block_size;
    req.max_tokens = static_cast<int32_t>(
        std::clamp<int64_t>(std::min(context, pool) - prompt, 1, kDefaultMaxTokens));
  }
  req.stop.assign(proto.stop().begin(), proto.stop().end());
  req.stop_token_ids.assign(proto.stop_token_ids().begin(), proto.stop_token_ids().end());
  req.ignore_eos = proto.ignore_eos();

  LP_RETURN_IF_ERROR(engine.Validate(req));
  return req;
}

void AppendOutput(const engine::StepOutput& out, const OutputContext& request,
                  v1::GenerateResponse* response) {
  for (const engine::GeneratedToken& t : out.tokens) {
    response->add_token_ids(t.token_id);
    if (request.logprobs > 0) {
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
    if (!request.adapter.empty()) {
      response->set_adapter(request.adapter);
      response->set_adapter_version(request.adapter_version);
    }
  }
}

}  // namespace loraplex::server
