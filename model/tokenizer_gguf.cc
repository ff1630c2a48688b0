// Tokenizer::FromGguf: the tokenizer.ggml.* metadata of a GGUF file, read as llama.cpp reads it.
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "formats/gguf.h"
#include "model/tokenizer.h"
#include "model/tokenizer_internal.h"

namespace loraplex::model {
namespace {

// Optional id: absent, or the 0xFFFFFFFF "none" that converters write, gives -1.
absl::StatusOr<int32_t> OptionalId(const formats::GgufFile& gguf, const std::string& key) {
  if (gguf.FindMetadata(key) == nullptr) return -1;
  LP_ASSIGN_OR_RETURN(int64_t v, gguf.GetInt(key));
  if (v == 0xFFFFFFFFll || v == -1) return -1;
  if (v < 0 || v > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(key, " = ", v, " is not a token id"));
  }
  return static_cast<int32_t>(v);
}

absl::StatusOr<bool> OptionalBool(const formats::GgufFile& gguf, const std::string& key,
                                  bool fallback) {
  const formats::GgufValue* v = gguf.FindMetadata(key);
  if (v == nullptr) return fallback;
  if (const bool* b = std::get_if<bool>(&v->v)) return *b;
  return absl::InvalidArgumentError(absl::StrCat(key, " is not a bool"));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const formats::GgufFile& gguf) {
  TokenizerSpec spec;
  LP_ASSIGN_OR_RETURN(const std::string model, gguf.GetString("tokenizer.ggml.model"));
  if (model == "llama") {
    spec.kind = TokenizerSpec::Kind::kSentencePiece;
  } else if (model == "gpt2") {
    spec.kind = TokenizerSpec::Kind::kByteLevelBpe;
  } else {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer.ggml.model '", model, "' (supported: llama, gpt2)"));
  }
  const bool spm = spec.kind == TokenizerSpec::Kind::kSentencePiece;
  LP_ASSIGN_OR_RETURN(spec.tokens, gguf.GetStringArray("tokenizer.ggml.tokens"));
  if (gguf.FindMetadata("tokenizer.ggml.scores") != nullptr || spm) {
    LP_ASSIGN_OR_RETURN(spec.scores, gguf.GetFloatArray("tokenizer.ggml.scores"));
  }
  if (gguf.FindMetadata("tokenizer.ggml.token_type") != nullptr) {
    LP_ASSIGN_OR_RETURN(std::vector<int64_t> types, gguf.GetIntArray("tokenizer.ggml.token_type"));
    spec.token_types.reserve(types.size());
    for (size_t i = 0; i < types.size(); ++i) {
      if (types[i] < TokenizerSpec::kNormal || types[i] > TokenizerSpec::kByte) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.ggml.token_type[", i, "] = ", types[i], " is not a type"));
      }
      spec.token_types.push_back(static_cast<int32_t>(types[i]));
    }
  }
  if (!spm) {
    LP_ASSIGN_OR_RETURN(spec.merges, gguf.GetStringArray("tokenizer.ggml.merges"));
    if (gguf.FindMetadata("tokenizer.ggml.pre") != nullptr) {
      LP_ASSIGN_OR_RETURN(spec.pre, gguf.GetString("tokenizer.ggml.pre"));
    } else {
      spec.pre = "gpt2";
    }
    spec.ignore_merges = spec.pre == "llama3" || spec.pre == "llama-bpe";
  }
  LP_ASSIGN_OR_RETURN(spec.bos_id, OptionalId(gguf, "tokenizer.ggml.bos_token_id"));
  LP_ASSIGN_OR_RETURN(spec.eos_id, OptionalId(gguf, "tokenizer.ggml.eos_token_id"));
  LP_ASSIGN_OR_RETURN(spec.unk_id, OptionalId(gguf, "tokenizer.ggml.unknown_token_id"));
  LP_ASSIGN_OR_RETURN(spec.pad_id, OptionalId(gguf, "tokenizer.ggml.padding_token_id"));
  for (const char* key : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
    LP_ASSIGN_OR_RETURN(int32_t id, OptionalId(gguf, key));
    if (id >= 0) spec.extra_eos_ids.push_back(id);
  }
  // llama.cpp's defaults: SentencePiece models add BOS and the space prefix, BPE models neither.
  LP_ASSIGN_OR_RETURN(spec.add_bos, OptionalBool(gguf, "tokenizer.ggml.add_bos_token", spm));
  LP_ASSIGN_OR_RETURN(spec.add_space_prefix,
                      OptionalBool(gguf, "tokenizer.ggml.add_space_prefix", spm));
  if (spec.add_bos && spec.bos_id < 0) spec.add_bos = false;
  if (gguf.FindMetadata("tokenizer.chat_template") != nullptr) {
    LP_ASSIGN_OR_RETURN(spec.chat_template, gguf.GetString("tokenizer.chat_template"));
  }
  internal::AddEndOfGenerationIds(&spec);
  return Tokenizer::Create(std::move(spec));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const formats::GgufFile& gguf) {
  auto tokenizer = Load(gguf);
  if (!tokenizer.ok()) return Annotate(tokenizer.status(), gguf.path());
  return tokenizer;
}

}  // namespace loraplex::model
