// Byte-level BPE (GPT-2 family: GGUF `tokenizer.ggml.model = gpt2`, HF BPE + ByteLevel).
// Special tokens are cut out of the text first; each raw fragment is split by the flavour's
// pre-tokenizer regexes (ICU, so \p{L}, \p{N} and white space follow the Unicode tables), every
// byte of a pre-token is mapped to its printable GPT-2 character, and adjacent symbols are merged
// by rank (lowest first, ties leftmost) as HF tokenizers and llama.cpp do.
#include <queue>
#include <unordered_map>
#include <utility>

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

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(TokenizerSpec spec, std::vector<std::unique_ptr<icu::RegexPattern>> patterns,
               std::unordered_map<std::string, int32_t> ranks)
      : Tokenizer(std::move(spec)),
        matcher_(spec_),
        patterns_(std::move(patterns)),
        ranks_(std::move(ranks)) {
    const std::vector<char32_t> map = ByteToCodepoint();
    for (int b = 0; b < 256; ++b) {
      AppendUtf8(map[b], &byte_chars_[b]);
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

  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
    std::string mapped;
    std::vector<size_t> starts;  // offset of each byte's character in `mapped`
    for (char c : word) {
      starts.push_back(mapped.size());
      mapped.append(byte_chars_[static_cast<uint8_t>(c)]);
    }
    if (spec_.ignore_merges) {
      const int32_t id = PieceToId(mapped);
      if (id >= 0) {
        out->push_back(id);
        return;
      }
    }
    struct Symbol {
      int prev, next;
      size_t offset, n;  // n == 0: merged into the left neighbour
    };
    std::vector<Symbol> sym;
    for (size_t i = 0; i < starts.size(); ++i) {
      const size_t end = i + 1 < starts.size() ? starts[i + 1] : mapped.size();
      sym.push_back({static_cast<int>(i) - 1, i + 1 < starts.size() ? static_cast<int>(i) + 1 : -1,
                     starts[i], end - starts[i]});
    }
    struct Pair {
      int32_t rank;
      int left;
      size_t size;
      bool operator>(const Pair& o) const {
        return rank > o.rank || (rank == o.rank && left > o.left);
      }
    };
    std::priority_queue<Pair, std::vector<Pair>, std::greater<Pair>> queue;
    std::string key;
    auto try_add = [&](int left) {
      if (left < 0 || sym[left].next < 0) return;
      const Symbol& l = sym[left];
      const Symbol& r = sym[l.next];
      key.assign(mapped, l.offset, l.n);
      key.push_back(' ');
      key.append(mapped, r.offset, r.n);
      auto it = ranks_.find(key);
      if (it != ranks_.end()) queue.push({it->second, left, l.n + r.n});
    };
    for (size_t i = 0; i + 1 < sym.size(); ++i) try_add(static_cast<int>(i));
    while (!queue.empty()) {
      const Pair p = queue.top();
      queue.pop();
      Symbol& l = sym[p.left];
      if (l.n == 0 || l.next < 0) continue;
      Symbol& r = sym[l.next];
      if (l.n + r.n != p.size) continue;  // stale: a neighbour changed since it was queued
      l.n += r.n;
      r.n = 0;
      l.next = r.next;
      if (l.next >= 0) sym[l.next].prev = p.left;
      try_add(l.prev);
      try_add(p.left);
    }
    for (int i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) {
      const std::string_view piece = std::string_view(mapped).substr(sym[i].offset, sym[i].n);
      const int32_t id = PieceToId(piece);
      if (id >= 0) {
        out->push_back(id);
      } else if (spec_.unk_id >= 0) {  // only reachable with a vocabulary missing byte characters
        out->push_back(spec_.unk_id);
      }
    }
  }

  SpecialTokenMatcher matcher_;
  std::vector<std::unique_ptr<icu::RegexPattern>> patterns_;
  std::unordered_map<std::string, int32_t> ranks_;  // "left right" -> merge rank
  std::string byte_chars_[256];                     // byte -> its GPT-2 character (UTF-8)
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
  std::unordered_map<std::string, int32_t> ranks;
  ranks.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const std::string& merge = spec.merges[rank];
    const size_t space = merge.find(' ', 1);  // the left piece is never empty
    if (space == std::string::npos || space + 1 >= merge.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: merge ", rank, " '", merge, "' is not 'left right'"));
    }
    const std::string left = merge.substr(0, space), right = merge.substr(space + 1);
    if (!piece_ids.count(left) || !piece_ids.count(right) || !piece_ids.count(left + right)) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer: merge ", rank, " '", merge,
                                                     "' names a piece outside the vocabulary"));
    }
    ranks.emplace(merge, static_cast<int32_t>(rank));  // a repeated merge keeps its first rank
  }
  return std::unique_ptr<Tokenizer>(
      new BpeTokenizer(std::move(spec), std::move(patterns), std::move(ranks)));
}

}  // namespace loraplex::model::internal
