// Pieces shared by the tokenizer implementations (model/tokenizer*.cc); not a public API.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace loraplex::model::internal {

// Length in bytes of the UTF-8 sequence starting with `lead` as llama.cpp counts it: 1 for ASCII
// and for bytes that cannot start a sequence, so that every byte lands in some symbol.
size_t Utf8SeqLen(uint8_t lead);

// Splits text into raw-text fragments and literal special tokens. Matching is leftmost-longest
// over the tokens whose type is kControl, kUserDefined or kUnknown (HF matches its added tokens
// the same way; llama.cpp's partition agrees for non-overlapping tokens). Immutable, thread-safe.
class SpecialTokenMatcher {
 public:
  explicit SpecialTokenMatcher(const TokenizerSpec& spec);
  struct Fragment {
    int32_t token = -1;     // the special token, or -1 for raw text
    std::string_view text;  // the raw text (token == -1)
  };
  std::vector<Fragment> Split(std::string_view text) const;

 private:
  // by_first_byte_[b]: (piece, id) of special tokens starting with byte b, longest first.
  std::vector<std::vector<std::pair<std::string, int32_t>>> by_first_byte_;
};

// Adds to extra_eos_ids the control tokens that end a turn in the common chat formats
// (<|im_end|>, <|eot_id|>, <|endoftext|>, ...), as llama.cpp's end-of-generation set does.
void AddEndOfGenerationIds(TokenizerSpec* spec);

// Factories of the two algorithms; the spec is already validated by Tokenizer::Create.
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSpmTokenizer(TokenizerSpec spec);
absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizer(TokenizerSpec spec);

}  // namespace loraplex::model::internal
