// Tokenizer base: spec validation, piece look-up, UTF-8 sanitising and streaming decode.
#include "model/tokenizer.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/tokenizer_internal.h"

namespace loraplex::model {
namespace internal {

size_t Utf8SeqLen(uint8_t lead) {
  if (lead < 0x80) return 1;
  if ((lead & 0xE0) == 0xC0) return 2;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return 4;
  return 1;  // continuation or invalid lead byte
}

SpecialTokenMatcher::SpecialTokenMatcher(const TokenizerSpec& spec) : by_first_byte_(256) {
  for (size_t id = 0; id < spec.tokens.size(); ++id) {
    const int32_t type = spec.token_types.empty() ? TokenizerSpec::kNormal : spec.token_types[id];
    if (type != TokenizerSpec::kControl && type != TokenizerSpec::kUserDefined &&
        type != TokenizerSpec::kUnknown) {
      continue;
    }
    const std::string& piece = spec.tokens[id];
    if (piece.empty()) continue;
    by_first_byte_[static_cast<uint8_t>(piece[0])].emplace_back(piece, static_cast<int32_t>(id));
  }
  for (auto& list : by_first_byte_) {
    // Longest first; among equal pieces the lowest id wins (stable sort keeps id order).
    std::stable_sort(list.begin(), list.end(),
                     [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  }
}

std::vector<SpecialTokenMatcher::Fragment> SpecialTokenMatcher::Split(std::string_view text) const {
  std::vector<Fragment> out;
  size_t raw_start = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    int32_t match = -1;
    size_t match_len = 0;
    for (const auto& [piece, id] : by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      if (text.substr(pos, piece.size()) == piece) {
        match = id;
        match_len = piece.size();
        break;
      }
    }
    if (match < 0) {
      ++pos;
      continue;
    }
    if (pos > raw_start) out.push_back({-1, text.substr(raw_start, pos - raw_start)});
    out.push_back({match, {}});
    pos += match_len;
    raw_start = pos;
  }
  if (raw_start < text.size()) out.push_back({-1, text.substr(raw_start)});
  return out;
}

void AddEndOfGenerationIds(TokenizerSpec* spec) {
  static constexpr std::string_view kEndOfTurn[] = {
      "<|im_end|>",    "<|eot_id|>", "<|eom_id|>",    "<|end_of_text|>",
      "<|endoftext|>", "<|end|>",    "<end_of_turn>", "<EOT>"};
  for (size_t id = 0; id < spec->tokens.size(); ++id) {
    const int32_t type = spec->token_types.empty() ? TokenizerSpec::kNormal : spec->token_types[id];
    if (type != TokenizerSpec::kControl && type != TokenizerSpec::kUserDefined) continue;
    const int32_t i = static_cast<int32_t>(id);
    if (i == spec->eos_id || std::find(spec->extra_eos_ids.begin(), spec->extra_eos_ids.end(), i) !=
                                 spec->extra_eos_ids.end()) {
      continue;
    }
    for (std::string_view name : kEndOfTurn) {
      if (spec->tokens[id] == name) spec->extra_eos_ids.push_back(i);
    }
  }
}

}  // namespace internal

namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 when ill-formed; `*subpart` receives the
// length of the maximal valid prefix (>= 1) to replace by one U+FFFD. `*incomplete` is set when
// the bytes so far are a valid prefix cut off by the end of the input.
size_t ValidSeqLen(std::string_view s, size_t i, size_t* subpart, bool* incomplete) {
  const uint8_t b0 = static_cast<uint8_t>(s[i]);
  *incomplete = false;
  *subpart = 1;
  if (b0 < 0x80) return 1;
  size_t need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;  // no overlong forms
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;  // <= U+10FFFF
  } else {
    return 0;
  }
  for (size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) {
      *incomplete = true;
      *subpart = k;
      return 0;
    }
    const uint8_t b = static_cast<uint8_t>(s[i + k]);
    const uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) {
      *subpart = k;
      return 0;
    }
  }
  return need;
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

}  // namespace

