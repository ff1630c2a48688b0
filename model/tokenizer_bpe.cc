// Byte-level BPE (GPT-2 family: GGUF `tokenizer.ggml.model = gpt2`, HF BPE + ByteLevel).
// Special tokens are cut out of the text first; each raw fragment is split by the flavour's
// pre-tokenizer regexes (ICU, so \p{L}, \p{N} and white space follow the Unicode tables), every
// byte of a pre-token is mapped to its printable GPT-2 character, and adjacent symbols are merged
// by rank (lowest first, ties leftmost) as HF tokenizers and llama.cpp do.
#include <queue>
#include <unordered_map>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/tokenizer_internal.h"
#include "unicode/regex.h"
#include "unicode/unistr.h"
#include "unicode/utf8.h"

namespace loraplex::model::internal {
namespace {

// The GPT-2 regex, written with \p{White_Space} where the original has \s: Oniguruma's and
// Rust regex's \s are the White_Space property, while ICU's \s leaves out U+000B and U+0085.
constexpr const char* kGpt2Regex =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\p{White_Space}\\p{L}\\p{N}]+"
    "|\\p{White_Space}+(?!\\P{White_Space})|\\p{White_Space}+";
constexpr const char* kLlama3Regex =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\p{White_Space}\\p{L}\\p{N}]+[\\r\\n]*|\\p{White_Space}*[\\r\\n]+"
    "|\\p{White_Space}+(?!\\P{White_Space})|\\p{White_Space}+";
constexpr const char* kDigitRegex = "\\p{N}";

// Each flavour is a sequence of regexes; every one splits the pieces left by the previous into
// matches and the gaps between them (HF's Split with behaviour "isolated").
absl::StatusOr<std::vector<const char*>> FlavourRegexes(const std::string& pre) {
  if (pre.empty() || pre == "gpt2" || pre == "default") return std::vector{kGpt2Regex};
  if (pre == "smollm") return std::vector{kDigitRegex, kGpt2Regex};
  if (pre == "llama3" || pre == "llama-bpe") return std::vector{kLlama3Regex};
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer: unsupported BPE pre-tokenizer flavour '", pre,
                   "' (supported: gpt2, smollm, llama3)"));
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the others are moved
// to U+0100 onwards in byte order.
std::vector<char32_t> ByteToCodepoint() {
  std::vector<char32_t> map(256, 0);
  std::vector<bool> direct(256, false);
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) map[b] = direct[b] ? static_cast<char32_t>(b) : next++;
  return map;
}

void AppendUtf8(char32_t cp, std::string* out) {
  uint8_t buf[4];
  int32_t len = 0;
  U8_APPEND_UNSAFE(buf, len, static_cast<UChar32>(cp));  // cp < 0x200: always valid
  out->append(reinterpret_cast<const char*>(buf), len);
}

