// SentencePiece-style tokenizer as llama.cpp runs it on GGUF `tokenizer.ggml.model = llama`
// (and as the sentencepiece library's BPE model does): spaces become "▁", a "▁" is prefixed to
// every raw-text fragment that starts the text or follows a special token, then characters are
// merged pairwise, always the adjacent pair whose merged piece has the highest score (ties:
// leftmost), and characters that never merged fall back to their <0xXX> byte tokens.
#include <algorithm>
#include <cstdio>
#include <queue>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "model/tokenizer_internal.h"

namespace loraplex::model::internal {
namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // "▁"

class SpmTokenizer final : public Tokenizer {
 public:
  explicit SpmTokenizer(TokenizerSpec spec) : Tokenizer(std::move(spec)), matcher_(spec_) {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      int32_t id = PieceToId(name);
      if (id < 0) id = PieceToId(std::string(1, static_cast<char>(b)));
      byte_to_id_[b] = id >= 0 ? id : spec_.unk_id;
    }
    for (size_t id = 0; id < spec_.tokens.size(); ++id) {
      if (Type(id) != TokenizerSpec::kByte) continue;
      const std::string& p = spec_.tokens[id];
      unsigned value;
      if (p.size() == 6 && std::sscanf(p.c_str(), "<0x%2X>", &value) == 1) {
        byte_value_.emplace(static_cast<int32_t>(id), static_cast<char>(value));
      }
    }
  }

  std::vector<int32_t> Encode(std::string_view text, bool add_bos) const override {
    std::vector<int32_t> out;
    if (add_bos && spec_.bos_id >= 0) out.push_back(spec_.bos_id);
    bool prev_special = true;  // the text start counts as "after a special token"
    for (const auto& frag : matcher_.Split(text)) {
      if (frag.token >= 0) {
        out.push_back(frag.token);
        prev_special = true;
        continue;
      }
      std::string escaped;
      if (spec_.add_space_prefix && prev_special) escaped.append(kSpace);
      for (char c : frag.text) {
        if (c == ' ') {
          escaped.append(kSpace);
        } else {
          escaped.push_back(c);
        }
      }
      TokenizeFragment(escaped, &out);
      prev_special = false;
    }
    return out;
  }

  std::string DecodeBytes(const std::vector<int32_t>& ids) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size()) continue;
      switch (Type(id)) {
        case TokenizerSpec::kControl:
        case TokenizerSpec::kUnused:
          break;
        case TokenizerSpec::kUnknown:
          out.append("\xE2\x96\x85");  // llama.cpp renders <unk> as U+2585
          break;
        case TokenizerSpec::kByte: {
          auto it = byte_value_.find(id);
          if (it != byte_value_.end()) {
            out.push_back(it->second);
          } else {
            out.append(spec_.tokens[id]);
          }
          break;
        }
        default:
          AppendUnescaped(spec_.tokens[id], &out);
      }
    }
    return out;
  }

  const std::string& Piece(int32_t id) const override {
    static const std::string kEmpty;
    return id >= 0 && id < vocab_size() ? spec_.tokens[id] : kEmpty;
  }

 private:
  struct Symbol {
    int prev;
    int next;
    size_t offset;  // into the fragment
    size_t n;       // 0 once merged into its left neighbour
  };
  struct Bigram {
    int left;
    int right;
    float score;
    size_t size;
    bool operator<(const Bigram& o) const {  // priority_queue pops the largest
      return score < o.score || (score == o.score && left > o.left);
    }
  };

  int32_t Type(size_t id) const {
    return spec_.token_types.empty() ? TokenizerSpec::kNormal : spec_.token_types[id];
  }
  float Score(int32_t id) const { return spec_.scores.empty() ? 0.0f : spec_.scores[id]; }

  static void AppendUnescaped(const std::string& piece, std::string* out) {
    size_t i = 0;
    while (i < piece.size()) {
      if (piece.compare(i, kSpace.size(), kSpace) == 0) {
        out->push_back(' ');
        i += kSpace.size();
      } else {
        out->push_back(piece[i++]);
      }
    }
  }

  void TokenizeFragment(const std::string& text, std::vector<int32_t>* out) const {
    std::vector<Symbol> symbols;
    for (size_t offs = 0; offs < text.size();) {
      // One character per symbol. A truncated or broken sequence becomes single bytes, so that it
      // never swallows the start of the next character (llama.cpp trusts the lead byte; on
      // valid UTF-8 the two agree).
      size_t len = std::min(text.size() - offs, Utf8SeqLen(static_cast<uint8_t>(text[offs])));
      for (size_t k = 1; k < len; ++k) {
        if ((static_cast<uint8_t>(text[offs + k]) & 0xC0) != 0x80) len = 1;
      }
      const int index = static_cast<int>(symbols.size());
      symbols.push_back({index - 1, offs + len == text.size() ? -1 : index + 1, offs, len});
      offs += len;
    }
    std::priority_queue<Bigram> queue;
    auto try_add = [&](int left, int right) {
      if (left < 0 || right < 0) return;
      const int32_t id = PieceToId(
          std::string_view(text).substr(symbols[left].offset, symbols[left].n + symbols[right].n));
      if (id < 0) return;
      queue.push({left, right, Score(id), symbols[left].n + symbols[right].n});
    };
    for (size_t i = 1; i < symbols.size(); ++i) try_add(static_cast<int>(i) - 1, i);
    while (!queue.empty()) {
      const Bigram b = queue.top();
      queue.pop();
      Symbol& left = symbols[b.left];
      Symbol& right = symbols[b.right];
      // Stale entry: one side was merged elsewhere since it was queued.
      if (left.n == 0 || right.n == 0 || left.n + right.n != b.size) continue;
      left.n += right.n;
      right.n = 0;
      left.next = right.next;
      if (right.next >= 0) symbols[right.next].prev = b.left;
      try_add(left.prev, b.left);
      try_add(b.left, left.next);
    }
    // Every merge made a vocabulary piece, so a final symbol is either a piece or one character
    // that never merged; the latter falls back to its bytes. (llama.cpp's resegment step keeps a
    // merge history for pieces outside the vocabulary, which this invariant makes unreachable.)
    for (int i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) {
      const std::string_view piece = std::string_view(text).substr(symbols[i].offset, symbols[i].n);
      const int32_t id = PieceToId(piece);
      if (id >= 0) {
        out->push_back(id);
        continue;
      }
      for (char c : piece) {
        const int32_t byte_id = byte_to_id_[static_cast<uint8_t>(c)];
        if (byte_id >= 0) out->push_back(byte_id);
      }
    }
  }

  SpecialTokenMatcher matcher_;
  int32_t byte_to_id_[256];
  std::unordered_map<int32_t, char> byte_value_;  // byte-token id -> its byte
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateSpmTokenizer(TokenizerSpec spec) {
  if (spec.unk_id < 0) {
    // Without <unk> a byte that has no <0xXX> token would silently vanish; require byte tokens.
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      if (std::find(spec.tokens.begin(), spec.tokens.end(), name) == spec.tokens.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tokenizer: SentencePiece vocabulary has neither an unknown token nor byte token ",
            name));
      }
    }
  }
  return std::unique_ptr<Tokenizer>(new SpmTokenizer(std::move(spec)));
}

}  // namespace loraplex::model::internal
