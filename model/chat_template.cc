// Tokenizer::ApplyChatTemplate: the common chat formats, recognised from the model's Jinja source
// and rendered in C++ (no Jinja interpreter). Each renderer reproduces what HF transformers'
// apply_chat_template produces for the reference template named beside it; the fixtures in
// tests/fixtures/tokenizer/chat_templates.json hold those references.
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/tokenizer.h"

namespace loraplex::model {
namespace {

bool Contains(std::string_view s, std::string_view what) {
  return s.find(what) != std::string_view::npos;
}

// Jinja's `trim` / Python's str.strip() on the ASCII white space that chat content carries.
std::string Trim(std::string_view s) {
  constexpr std::string_view kWs = " \t\n\r\v\f";
  const size_t b = s.find_first_not_of(kWs);
  if (b == std::string_view::npos) return "";
  const size_t e = s.find_last_not_of(kWs);
  return std::string(s.substr(b, e - b + 1));
}

// The system prompt a ChatML template inserts when the conversation has none (SmolLM2:
// "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are ...
// <|im_end|>\n' }}"). Empty when the template has no such default.
std::string ChatMlDefaultSystem(std::string_view tpl) {
  if (!Contains(tpl, "messages[0]['role'] != 'system'") &&
      !Contains(tpl, "messages[0][\"role\"] != \"system\"")) {
    return "";
  }
  constexpr std::string_view kHead = "<|im_start|>system";
  size_t pos = tpl.find(kHead);
  if (pos == std::string_view::npos) return "";
  pos += kHead.size();
  // The newline is either a real one or the two characters "\n" inside a Jinja string literal.
  if (tpl.substr(pos, 1) == "\n") {
    pos += 1;
  } else if (tpl.substr(pos, 2) == "\\n") {
    pos += 2;
  } else {
    return "";
  }
  const size_t end = tpl.find("<|im_end|>", pos);
  if (end == std::string_view::npos) return "";
  std::string_view text = tpl.substr(pos, end - pos);
  // A computed prompt (string concatenation, expressions) is not a literal default.
  if (Contains(text, "{{") || Contains(text, "{%") || Contains(text, "'") || Contains(text, "\"") ||
      Contains(text, "\\")) {
    return "";
  }
  return std::string(text);
}

std::string RenderChatMl(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                         const std::string& default_system) {
  std::string out;
  if (!messages.empty() && messages[0].role != "system" && !default_system.empty()) {
    absl::StrAppend(&out, "<|im_start|>system\n", default_system, "<|im_end|>\n");
  }
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

// Meta's Llama 3 (3.0) template: BOS, then per message a header, the trimmed content and
// <|eot_id|>.
std::string RenderLlama3(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                         const std::string& bos) {
  std::string out = messages.empty() ? "" : bos;  // the template adds BOS to the first message
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n", Trim(m.content),
                    "<|eot_id|>");
  }
  if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

// Roles after an optional leading system message must go user, assistant, user, ...
absl::Status CheckAlternation(const std::vector<ChatMessage>& messages, size_t first) {
  for (size_t i = first; i < messages.size(); ++i) {
    const bool want_user = (i - first) % 2 == 0;
    if ((messages[i].role == "user") != want_user ||
        (!want_user && messages[i].role != "assistant")) {
      return absl::InvalidArgumentError(
          absl::StrCat("chat template: message ", i, " has role '", messages[i].role,
                       "'; roles must alternate user/assistant/user/assistant/..."));
    }
  }
  return absl::OkStatus();
}

// Meta's Llama 2 chat template: the system prompt goes inside the first [INST] in <<SYS>> tags;
// every user turn starts with BOS and every assistant turn ends with EOS.
absl::StatusOr<std::string> RenderLlama2(const std::vector<ChatMessage>& messages,
                                         const std::string& bos, const std::string& eos) {
  // The template reads messages[0] unconditionally, so an empty conversation is an error there.
  if (messages.empty()) return absl::InvalidArgumentError("chat template: no messages");
  const bool has_system = messages[0].role == "system";
  const size_t first = has_system ? 1 : 0;
  absl::Status s = CheckAlternation(messages, first);
  if (!s.ok()) return s;
  std::string out;
  for (size_t i = first; i < messages.size(); ++i) {
    std::string content = messages[i].content;
    if (i == first && has_system) {
      content = absl::StrCat("<<SYS>>\n", messages[0].content, "\n<</SYS>>\n\n", content);
    }
    if (messages[i].role == "user") {
      absl::StrAppend(&out, bos, "[INST] ", Trim(content), " [/INST]");
    } else {
      absl::StrAppend(&out, " ", Trim(content), " ", eos);
    }
  }
  return out;
}

// Mistral-7B-Instruct-v0.1's template: one BOS, [INST] around user turns, EOS after assistant
// turns; no system role.
absl::StatusOr<std::string> RenderMistral(const std::vector<ChatMessage>& messages,
                                          const std::string& bos, const std::string& eos) {
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i].role != "user" && messages[i].role != "assistant") {
      return absl::InvalidArgumentError(
          absl::StrCat("chat template: message ", i, " has role '", messages[i].role,
                       "'; only user and assistant roles are supported"));
    }
  }
  absl::Status s = CheckAlternation(messages, 0);
  if (!s.ok()) return s;
  std::string out = bos;
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      absl::StrAppend(&out, "[INST] ", m.content, " [/INST]");
    } else {
      absl::StrAppend(&out, m.content, eos);
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::string> Tokenizer::ApplyChatTemplate(const std::vector<ChatMessage>& messages,
                                                         bool add_generation_prompt) const {
  const std::string& tpl = spec_.chat_template;
  const std::string bos = spec_.bos_id >= 0 ? spec_.tokens[spec_.bos_id] : "";
  const std::string eos = spec_.eos_id >= 0 ? spec_.tokens[spec_.eos_id] : "";
  if (tpl.empty()) return RenderChatMl(messages, add_generation_prompt, "");
  if (Contains(tpl, "<|im_start|>")) {
    return RenderChatMl(messages, add_generation_prompt, ChatMlDefaultSystem(tpl));
  }
  if (Contains(tpl, "<|start_header_id|>")) {
    // Llama 3.1+ templates add tool calls and a dated system prompt: not this renderer.
    if (Contains(tpl, "Cutting Knowledge Date")) {
      return absl::UnimplementedError(
          "chat template: Llama 3.1-style template (tools, knowledge date) is not supported");
    }
    return RenderLlama3(messages, add_generation_prompt, bos);
  }
  if (Contains(tpl, "[INST]")) {
    if (Contains(tpl, "<<SYS>>")) return RenderLlama2(messages, bos, eos);
    return RenderMistral(messages, bos, eos);
  }
  return absl::UnimplementedError(absl::StrCat(
      "chat template not recognised (supported: ChatML, Llama 3, Llama 2, Mistral [INST]): ",
      tpl.substr(0, 120)));
}

}  // namespace loraplex::model