std::string SanitizeUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    size_t subpart;
    bool incomplete;
    const size_t n = ValidSeqLen(bytes, i, &subpart, &incomplete);
    if (n > 0) {
      out.append(bytes.substr(i, n));
      i += n;
    } else {
      out.append(kReplacement);
      i += subpart;
    }
  }
  return out;
}

Tokenizer::Tokenizer(TokenizerSpec spec) : spec_(std::move(spec)) {
  piece_to_id_.reserve(spec_.tokens.size());
  for (size_t id = 0; id < spec_.tokens.size(); ++id) {
    piece_to_id_.emplace(spec_.tokens[id], static_cast<int32_t>(id));
  }
}

int32_t Tokenizer::PieceToId(std::string_view piece) const {
  auto it = piece_to_id_.find(piece);
  return it == piece_to_id_.end() ? -1 : it->second;
}

bool Tokenizer::IsEndOfGeneration(int32_t id) const {
  if (id < 0) return false;
  if (id == spec_.eos_id) return true;
  return std::find(spec_.extra_eos_ids.begin(), spec_.extra_eos_ids.end(), id) !=
         spec_.extra_eos_ids.end();
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  return SanitizeUtf8(DecodeBytes(ids));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Create(TokenizerSpec spec) {
  const size_t n = spec.tokens.size();
  if (n == 0) return absl::InvalidArgumentError("tokenizer: empty vocabulary");
  if (n > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("tokenizer: vocabulary larger than 2^31");
  }
  if (!spec.scores.empty() && spec.scores.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: ", spec.scores.size(), " scores for ", n, " tokens"));
  }
  if (!spec.token_types.empty() && spec.token_types.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer: ", spec.token_types.size(), " token types for ", n, " tokens"));
  }
  for (size_t i = 0; i < spec.token_types.size(); ++i) {
    if (spec.token_types[i] < TokenizerSpec::kNormal ||
        spec.token_types[i] > TokenizerSpec::kByte) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: token ", i, " has unknown type ", spec.token_types[i]));
    }
  }
  auto check_id = [n](int32_t id, const char* what) -> absl::Status {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: ", what, " id ", id, " outside the vocabulary of ", n));
    }
    return absl::OkStatus();
  };
  for (auto [id, what] : {std::pair{spec.bos_id, "bos"}, std::pair{spec.eos_id, "eos"},
                          std::pair{spec.unk_id, "unk"}, std::pair{spec.pad_id, "pad"}}) {
    absl::Status s = check_id(id, what);
    if (!s.ok()) return s;
  }
  for (int32_t id : spec.extra_eos_ids) {
    absl::Status s = check_id(id, "end-of-generation");
    if (!s.ok()) return s;
    if (id < 0) return absl::InvalidArgumentError("tokenizer: negative end-of-generation id");
  }
  if (spec.add_bos && spec.bos_id < 0) {
    return absl::InvalidArgumentError("tokenizer: add_bos is set but the model has no BOS");
  }
  switch (spec.kind) {
    case TokenizerSpec::Kind::kSentencePiece:
      return internal::CreateSpmTokenizer(std::move(spec));
    case TokenizerSpec::Kind::kByteLevelBpe:
      return internal::CreateBpeTokenizer(std::move(spec));
  }
  return absl::InvalidArgumentError("tokenizer: unknown kind");
}

std::string StreamDecoder::Push(int32_t id) {
  pending_ += tokenizer_->DecodeBytes({id});
  // Hold back the tail only when it is a valid but unfinished UTF-8 sequence: a later token may
  // complete it. Anything ill-formed can be replaced at once.
  size_t i = 0;
  size_t emit_end = pending_.size();
  while (i < pending_.size()) {
    size_t subpart;
    bool incomplete;
    const size_t n = ValidSeqLen(pending_, i, &subpart, &incomplete);
    if (n > 0) {
      i += n;
    } else if (incomplete) {
      emit_end = i;
      break;
    } else {
      i += subpart;
    }
  }
  std::string out = SanitizeUtf8(std::string_view(pending_).substr(0, emit_end));
  pending_.erase(0, emit_end);
  return out;
}

std::string StreamDecoder::Flush() {
  std::string out = SanitizeUtf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace loraplex::model
