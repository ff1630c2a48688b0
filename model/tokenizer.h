// Tokenizers of Llama-family models: SentencePiece-style (score-driven BPE over a vocabulary with
// byte fallback, as GGUF `tokenizer.ggml.model = llama`) and byte-level BPE (GPT-2 style merges, as
// GGUF `gpt2` and HF `tokenizer.json` with a ByteLevel pre-tokenizer). Special tokens written in
// the text (e.g. "<|im_start|>") encode to their ids. Decoding never splits a UTF-8 character when
// used through StreamDecoder. Immutable after creation and safe to use from many threads.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace loraplex::formats {
class GgufFile;
}

namespace loraplex::model {

// Everything a tokenizer is built from, whatever file it came from.
struct TokenizerSpec {
  enum class Kind { kSentencePiece, kByteLevelBpe };
  // GGUF token types.
  enum TokenType : int32_t {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,
    kUserDefined = 4,
    kUnused = 5,
    kByte = 6
  };

  Kind kind = Kind::kSentencePiece;
  std::vector<std::string> tokens;   // id -> piece (SPM: "▁" for space; BPE: byte-level chars)
  std::vector<float> scores;         // SPM merge priorities (may be empty for BPE)
  std::vector<int32_t> token_types;  // TokenType per id (empty: all normal)
  std::vector<std::string> merges;   // BPE: "left right", highest priority first
  std::string pre;                   // BPE pre-tokenizer flavour ("gpt2", "smollm", "llama3", ...)
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t unk_id = -1;
  int32_t pad_id = -1;
  std::vector<int32_t> extra_eos_ids;  // other end-of-generation ids (e.g. <|im_end|>, <|eot_id|>)
  bool add_bos = false;                // prepend BOS when encoding a prompt
  bool add_space_prefix = true;        // SPM: prepend "▁" to the text (llama default)
  bool ignore_merges = false;  // BPE: a pre-token that is itself in the vocabulary is not split
                               // (HF `model.ignore_merges`, llama.cpp's llama3 behaviour)
  std::string chat_template;   // Jinja source from the model, may be empty
};

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

class Tokenizer {
 public:
  // INVALID_ARGUMENT when the spec is inconsistent (empty vocabulary, ids out of range, a merge
  // naming unknown pieces, scores/types of another length, an unknown BPE pre-tokenizer flavour).
  // Tokens of type kControl, kUserDefined and kUnknown are matched literally in the text.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Create(TokenizerSpec spec);
  // From GGUF metadata (tokenizer.ggml.*, tokenizer.chat_template). NOT_FOUND / INVALID_ARGUMENT
  // naming the missing or malformed key; UNIMPLEMENTED for other tokenizer models.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const formats::GgufFile& gguf);
  // From an HF model folder: tokenizer.json (+ tokenizer_config.json for chat template, BOS/EOS and
  // add_bos when present). Only model.type BPE with a ByteLevel pre-tokenizer (optionally behind
  // Digits(individual_digits) = the "smollm" flavour, or a Split with the Llama 3 regex) is read;
  // anything else is UNIMPLEMENTED naming the field. NOT_FOUND when tokenizer.json is absent.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromHfDir(const std::string& dir);

  virtual ~Tokenizer() = default;

  // Encodes text; special tokens in the text map to their ids. Prepends BOS when add_bos and the
  // model has one. Any bytes are accepted: SPM falls back to <0xXX> tokens (or <unk>); BPE drops a
  // byte whose byte-level character is not in the vocabulary (0xFE/0xFF in SmolLM2), as HF
  // tokenizers and llama.cpp do.
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_bos) const = 0;
  // Concatenated bytes of the tokens; may end in an incomplete UTF-8 sequence. Control tokens
  // (BOS, EOS, <|im_start|>) and ids out of range render as nothing, user-defined tokens as their
  // text, SPM byte tokens as their byte and SPM <unk> as U+2585 (as llama.cpp).
  virtual std::string DecodeBytes(const std::vector<int32_t>& ids) const = 0;
  // Decode for display: invalid UTF-8 replaced by U+FFFD. (SPM: the leading space that the
  // tokenizer added is kept, as llama.cpp does when decoding a continuation.)
  std::string Decode(const std::vector<int32_t>& ids) const;
  // The raw piece string of an id ("" when out of range).
  virtual const std::string& Piece(int32_t id) const = 0;

  const TokenizerSpec& spec() const { return spec_; }
  int32_t vocab_size() const { return static_cast<int32_t>(spec_.tokens.size()); }
  int32_t bos_id() const { return spec_.bos_id; }
  int32_t eos_id() const { return spec_.eos_id; }
  // EOS or any of extra_eos_ids. FromGguf and FromHfDir add the usual end-of-turn control tokens
  // (<|im_end|>, <|eot_id|>, <|endoftext|>, ...) to extra_eos_ids, as llama.cpp does.
  bool IsEndOfGeneration(int32_t id) const;
  // Token id of an exact piece, -1 when absent.
  int32_t PieceToId(std::string_view piece) const;

  // Formats a conversation with the model's chat template. Supported templates are recognised from
  // their source: ChatML (<|im_start|>), Llama 3 (<|start_header_id|>), Llama 2 / Mistral ([INST]),
  // and a ChatML default when the model has none; a ChatML template's literal default system
  // prompt (SmolLM2's) is inserted when the first message is not a system one. The output equals
  // HF transformers' apply_chat_template for those templates. UNIMPLEMENTED for an unrecognised
  // template (or Llama 3.1's); INVALID_ARGUMENT where the template itself raises (roles that do
  // not alternate user/assistant in Llama 2 / Mistral, no messages for Llama 2).
  absl::StatusOr<std::string> ApplyChatTemplate(const std::vector<ChatMessage>& messages,
                                                bool add_generation_prompt) const;

 protected:
  explicit Tokenizer(TokenizerSpec spec);
  TokenizerSpec spec_;

 private:
  struct PieceHash {  // transparent, so that look-ups by string_view do not allocate
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
  };
  // First id of each piece.
  std::unordered_map<std::string, int32_t, PieceHash, std::equal_to<>> piece_to_id_;
};

// Incremental detokenizer: Push returns the text completed by this token, holding back bytes of a
// UTF-8 character that is not complete yet; Flush returns what is left (invalid bytes as U+FFFD).
// The concatenation of all Push results and Flush equals Decode of all ids. Not thread-safe (one
// per stream); the tokenizer must outlive it.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer* tokenizer) : tokenizer_(tokenizer) {}
  std::string Push(int32_t id);
  std::string Flush();

 private:
  const Tokenizer* tokenizer_;
  std::string pending_;
};

// Replaces every ill-formed UTF-8 subsequence of `bytes` by U+FFFD, one per maximal subpart (the
// Unicode / Python errors="replace" convention).
std::string SanitizeUtf8(std::string_view bytes);

}  // namespace loraplex::model
