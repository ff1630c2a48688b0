// Fuzzes the chat templates (Tokenizer::ApplyChatTemplate, model/chat_template.cc): template
// source, roles and contents are all attacker-shaped (the template comes from a model file, the
// messages from GenerateRequest.messages).
//
// Input: a flags byte, then records separated by 0x1E: the template source, then one record per
// message, "role 0x1F content". Flags: bit 0 add_generation_prompt, bit 1 the vocabulary has a
// BOS, bit 2 an EOS, bits 3-4 which tokenizer renders: 0 a small SentencePiece vocabulary with the
// fuzzed template, 1 SmolLM2 (its own ChatML template), 2 stories260K (no template: ChatML).
// Invariants: only OK, INVALID_ARGUMENT or UNIMPLEMENTED; a ChatML rendering holds every content
// and ends with the assistant header when asked; and, encoded, every <|im_start|>/<|im_end|> the
// template wrote is still a special token (content cannot fuse with the markers around it).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "formats/gguf.h"
#include "fuzz/fuzz_util.h"
#include "model/tokenizer.h"

namespace {

using loraplex::model::ChatMessage;
using loraplex::model::Tokenizer;
using loraplex::model::TokenizerSpec;

constexpr std::string_view kImStart = "<|im_start|>";
constexpr std::string_view kImEnd = "<|im_end|>";

struct Fixed {
  std::unique_ptr<Tokenizer> smollm2;
  std::unique_ptr<Tokenizer> stories;
};

const Fixed& GetFixed() {
  static const Fixed* f = [] {
    auto* out = new Fixed();
    auto bpe = Tokenizer::FromHfDir(loraplex::fuzz::RequireFile(
        loraplex::fuzz::RepoRoot() + "/tests/fixtures/tokenizer/smollm2"));
    LP_FUZZ_CHECK_OK(bpe.status());
    out->smollm2 = *std::move(bpe);
    auto gguf = loraplex::formats::GgufFile::Open(
        loraplex::fuzz::RequireFile(loraplex::fuzz::Stories260KDir() + "/stories260K.gguf"));
    LP_FUZZ_CHECK_OK(gguf.status());
    auto spm = Tokenizer::FromGguf(**gguf);
    LP_FUZZ_CHECK_OK(spm.status());
    out->stories = *std::move(spm);
    return out;
  }();
  return *f;
}

// 256 byte tokens, <unk>, and the control tokens of the supported templates.
std::unique_ptr<Tokenizer> SmallTokenizer(std::string tpl, bool bos, bool eos) {
  TokenizerSpec spec;
  spec.kind = TokenizerSpec::Kind::kSentencePiece;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    spec.tokens.push_back(name);
    spec.token_types.push_back(TokenizerSpec::kByte);
  }
  spec.unk_id = static_cast<int32_t>(spec.tokens.size());
  spec.tokens.push_back("<unk>");
  spec.token_types.push_back(TokenizerSpec::kUnknown);
  for (const char* special : {"<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                              "<|end_header_id|>", "<|eot_id|>"}) {
    spec.tokens.push_back(special);
    spec.token_types.push_back(TokenizerSpec::kControl);
  }
  spec.tokens.push_back("\xE2\x96\x81");  // "▁"
  spec.token_types.push_back(TokenizerSpec::kNormal);
  if (bos) spec.bos_id = spec.unk_id + 1;
  if (eos) spec.eos_id = spec.unk_id + 2;
  spec.add_bos = bos;
  spec.chat_template = std::move(tpl);
  auto tok = Tokenizer::Create(std::move(spec));
  LP_FUZZ_CHECK_OK(tok.status());
  return *std::move(tok);
}

size_t Count(std::string_view s, std::string_view what) {
  size_t n = 0;
  for (size_t pos = s.find(what); pos != std::string_view::npos; pos = s.find(what, pos + 1)) ++n;
  return n;
}

std::vector<std::string_view> Split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i) {
    if (i == s.size() || s[i] == sep) {
      out.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixed& fixed = GetFixed();
  if (size == 0) return 0;
  const uint8_t flags = data[0];
  const bool add_generation_prompt = flags & 1;
  const std::vector<std::string_view> records =
      Split(std::string_view(reinterpret_cast<const char*>(data) + 1, size - 1), '\x1E');
  std::vector<ChatMessage> messages;
  for (size_t i = 1; i < records.size(); ++i) {
    const size_t sep = records[i].find('\x1F');
    if (sep == std::string_view::npos) {
      messages.push_back({std::string(records[i]), ""});
    } else {
      messages.push_back(
          {std::string(records[i].substr(0, sep)), std::string(records[i].substr(sep + 1))});
    }
  }

  std::unique_ptr<Tokenizer> small;
  const Tokenizer* tok;
  switch ((flags >> 3) & 3) {
    case 1:
      tok = fixed.smollm2.get();
      break;
    case 2:
      tok = fixed.stories.get();
      break;
    default:
      small = SmallTokenizer(std::string(records[0]), flags & 2, flags & 4);
      tok = small.get();
  }
  auto text = tok->ApplyChatTemplate(messages, add_generation_prompt);
  if (!text.ok()) {
    const absl::StatusCode code = text.status().code();
    LP_FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument ||
                  code == absl::StatusCode::kUnimplemented);
    return 0;
  }
  const std::string& tpl = tok->spec().chat_template;
  const std::vector<int32_t> ids = tok->Encode(*text, /*add_bos=*/tok->spec().add_bos);
  for (int32_t id : ids) LP_FUZZ_CHECK(id >= 0 && id < tok->vocab_size());
  if (!tpl.empty() && tpl.find(kImStart) == std::string::npos) return 0;

  // ChatML: every content verbatim, the generation header at the end when asked.
  for (const ChatMessage& m : messages) LP_FUZZ_CHECK(text->find(m.content) != std::string::npos);
  if (add_generation_prompt) {
    constexpr std::string_view kHeader = "<|im_start|>assistant\n";
    LP_FUZZ_CHECK(text->size() >= kHeader.size() &&
                  text->compare(text->size() - kHeader.size(), kHeader.size(), kHeader) == 0);
  }
  // The markers the template wrote, one pair per message (plus a default system prompt and the
  // generation header), must survive encoding as their special ids whatever the contents hold.
  const int32_t start_id = tok->PieceToId(kImStart), end_id = tok->PieceToId(kImEnd);
  if (start_id < 0 || end_id < 0) return 0;
  size_t starts = 0, ends = 0, content_starts = 0, content_ends = 0;
  for (int32_t id : ids) {
    starts += id == start_id;
    ends += id == end_id;
  }
  for (const ChatMessage& m : messages) {
    content_starts += Count(m.role, kImStart) + Count(m.content, kImStart);
    content_ends += Count(m.role, kImEnd) + Count(m.content, kImEnd);
  }
  const bool default_system =
      Count(*text, kImStart) > messages.size() + add_generation_prompt + content_starts;
  LP_FUZZ_CHECK(starts >= messages.size() + add_generation_prompt + default_system);
  LP_FUZZ_CHECK(ends >= messages.size() + default_system);
  (void)content_ends;
  return 0;
}