struct Merge {
  int32_t rank;    // position in the merge list: lower merges first
  int32_t merged;  // id of the piece left+right
};
// (left id, right id) -> merge.
using MergeTable = absl::flat_hash_map<uint64_t, Merge>;
uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(TokenizerSpec spec, std::vector<std::unique_ptr<icu::RegexPattern>> patterns,
               MergeTable merges)
      : Tokenizer(std::move(spec)),
        matcher_(spec_),
        patterns_(std::move(patterns)),
        merges_(std::move(merges)) {
    const std::vector<char32_t> map = ByteToCodepoint();
    for (int b = 0; b < 256; ++b) {
      AppendUtf8(map[b], &byte_chars_[b]);
      byte_ids_[b] = PieceToId(byte_chars_[b]);
      codepoint_to_byte_.emplace(map[b], static_cast<uint8_t>(b));
    }
  }

  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const override {
    std::vector<int32_t> out;
    if (add_bos && spec_.bos_id >= 0) out.push_back(spec_.bos_id);
    for (const auto& frag : matcher_.Split(text)) {
      if (frag.token >= 0) {
        out.push_back(frag.token);
        continue;
      }
      for (std::string_view word : PreTokenize(frag.text)) EncodeWord(word, &out);
    }
    return out;
  }

  std::string DecodeBytes(const std::vector<int32_t>& ids) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size()) continue;
      const int32_t type =
          spec_.token_types.empty() ? TokenizerSpec::kNormal : spec_.token_types[id];
      if (type == TokenizerSpec::kControl || type == TokenizerSpec::kUnknown ||
          type == TokenizerSpec::kUnused) {
        continue;
      }
      const std::string& piece = spec_.tokens[id];
      if (type == TokenizerSpec::kUserDefined) {  // added tokens are stored as plain text
        out.append(piece);
        continue;
      }
      int32_t i = 0;
      const int32_t n = static_cast<int32_t>(piece.size());
      while (i < n) {
        const int32_t start = i;
        UChar32 cp;
        U8_NEXT(reinterpret_cast<const uint8_t*>(piece.data()), i, n, cp);
        auto it = cp >= 0 ? codepoint_to_byte_.find(cp) : codepoint_to_byte_.end();
        if (it != codepoint_to_byte_.end()) {
          out.push_back(static_cast<char>(it->second));
        } else {
          out.append(piece, start, i - start);  // not a byte-level character: keep as is
        }
      }
    }
    return out;
  }

  const std::string& Piece(int32_t id) const override {
    static const std::string kEmpty;
    return id >= 0 && id < vocab_size() ? spec_.tokens[id] : kEmpty;
  }

 private:
  // Splits raw text into pre-tokens (byte ranges of `text`). Ill-formed UTF-8 is seen by the
  // regexes as U+FFFD but its original bytes are kept.
  std::vector<std::string_view> PreTokenize(std::string_view text) const {
    icu::UnicodeString u;
    std::vector<int32_t> byte_at;  // UTF-16 index -> byte offset; one extra entry for the end
    const int32_t n = static_cast<int32_t>(text.size());
    const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
    for (int32_t i = 0; i < n;) {
      const int32_t start = i;
      UChar32 cp;
      U8_NEXT(bytes, i, n, cp);
      if (cp < 0) cp = 0xFFFD;
      const int32_t units = U16_LENGTH(cp);
      for (int32_t k = 0; k < units; ++k) byte_at.push_back(start);
      u.append(cp);
    }
    byte_at.push_back(n);

    std::vector<std::pair<int32_t, int32_t>> pieces = {{0, u.length()}};  // UTF-16 ranges
    for (const auto& pattern : patterns_) {
      std::vector<std::pair<int32_t, int32_t>> next;
      UErrorCode status = U_ZERO_ERROR;
      std::unique_ptr<icu::RegexMatcher> m(pattern->matcher(u, status));
      for (auto [begin, end] : pieces) {
        if (begin == end) continue;
        status = U_ZERO_ERROR;
        m->region(begin, end, status);
        int32_t last = begin;
        while (U_SUCCESS(status) && m->find(status)) {
          const int32_t s = m->start(status), e = m->end(status);
          if (e == s) continue;  // none of the patterns matches empty, but be safe
          if (s > last) next.emplace_back(last, s);
          next.emplace_back(s, e);
          last = e;
        }
        if (last < end) next.emplace_back(last, end);
      }
      pieces = std::move(next);
    }
    std::vector<std::string_view> words;
    words.reserve(pieces.size());
    for (auto [begin, end] : pieces) {
      words.push_back(text.substr(byte_at[begin], byte_at[end] - byte_at[begin]));
    }
    return words;
  }

  // Merges run on token ids (every merge result is a vocabulary piece, checked at creation), so
  // no strings are built or hashed per pair.
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
    if (spec_.ignore_merges) {
      std::string mapped;
      for (char c : word) mapped.append(byte_chars_[static_cast<uint8_t>(c)]);
      const int32_t id = PieceToId(mapped);
      if (id >= 0) {
        out->push_back(id);
        return;
      }
    }
    struct Symbol {
      int prev, next;
      int32_t id;  // -1: a byte whose character is not in the vocabulary (never merges)
    };
    std::vector<Symbol> sym(word.size());
    for (size_t i = 0; i < word.size(); ++i) {
      sym[i] = {static_cast<int>(i) - 1, i + 1 < word.size() ? static_cast<int>(i) + 1 : -1,
                byte_ids_[static_cast<uint8_t>(word[i])]};
    }
    struct Pair {
      int32_t rank;
      int left;
      int32_t left_id, right_id;  // to recognise entries made stale by a neighbour's merge
      bool operator>(const Pair& o) const {
        return rank > o.rank || (rank == o.rank && left > o.left);
      }
    };
    std::priority_queue<Pair, std::vector<Pair>, std::greater<Pair>> queue;
    auto try_add = [&](int left) {
      if (left < 0 || sym[left].next < 0) return;
      const int32_t a = sym[left].id, b = sym[sym[left].next].id;
      if (a < 0 || b < 0) return;
      auto it = merges_.find(PairKey(a, b));
      if (it != merges_.end()) queue.push({it->second.rank, left, a, b});
    };
    for (size_t i = 0; i + 1 < sym.size(); ++i) try_add(static_cast<int>(i));
    while (!queue.empty()) {
      const Pair p = queue.top();
      queue.pop();
      Symbol& l = sym[p.left];
      if (l.id != p.left_id || l.next < 0 || sym[l.next].id != p.right_id) continue;  // stale
      Symbol& r = sym[l.next];
      l.id = merges_.find(PairKey(p.left_id, p.right_id))->second.merged;
      r.id = -2;  // merged away: never matches a queued id again
      l.next = r.next;
      if (l.next >= 0) sym[l.next].prev = p.left;
      try_add(l.prev);
      try_add(p.left);
    }
    // A byte whose character has no piece (0xFE and 0xFF never occur in UTF-8, and vocabularies
    // often lack them) is dropped, as HF tokenizers (BPE without unk_token) and llama.cpp do;
    // emitting <unk> would put a control token such as <|endoftext|> into the prompt.
    for (int i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) {
      if (sym[i].id >= 0) out->push_back(sym[i].id);
    }
  }

  SpecialTokenMatcher matcher_;
  std::vector<std::unique_ptr<icu::RegexPattern>> patterns_;
  MergeTable merges_;
  std::string byte_chars_[256];  // byte -> its GPT-2 character (UTF-8)
  int32_t byte_ids_[256];        // byte -> id of that character's piece, -1 when absent
  std::unordered_map<char32_t, uint8_t> codepoint_to_byte_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateBpeTokenizer(TokenizerSpec spec) {
  auto regexes = FlavourRegexes(spec.pre);
  if (!regexes.ok()) return regexes.status();
  std::vector<std::unique_ptr<icu::RegexPattern>> patterns;
  for (const char* source : *regexes) {
    UErrorCode status = U_ZERO_ERROR;
    UParseError parse_error;
    std::unique_ptr<icu::RegexPattern> p(
        icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(source), 0, parse_error, status));
    if (U_FAILURE(status)) {
      return absl::InternalError(
          absl::StrCat("tokenizer: ICU cannot compile pre-tokenizer regex: ", u_errorName(status)));
    }
    patterns.push_back(std::move(p));
  }
  std::unordered_map<std::string, int32_t> piece_ids;
  for (size_t i = 0; i < spec.tokens.size(); ++i) piece_ids.emplace(spec.tokens[i], i);
  MergeTable merges;
  merges.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const std::string& merge = spec.merges[rank];
    const size_t space = merge.find(' ', 1);  // the left piece is never empty
    if (space == std::string::npos || space + 1 >= merge.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: merge ", rank, " '", merge, "' is not 'left right'"));
    }
    const std::string left = merge.substr(0, space), right = merge.substr(space + 1);
    auto l = piece_ids.find(left), r = piece_ids.find(right), m = piece_ids.find(left + right);
    if (l == piece_ids.end() || r == piece_ids.end() || m == piece_ids.end()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer: merge ", rank, " '", merge,
                                                     "' names a piece outside the vocabulary"));
    }
    // A repeated merge keeps its first rank.
    merges.emplace(PairKey(l->second, r->second), Merge{static_cast<int32_t>(rank), m->second});
  }
  return std::unique_ptr<Tokenizer>(
      new BpeTokenizer(std::move(spec), std::move(patterns), std::move(merges)));
}

}  // namespace loraplex::model::internal
